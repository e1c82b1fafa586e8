"""`fse audit verify`: check an audit log's hash chain."""

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
        "verify", help="check the hash chain; names the first line that breaks it"
    )
    verify.add_argument("file", type=Path)
    verify.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fse.serve.audit import verify

    try:
        result = verify(args.file)
    except OSError as exc:
        raise InputError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    if not result.ok:
        print(f"{args.file}: BROKEN: {result.problem}; lines 1..{result.lines} are intact")
        return EXIT_ERROR
    head = result.head
    print(f"{args.file}: ok: {result.lines} lines, last seq {head.seq} sha256 {head.hash}")
    return 0
