"""The `fse` command line: generate, policy, model (and, in later modules, serve).

Exit codes: 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage.
Every bad input ends in one line naming the flag or field and what it accepts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fse import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2
# ggml's GGML_MAX_N_THREADS; far more threads make llama.cpp abort (std::bad_alloc).
MAX_THREADS = 512


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _flag_message(message: str) -> str:
    """'top_p: ...' (a field name, as the domain reports it) -> '--top-p: ...'."""
    field, sep, rest = message.partition(":")
    if sep and field.isidentifier():
        return f"--{field.replace('_', '-')}:{rest}"
    return message


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and the commands that run generations."""
    p.add_argument(
        "--policy",
        default="default",
        metavar="NAME|FILE",
        help="built-in policy (default, pro), a name in --policies-dir, or a TOML file",
    )
    p.add_argument("--policies-dir", type=Path, help="directory of extra NAME.toml policies")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (0.05)")
    p.add_argument("--seed", type=int, help="sampling seed (random if not given)")


def add_local_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument(
        "--threads",
        type=int,
        default=min(os.cpu_count() or 2, MAX_THREADS),
        help="CPU threads for llama.cpp (all cores)",
    )
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fse", description="libfse: guarded LLM token streams.")
    parser.add_argument("--version", action="version", version=f"fse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        help="debug only: inject a fault (nan@K, inf@K, scale@K:F, guard-error@K)",
    )
    gen.set_defaults(func=cmd_generate)

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

    aud = commands.add_parser("audit", help="check an audit log")
    aud_commands = aud.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = aud_commands.add_parser(
        "verify", help="check the hash chain; names the first line that breaks it"
    )
    verify.add_argument("file", type=Path)
    verify.set_defaults(func=cmd_audit_verify)

    pol = commands.add_parser("policy", help="check or show guard policies")
    pol_commands = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = pol_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_policy_check)
    show = pol_commands.add_parser("show", help="print a policy in canonical TOML")
    show.add_argument("name", metavar="NAME|FILE")
    show.add_argument("--policies-dir", type=Path)
    show.set_defaults(func=cmd_policy_show)

    model = commands.add_parser("model", help="the embedded default model")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    path = model_commands.add_parser("path", help="assemble (once) and print its path")
    path.set_defaults(func=cmd_model_path)

    from fse import calibrate, experiment

    calibrate.add_parser(commands)
    experiment.add_parser(commands)
    return parser


def sampling_from_args(args: argparse.Namespace) -> Any:
    from fse.engine import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    try:
        sampling.validate()
    except ValueError as exc:
        raise UsageError(_flag_message(str(exc))) from None
    return sampling


def request_from_args(args: argparse.Namespace) -> Any:
    from fse.stream import Request

    if not args.prompt:
        raise UsageError("prompt: must not be empty")
    # argv that is not UTF-8 arrives as lone surrogates, which cannot be tokenized.
    for what, text in [("prompt", args.prompt), *(("--stop", s) for s in args.stop)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{what}: not valid UTF-8; accepted: UTF-8 text") from None
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens: {args.max_tokens} is invalid; accepted: >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout: {args.timeout} is invalid; accepted: seconds > 0")
    return Request(
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        sampling=sampling_from_args(args),
        policy=args.policy,
        stop=tuple(args.stop),
        timeout=args.timeout,
    )


def resolve_policy(name: str, policies_dir: Path | None, flag: str = "") -> Any:
    from fse.policy import PolicyError, resolve_policy

    try:
        return resolve_policy(name, policies_dir)
    except PolicyError as exc:
        raise UsageError(f"{flag}: {exc}" if flag else str(exc)) from None


def load_model(path: Path | None, verbose: bool) -> Any:
    from fse.engine import Model
    from fse.models import ModelError, default_model_path

    try:
        return Model(path if path is not None else default_model_path(), verbose=verbose)
    except ModelError as exc:
        # "model: PATH: why" names the flag the user gave: "--model: PATH: why".
        raise UsageError(_flag_message(str(exc)) if path is not None else str(exc)) from None


def local_events(args: argparse.Namespace, request: Any, cancel: threading.Event) -> Iterator[Any]:
    from fse.engine import Context, Faults
    from fse.service import InvalidRequest, prompt_tokens, run_local

    try:
        faults = Faults.parse(args.debug_fault)
    except ValueError as exc:
        raise UsageError(f"--debug-fault: {exc}") from None
    _positive("--threads", args.threads, MAX_THREADS)
    policy = resolve_policy(request.policy, args.policies_dir, "--policy")
    with load_model(args.model, args.verbose) as model:
        try:
            needed = len(prompt_tokens(model, request)) + request.max_tokens
        except InvalidRequest as exc:
            raise UsageError(str(exc)) from None
        if needed > model.n_ctx_train:
            raise UsageError(
                f"--max-tokens: prompt plus {request.max_tokens} tokens exceed the model's "
                f"context of {model.n_ctx_train} tokens"
            )
        n_ctx = min(model.n_ctx_train, max(512, -(-needed // 256) * 256))
        with Context(model, n_ctx=n_ctx, n_threads=args.threads) as ctx:
            yield from run_local(model, ctx, request, policy, faults=faults, cancel=cancel)


def cmd_generate(args: argparse.Namespace) -> int:
    from fse.render import HumanRenderer, JsonRenderer

    request = request_from_args(args)
    renderer = JsonRenderer(sys.stdout) if args.json else HumanRenderer(sys.stdout, sys.stderr)
    cancel = threading.Event()

    def on_interrupt(signum: int, frame: object) -> None:
        # First Ctrl-C cancels cleanly (verdict `cancelled`, exit 4); a second one kills.
        cancel.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGINT, on_interrupt)
    if args.addr:
        from fse.client import ClientError, remote_events

        events = remote_events(args.addr, request, cancel, args.debug_fault)
        try:
            return render(events, renderer)
        except ClientError as exc:
            if exc.code is not None and exc.code.name == "INVALID_ARGUMENT":
                raise UsageError(str(exc).removeprefix("INVALID_ARGUMENT: ")) from None
            print(f"fse generate: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return render(local_events(args, request, cancel), renderer)


def render(events: Iterator[Any], renderer: Any) -> int:
    from fse.stream import TokenEvent

    for event in events:
        if isinstance(event, TokenEvent):
            renderer.token(event)
        else:
            renderer.verdict(event)
            return int(event.exit_code)
    raise RuntimeError("the stream ended without a verdict")


def _positive(flag: str, value: int, high: int | None = None) -> int:
    if value < 1 or (high is not None and value > high):
        accepted = f"1..{high}" if high is not None else ">= 1"
        raise UsageError(f"{flag}: {value} is invalid; accepted: {accepted}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from fse.scheduler import Limits
    from fse.server import ServeConfig, run

    max_streams = _positive("--max-streams", args.max_streams, 256)
    ctx = _positive("--ctx-per-stream", args.ctx_per_stream, 1 << 20)
    if args.max_queue < 0:
        raise UsageError(f"--max-queue: {args.max_queue} is invalid; accepted: >= 0")
    max_tokens = ctx - 1 if args.max_tokens_limit is None else args.max_tokens_limit
    _positive("--max-tokens-limit", max_tokens, ctx - 1)
    _positive("--threads", args.threads, MAX_THREADS)
    if not args.drain_seconds >= 0:
        raise UsageError(f"--drain-seconds: {args.drain_seconds} is invalid; accepted: >= 0")
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


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from fse.audit import verify

    try:
        result = verify(args.file)
    except OSError as exc:
        raise UsageError(f"{args.file}: cannot read: {exc.strerror or exc}") from None
    if not result.ok:
        print(f"{args.file}: BROKEN: {result.problem}; lines 1..{result.lines} are intact")
        return EXIT_ERROR
    head = result.head
    print(f"{args.file}: ok: {result.lines} lines, last seq {head.seq} sha256 {head.hash}")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from fse.policy import PolicyError, load_policy_file

    try:
        policy = load_policy_file(args.file)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.file}: ok: policy {policy.name} sha256 {policy.sha256}")
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = resolve_policy(args.name, args.policies_dir)
    sys.stdout.write(f"# sha256 {policy.sha256}\n{policy.to_toml()}")
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from fse.models import ModelError, default_model_path

    try:
        print(default_model_path())
    except ModelError as exc:
        print(f"fse: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"fse {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
