"""`fse serve`: run the guard daemon."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fse.cli.common import MAX_THREADS, add_local_flags, positive
from fse.core.errors import InputError


def add_parser(commands: Any) -> None:
    srv = commands.add_parser("serve", help="run the guard daemon (gRPC)")
    srv.add_argument(
        "--listen",
        action="append",
        metavar="unix:PATH|HOST:PORT",
        help="address to serve on (repeatable; default unix:./fse.sock)",
    )
    add_local_flags(srv)
    srv.add_argument("--policies-dir", type=Path, help="directory of extra NAME.toml policies")
    srv.add_argument(
        "--max-streams", type=int, default=8, help="streams decoded together in one batch (8)"
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="streams waiting for a slot before RESOURCE_EXHAUSTED (16)",
    )
    srv.add_argument(
        "--ctx-per-stream",
        type=int,
        default=2048,
        help="context tokens per stream, prompt included (2048)",
    )
    srv.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask (default: the context per stream)",
    )
    srv.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, let running streams finish this long (30)",
    )
    srv.add_argument(
        "--allow-debug-faults",
        action="store_true",
        help="debug only: honour fault injection requested in call metadata",
    )
    srv.add_argument(
        "--audit-log",
        type=Path,
        default=Path("fse-audit.jsonl"),
        help="append-only, hash-chained audit log (./fse-audit.jsonl)",
    )
    srv.add_argument(
        "--audit-text",
        action="store_true",
        help="record prompts and outputs as text in the audit log (default: sha256 only)",
    )
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from fse.serve.scheduler import Limits
    from fse.serve.server import ServeConfig, run

    max_streams = positive("--max-streams", args.max_streams, 256)
    ctx = positive("--ctx-per-stream", args.ctx_per_stream, 1 << 20)
    if args.max_queue < 0:
        raise InputError(f"--max-queue: {args.max_queue} is invalid; accepted: >= 0")
    max_tokens = ctx - 1 if args.max_tokens_limit is None else args.max_tokens_limit
    positive("--max-tokens-limit", max_tokens, ctx - 1)
    positive("--threads", args.threads, MAX_THREADS)
    if not args.drain_seconds >= 0:
        raise InputError(f"--drain-seconds: {args.drain_seconds} is invalid; accepted: >= 0")
    limits = Limits(max_streams, args.max_queue, ctx, max_tokens)
    config = ServeConfig(
        listen=tuple(args.listen or ["unix:fse.sock"]),
        model=args.model,
        threads=args.threads,
        limits=limits,
        policies_dir=args.policies_dir,
        allow_debug_faults=args.allow_debug_faults,
        drain_seconds=args.drain_seconds,
        verbose=args.verbose,
        audit_log=args.audit_log,
        audit_text=args.audit_text,
    )
    return run(config)
