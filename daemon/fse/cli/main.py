"""The `fse` command line. Each command is a module of this package with
`add_parser(commands)`; the commands share fse.cli.common.

Exit codes: 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage.
Every bad input ends in one line naming the flag or field and what it accepts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fse import __version__
from fse.cli import audit, calibrate, experiment, generate, model, policy, rpc_worker, serve
from fse.cli.common import EXIT_ERROR, EXIT_USAGE
from fse.core.errors import EngineError, InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fse", description="libfse: guarded LLM token streams.")
    parser.add_argument("--version", action="version", version=f"fse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, serve, rpc_worker, audit, policy, model, calibrate, experiment):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as exc:
        print(f"fse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineError as exc:  # llama.cpp failed (e.g. a context too large for memory)
        print(f"fse {args.command}: error: llama.cpp: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
