"""`fse audit verify`: check an audit log's hash chain (and its macs, with the key).

Exit 0 when the chain is whole (streams without a verdict are listed, not failed),
1 when a line breaks it (the file and line are named), 2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fse.cli.common import EXIT_ERROR
from fse.core.errors import InputError


def add_parser(commands: Any) -> None:
    aud = commands.add_parser("audit", help="check an audit log")
    aud_commands = aud.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = aud_commands.add_parser(
        "verify",
        help="check the hash chain over one or more files (or a directory of rotated files); "
        "names the first line that breaks it",
    )
    verify.add_argument(
        "files",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="audit log files, in any order (ordered by rotation: NAME.N .. NAME.1, NAME), "
        "or a directory holding them",
    )
    verify.add_argument(
        "--key-file",
        type=Path,
        help="the HMAC key of a keyed log: every line's mac is checked too",
    )
    verify.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fse.serve.audit import AuditError, chain_files, load_key, verify

    files = chain_files(args.files)
    if not files:
        raise InputError(f"{', '.join(map(str, args.files))}: no audit log files (*.jsonl[.N])")
    label = str(files[0]) if len(files) == 1 else f"{len(files)} files {files[0]} .. {files[-1]}"
    try:
        key = load_key(args.key_file) if args.key_file else None
        result = verify(files, key=key)
    except AuditError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{exc.filename}: cannot read: {exc.strerror or exc}") from None
    if not result.ok:
        where = "" if len(files) == 1 else f"{result.file} "
        print(
            f"{label}: BROKEN: {where}{result.problem}; "
            f"{_intact(result.lines, len(files) == 1)} intact"
        )
        return EXIT_ERROR
    if result.start_seq > 1:
        print(
            f"note: the chain starts at seq {result.start_seq} (an audit.rotated line): the "
            "files before it were rotated away or not given"
        )
    for orphan in result.orphans:
        print(
            f"orphan: stream {orphan.stream} (request_id {orphan.request_id!r}, "
            f"{orphan.file} line {orphan.line}) never got a verdict: its daemon stopped "
            "without one (killed or crashed)"
        )
    for open_ in result.unfinished:
        print(
            f"unfinished: stream {open_.stream} (request_id {open_.request_id!r}, "
            f"{open_.file} line {open_.line}) has no verdict yet: in flight, or its daemon "
            "died and has not been restarted on this log"
        )
    if result.macs == "unchecked":
        print(
            "note: the lines carry macs but they were NOT checked (no --key-file): only "
            "the hash chain was, which whoever can write the file can recompute"
        )
    macs = {"checked": "macs checked", "unchecked": "MACs NOT checked", "absent": "unkeyed"}
    head = result.head
    print(
        f"{label}: ok: {result.lines} lines, {macs[result.macs]}, "
        f"last seq {head.seq} sha256 {head.hash}"
    )
    return 0


def _intact(lines: int, single: bool) -> str:
    if lines == 0:
        return "no lines are"
    return f"lines 1..{lines} are" if single else f"the {lines} lines before it are"
