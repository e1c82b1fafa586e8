"""`fse model path`: assemble the embedded default model (once) and print its path."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fse.cli.common import EXIT_ERROR


def add_parser(commands: Any) -> None:
    model = commands.add_parser("model", help="the embedded default model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    path = model_commands.add_parser("path", help="assemble (once) and print its path")
    path.set_defaults(func=cmd_model_path)


def cmd_model_path(args: argparse.Namespace) -> int:
    from fse.core.gguf import ModelError, default_model_path

    try:
        print(default_model_path())
    except ModelError as exc:
        print(f"fse: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0
