"""`fse generate`: one guarded generation, in this process (--local) or on a daemon (--addr)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fse.cli.common import (
    EXIT_ERROR,
    add_generation_flags,
    add_local_flags,
    exit_code,
    load_model,
    positive,
    request_from_args,
    resolve_policy,
)
from fse.core.engine import MAX_THREADS
from fse.core.errors import InputError
from fse.core.placement import GRAPH_STATS_MODES, graph_stats_for


def add_parser(commands: Any) -> None:
    gen = commands.add_parser("generate", help="generate guarded text for a prompt")
    gen.add_argument("prompt", help="the prompt text")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the model in this process")
    where.add_argument("--addr", help="daemon address: unix:PATH or HOST:PORT")
    add_generation_flags(gen)
    add_local_flags(gen)
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop sequence (repeatable); not included in the output",
    )
    gen.add_argument("--timeout", type=float, help="deadline in seconds (guard 'deadline')")
    gen.add_argument(
        "--json", action="store_true", help="JSON lines: one per token, then a verdict"
    )
    gen.add_argument(
        "--debug-fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="debug only: inject a fault (nan@K, inf@K, scale@K:F, guard-error@K; "
        "hang@K with --addr)",
    )
    gen.add_argument(
        "--rpc",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="with --local: an RPC worker (`fse rpc-worker`) to split the model's layers "
        "across (repeatable; docs/rpc.md)",
    )
    gen.add_argument(
        "--allow-remote-rpc",
        action="store_true",
        help="with --rpc: accept a non-loopback worker (over a tunnel: the protocol has no auth)",
    )
    gen.add_argument(
        "--rpc-stall-seconds",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --rpc: no token for this long counts as a lost worker (default 30)",
    )
    gen.add_argument(
        "--graph-stats",
        choices=GRAPH_STATS_MODES,
        default="auto",
        help="with --local: the per-step statistics in llama.cpp's graph (on), on the host "
        "(off), or in the graph when the layers are on a local GPU (auto, the default)",
    )
    gen.add_argument("--tls-ca", type=Path, metavar="FILE", help="with --addr: TLS, this CA")
    gen.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="with --tls-ca: mutual TLS, this certificate"
    )
    gen.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="with --tls-cert: its private key"
    )
    gen.add_argument(
        "--token-file", type=Path, metavar="FILE", help="with --addr: bearer token (first line)"
    )
    gen.set_defaults(func=cmd_generate)


def _read_first_line(flag: str, path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag}: {path}: cannot read: {exc}") from None
    if not lines or not lines[0].strip():
        raise InputError(f"{flag}: {path}: empty; accepted: the token on the first line")
    return lines[0].strip()


def _tls_files(args: argparse.Namespace) -> tuple[bytes | None, bytes | None, bytes | None]:
    """--tls-ca, and for mutual TLS --tls-cert with --tls-key (both or neither)."""
    if args.tls_cert is not None and args.tls_key is None:
        raise InputError("--tls-key: required with --tls-cert")
    if args.tls_key is not None and args.tls_cert is None:
        raise InputError("--tls-cert: required with --tls-key")
    if args.tls_cert is not None and args.tls_ca is None:
        raise InputError("--tls-ca: required with --tls-cert and --tls-key (mutual TLS is TLS)")
    return (
        _read_bytes("--tls-ca", args.tls_ca),
        _read_bytes("--tls-cert", args.tls_cert),
        _read_bytes("--tls-key", args.tls_key),
    )


def _read_bytes(flag: str, path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path is not None else None
    except OSError as exc:
        raise InputError(f"{flag}: {path}: cannot read: {exc.strerror}") from None


class _Released:
    """What the renderer has let out so far (main thread), for the verdict a lost RPC
    worker ends the stream with (written from the thread ggml aborts on)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.text: list[str] = []
        self.renderer: Any = None
        self.at = float("inf")  # when the last token came (or generation began)
        self._ending = threading.Lock()  # one verdict: the abort's or the stall's

    def watch(self, policy: Any, workers: str, seconds: float) -> None:
        """A stopped worker leaves llama_decode waiting for good: no token for `seconds`
        is a lost worker too (a daemon thread; the process exits from it)."""

        def run() -> None:
            while (idle := time.monotonic() - self.at) <= seconds:  # unarmed: -inf
                time.sleep(min(1.0, seconds / 4))
            self.lost(policy, f"{workers}: no answer for {idle:.1f} s")

        threading.Thread(target=run, name="fse-rpc-stall", daemon=True).start()

    def lost(self, policy: Any, message: str) -> None:
        from fse.core.stream import GuardedStream
        from fse.core.types import ERROR, INTERNAL

        if not self._ending.acquire(blocking=False):
            threading.Event().wait()  # the other one is ending the process
        stream = GuardedStream(policy)
        stream.finish(ERROR, INTERNAL, message=f"RPC worker lost: {message}")
        verdict = stream.verdict
        assert verdict is not None
        verdict.tokens, verdict.text = self.tokens, "".join(self.text)
        if self.renderer is not None:
            self.renderer.verdict(verdict)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_ERROR)


def local_events(
    args: argparse.Namespace,
    request: Any,
    cancel: threading.Event,
    released: _Released | None = None,
) -> Iterator[Any]:
    from fse.core.engine import Context
    from fse.core.faults import Faults
    from fse.core.model import devices
    from fse.core.placement import place_model
    from fse.core.runner import prompt_tokens, run_local

    try:
        faults = Faults.parse(args.debug_fault)
    except ValueError as exc:
        raise InputError(f"--debug-fault: {exc}") from None
    if faults.hang_at is not None:
        raise InputError("--debug-fault: hang@K blocks the daemon's decode thread; use --addr")
    positive("--threads", args.threads, MAX_THREADS)
    policy = resolve_policy(request.policy, args.policies_dir, "--policy")
    if args.rpc:  # the workers' devices, registered before the load splits the model
        if not 1 <= args.rpc_stall_seconds <= 3600:
            raise InputError("--rpc-stall-seconds: accepted: seconds 1..3600")
        from fse.core import rpc

        endpoints = rpc.check_endpoints(
            args.rpc, allow_remote=args.allow_remote_rpc, key="--rpc", allow="--allow-remote-rpc"
        )
        rpc.add_workers(endpoints, "--rpc")
        if released is not None:  # a worker lost mid-stream: an error verdict, exit 1
            workers = ", ".join(map(str, endpoints))
            rpc.on_abort(
                lambda message: released.lost(policy, f"{workers}: {message.rsplit(': ', 1)[-1]}")
            )
            released.watch(policy, workers, args.rpc_stall_seconds)
    with load_model(args.model, args.verbose) as model:
        try:
            needed = len(prompt_tokens(model, request)) + request.max_tokens
        except InputError as exc:
            raise InputError(str(exc)) from None
        if needed > model.n_ctx_train:
            raise InputError(
                f"--max-tokens: prompt plus {request.max_tokens} tokens exceed the model's "
                f"context of {model.n_ctx_train} tokens"
            )
        n_ctx = min(model.n_ctx_train, max(512, -(-needed // 256) * 256))
        placed = place_model(model, devices())
        graph = graph_stats_for(args.graph_stats, placed)
        with Context(model, n_ctx=n_ctx, n_threads=args.threads, graph_stats=graph) as ctx:
            if released is not None:
                released.at = time.monotonic()  # the stall clock runs from the prompt on
            yield from run_local(model, ctx, request, policy, faults=faults, cancel=cancel)


def cmd_generate(args: argparse.Namespace) -> int:
    from fse.cli.render import HumanRenderer, JsonRenderer

    request = request_from_args(args)
    renderer = JsonRenderer(sys.stdout) if args.json else HumanRenderer(sys.stdout, sys.stderr)
    cancel = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        # First Ctrl-C cancels cleanly (verdict `cancelled`, exit 4); a second one kills.
        cancel.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, on_interrupt)
    if args.addr and (args.rpc or args.allow_remote_rpc):
        raise InputError("--rpc: only with --local (a daemon has its own: fse serve --rpc)")
    if args.addr:
        from fse.tools.remote import ClientError, RemoteStream

        token = _read_first_line("--token-file", args.token_file) if args.token_file else None
        ca, cert, key = _tls_files(args)
        try:
            stream = RemoteStream(
                args.addr,
                request,
                args.debug_fault,
                tls_ca=ca,
                tls_cert=cert,
                tls_key=key,
                token=token,
            )
        except ValueError as exc:
            raise InputError(f"--addr: {exc}") from None
        signal.signal(signal.SIGINT, lambda signum, frame: stream.cancel())
        try:
            return render(iter(stream), renderer)
        except ClientError as exc:
            if exc.code.name == "INVALID_ARGUMENT":
                raise InputError(str(exc)) from None
            print(f"fse generate: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    released = _Released()
    released.renderer = renderer
    return render(local_events(args, request, cancel, released), renderer, released)


def render(events: Iterator[Any], renderer: Any, released: _Released | None = None) -> int:
    from fse.core.types import TokenEvent

    for event in events:
        if isinstance(event, TokenEvent):
            renderer.token(event)
            if released is not None:
                released.tokens += 1
                released.text.append(event.text)
                released.at = time.monotonic()
        else:
            renderer.verdict(event)
            return exit_code(event)
    raise RuntimeError("the stream ended without a verdict")
