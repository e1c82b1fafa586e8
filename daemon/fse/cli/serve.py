"""`fse serve`: run the guard daemon; `fse config check`: validate a config file.

Every serve flag is a key of the config file (fse.serve.config.KEYS); a flag given on
the command line overrides the file. Flags default to None so that "not given" is
visible and the file's value (or the key's default) stands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fse.cli.common import int_or_word
from fse.serve.config import KEYS, Key, Settings, load, to_toml

# How each kind of key reads from argv.
_FLAG_TYPES: dict[Any, Any] = {int: int, float: float, str: str, int | str: int_or_word}


def _add_key_flag(p: argparse.ArgumentParser, key: Key) -> None:
    help_text = f"{key.accepted} (config {key.dotted}; default {key.default!r})"
    if key.kind is bool:
        p.add_argument(key.flag, action="store_true", default=None, help=help_text)
    elif key.kind is list:
        metavar = key.metavar or "unix:PATH|HOST:PORT"
        p.add_argument(key.flag, action="append", default=None, metavar=metavar, help=help_text)
    else:
        p.add_argument(key.flag, type=_FLAG_TYPES[key.kind], default=None, help=help_text)


def add_parser(commands: Any) -> None:
    srv = commands.add_parser(
        "serve",
        help="run the guard daemon (gRPC, and an OpenAI-compatible HTTP API with --http-listen)",
        description="Serve guarded generation over gRPC (and, with --http-listen, an "
        "OpenAI-compatible HTTP API). Settings come from --config (TOML), then from the "
        "flags below, which win.",
    )
    srv.add_argument(
        "--config", type=Path, help="TOML config file (the service: /etc/fse/fse.toml)"
    )
    for key in KEYS:
        if key.flag:
            _add_key_flag(srv, key)
    srv.add_argument("--verbose", action="store_true", help="show llama.cpp's own log on stderr")
    srv.add_argument(
        "--allow-debug-faults",
        action="store_true",
        help="debug only: honour fault injection requested in call metadata",
    )
    srv.set_defaults(func=cmd_serve)

    cfg = commands.add_parser("config", help="check a daemon config file")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = cfg_commands.add_parser(
        "check", help="validate a config file and print the effective settings"
    )
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The file named by --config (if any), overridden by every flag that was given."""
    overrides = {}
    for key in KEYS:
        if not key.flag:
            continue
        value = getattr(args, key.flag.removeprefix("--").replace("-", "_"))
        if value is None:
            continue
        overrides[key.dotted] = str(value) if isinstance(value, Path) else value
    return load(
        args.config,
        overrides,
        allow_debug_faults=args.allow_debug_faults,
        verbose=args.verbose,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from fse.serve.daemon import run

    return run(settings_from_args(args))


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load(args.file, {})
    sys.stdout.write(f"# {args.file}: ok; the effective settings:\n{to_toml(settings)}")
    return 0
