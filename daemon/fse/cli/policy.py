"""`fse policy check|show`: validate a policy file, print a policy in canonical TOML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fse.cli.common import resolve_policy
from fse.core.errors import InputError


def add_parser(commands: Any) -> None:
    pol = commands.add_parser("policy", help="check or show guard policies")
    pol_commands = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = pol_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_policy_check)
    show = pol_commands.add_parser("show", help="print a policy in canonical TOML")
    show.add_argument("name", metavar="NAME|FILE")
    show.add_argument("--policies-dir", type=Path)
    show.set_defaults(func=cmd_policy_show)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from fse.core.policy import PolicyError, load_policy_file

    try:
        policy = load_policy_file(args.file)
    except PolicyError as exc:
        raise InputError(str(exc)) from None
    print(f"{args.file}: ok: policy {policy.name} sha256 {policy.sha256}")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = resolve_policy(args.name, args.policies_dir)
    sys.stdout.write(f"# sha256 {policy.sha256}\n{policy.to_toml()}")
    return 0
