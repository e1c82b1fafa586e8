"""`guarded-generate`: the example every client language ships, on fse_client.

Same flags, output and exit codes as `fse generate --addr` (clients/README.md):
exit 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

import grpc

from fse_client import jsonlines
from fse_client.client import Client
from fse_client.errors import FseError
from fse_client.types import Info, Sampling, Status, TokenEvent, Verdict

PROG = "guarded-generate"
EXIT_ERROR, EXIT_USAGE = 1, 2
EXIT_CODES = {Status.COMPLETED: 0, Status.HALTED: 3, Status.CANCELLED: 4}
COLOURS = {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31m"}
RESET = "\x1b[0m"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Guarded generation from a libfse daemon.")
    p.add_argument("--addr", required=True, help="unix:PATH or HOST:PORT")
    p.add_argument("--tls-ca", metavar="FILE", help="TLS, checking the server against this CA")
    p.add_argument("--tls-cert", metavar="FILE", help="mutual TLS: the client certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="mutual TLS: its private key (PEM)")
    p.add_argument("--token-file", metavar="FILE", help="bearer token (first line of FILE)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("--info", action="store_true", help="print the daemon's Info as JSON")
    p.add_argument("--policy", default="", help="policy name (the daemon's default)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT")
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    p.add_argument("--cancel-after", type=int, metavar="N")
    p.add_argument("prompt", nargs="?", default="")
    return p


def _usage(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _check(args: argparse.Namespace) -> None:
    if not args.info and not args.prompt:
        _usage("PROMPT: must not be empty")
    if args.max_tokens < 1:
        _usage(f"--max-tokens: {args.max_tokens} is invalid; accepted: >= 1")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        _usage(f"--timeout: {args.timeout} is invalid; accepted: seconds > 0")
    if args.cancel_after is not None and args.cancel_after < 1:
        _usage(f"--cancel-after: {args.cancel_after} is invalid; accepted: >= 1")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        _usage(f"--seed: {args.seed} is invalid; accepted: 0 .. 2^32-1")
    if args.tls_cert is not None and args.tls_key is None:
        _usage("--tls-key: required with --tls-cert")
    if args.tls_key is not None and args.tls_cert is None:
        _usage("--tls-cert: required with --tls-key")
    if args.tls_cert is not None and args.tls_ca is None:
        _usage("--tls-ca: required with --tls-cert and --tls-key (mutual TLS is TLS)")


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        _usage(f"{flag}: {path}: cannot read: {exc.strerror or exc}")


def token_json(e: TokenEvent) -> dict[str, Any]:
    return jsonlines.token_json(
        index=e.index,
        id=e.id,
        text=e.text,
        nll=e.nll,
        ppl=e.ppl,
        variance=e.variance,
        max_prob=e.max_prob,
        l2_norm=e.l2_norm,
        entropy=e.entropy,
        health=None if e.health is None else e.health.value,
        warnings=[(w.guard, w.value, w.threshold) for w in e.warnings],
    )


def verdict_json(v: Verdict) -> dict[str, Any]:
    return jsonlines.verdict_json(
        status=v.status.value,
        completion=None if v.completion is None else v.completion.value,
        guard=v.guard,
        value=v.value,
        threshold=v.threshold,
        token_index=v.token_index,
        tokens=v.tokens,
        text=v.text,
        policy=v.policy,
        policy_sha256=v.policy_sha256,
        message=v.message,
    )


def verdict_line(v: Verdict) -> str:
    policy = f"policy {v.policy} ({v.policy_sha256[:12]})"
    if v.status == Status.HALTED:
        value = "n/a" if v.value is None else f"{v.value:.6g}"
        threshold = "n/a" if v.threshold is None else f"{v.threshold:.6g}"
        index = "n/a" if v.token_index is None else v.token_index
        what = f"halted by {v.guard}: value {value}, threshold {threshold}, at token {index}"
    elif v.status == Status.COMPLETED and v.completion is not None:
        what = f"completed at {v.completion.value}"
    else:
        what = v.status.value
    detail = f": {v.message}" if v.message else ""
    return f"[{what}{detail}] {v.tokens} tokens released · {policy}"


def info_json(info: Info) -> dict[str, Any]:
    return dataclasses.asdict(info)


def _emit(out: IO[str], doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    out.flush()


def run(args: argparse.Namespace) -> int:
    token = _read("--token-file", args.token_file)
    ca = _read("--tls-ca", args.tls_ca)
    cert = _read("--tls-cert", args.tls_cert)
    key = _read("--tls-key", args.tls_key)
    secret = None
    if token is not None:
        lines = token.decode("utf-8", "replace").strip().splitlines()
        if not lines or not lines[0].strip():
            _usage(f"--token-file: {args.token_file}: empty; accepted: the token on the first line")
        secret = lines[0].strip()
    try:
        client = Client(args.addr, tls_ca=ca, tls_cert=cert, tls_key=key, token=secret)
    except ValueError as exc:
        _usage(f"--addr: {exc}")
    colour = not args.json and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    with client:
        if args.info:
            _emit(sys.stdout, info_json(client.info()))
            return 0
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
        generation = client.generate(
            args.prompt,
            max_tokens=args.max_tokens,
            sampling=sampling,
            policy=args.policy,
            stop=args.stop,
            timeout=args.timeout,
        )
        signal.signal(signal.SIGINT, lambda *_: generation.cancel())
        tokens = 0
        for event in generation:
            if isinstance(event, TokenEvent):
                tokens += 1
                if args.json:
                    _emit(sys.stdout, token_json(event))
                else:
                    text = event.text
                    if colour and event.health is not None:
                        text = f"{COLOURS[event.health.value]}{text}{RESET}"
                    sys.stdout.write(text)
                    sys.stdout.flush()
                if tokens == args.cancel_after:
                    generation.cancel()
                continue
            if args.json:
                _emit(sys.stdout, verdict_json(event))
            else:
                print(flush=True)
                print(verdict_line(event), file=sys.stderr, flush=True)
            verdict = event
        return EXIT_CODES.get(verdict.status, EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    try:
        return run(args)
    except FseError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
