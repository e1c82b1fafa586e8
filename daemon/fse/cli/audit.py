"""`fse audit verify`: check an audit log's hash chain (and its macs, with the key).

Exit 0 when the chain is whole: intact, and starting at seq 1 or right after lines that
an `audit.pruned` record in the chain (or the anchor given) accounts for; streams
without a verdict are listed, not failed. Exit 1 (BROKEN) when a line breaks the chain
(the file and line are named), 2 when a file cannot be read, 3 (INCOMPLETE) when the
chain is intact but its start is not known: earlier files were deleted or not given.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from fse.cli.common import EXIT_ERROR
from fse.core.errors import InputError

# Intact but not whole: the lines before the first one given are unaccounted for.
EXIT_INCOMPLETE = 3


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
    verify.add_argument(
        "--from-seq",
        type=int,
        metavar="N",
        help="with --from-hash: a line recorded elsewhere (an audit.head from the daemon's "
        "journal, an audit.pruned line, a copy shipped off the host): the chain may start "
        "right after it, must hold it if it covers seq N, and must reach it",
    )
    verify.add_argument(
        "--from-hash", metavar="SHA256", help="with --from-seq: the sha256 of line N"
    )
    verify.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fse.serve.audit.format import AuditError, load_key
    from fse.serve.audit.verify import Head, chain_files, verify

    files = chain_files(args.files)
    if not files:
        raise InputError(f"{', '.join(map(str, args.files))}: no audit log files (*.jsonl[.N])")
    anchor = _anchor(args.from_seq, args.from_hash)
    label = str(files[0]) if len(files) == 1 else f"{len(files)} files {files[0]} .. {files[-1]}"
    try:
        key = load_key(args.key_file) if args.key_file else None
        result = verify(files, key=key, anchor=Head(*anchor) if anchor else None)
    except AuditError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"{exc.filename}: cannot read: {exc.strerror or exc}") from None
    if not result.intact:
        where = "" if len(files) == 1 else f"{result.file} "
        print(
            f"{label}: BROKEN: {where}{result.problem}; "
            f"{_intact(result.lines, len(files) == 1)} intact"
        )
        return EXIT_ERROR
    for pruned in result.pruned:
        seqs = f"seq {pruned.first_seq}..{pruned.last_seq}, last sha256 {pruned.last_sha256}"
        print(
            f"pruned: {pruned.name} ({seqs}) was deleted by rotation "
            f"(audit.pruned at seq {pruned.seq})"
        )
    if result.start_seq > 1 and result.anchored_by:
        print(
            f"note: the chain starts at seq {result.start_seq}, right after the lines "
            f"{result.anchored_by} accounts for"
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
    summary = f"{result.lines} lines, {macs[result.macs]}, last seq {head.seq} sha256 {head.hash}"
    if result.incomplete:
        print(f"{label}: INCOMPLETE: {result.incomplete}; intact: {summary}")
        return EXIT_INCOMPLETE
    print(f"{label}: ok: {summary}")
    return 0


def _anchor(seq: int | None, sha256: str | None) -> tuple[int, str] | None:
    if seq is None and sha256 is None:
        return None
    if seq is None or sha256 is None:
        raise InputError("--from-seq and --from-hash: give both (a line's seq and its sha256)")
    if seq < 1:
        raise InputError(f"--from-seq: {seq}; accepted: a seq, 1 or more")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InputError(f"--from-hash: {sha256!r}; accepted: a sha256, 64 lowercase hex digits")
    return seq, sha256


def _intact(lines: int, single: bool) -> str:
    if lines == 0:
        return "no lines are"
    return f"lines 1..{lines} are" if single else f"the {lines} lines before it are"
