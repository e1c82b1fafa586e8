"""What every command shares: exit codes, the one bad-usage error, common flags and
the checks that turn flag values into domain values."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fse.core.engine import MAX_THREADS
from fse.core.errors import InputError
from fse.core.types import Status, Verdict

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HALTED = 3
EXIT_CANCELLED = 4


def int_or_word(text: str) -> int | str:
    """A flag that takes a count or a word (--gpu-layers 20|all|auto)."""
    return int(text) if text.strip().isdigit() else text


def flag_message(message: str) -> str:
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


def sampling_from_args(args: argparse.Namespace) -> Any:
    from fse.core.types import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    try:
        sampling.validate()
    except ValueError as exc:
        raise InputError(flag_message(str(exc))) from None
    return sampling


def request_from_args(args: argparse.Namespace) -> Any:
    from fse.core.types import Request

    if not args.prompt:
        raise InputError("prompt: must not be empty")
    # argv that is not UTF-8 arrives as lone surrogates, which cannot be tokenized.
    for what, text in [("prompt", args.prompt), *(("--stop", s) for s in args.stop)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{what}: not valid UTF-8; accepted: UTF-8 text") from None
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens: {args.max_tokens} is invalid; accepted: >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise InputError(f"--timeout: {args.timeout} is invalid; accepted: seconds > 0")
    return Request(
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        sampling=sampling_from_args(args),
        policy=args.policy,
        stop=tuple(args.stop),
        timeout=args.timeout,
    )


def resolve_policy(name: str, policies_dir: Path | None, flag: str = "") -> Any:
    from fse.core.policy import PolicyError, resolve_policy

    try:
        return resolve_policy(name, policies_dir)
    except PolicyError as exc:
        raise InputError(f"{flag}: {exc}" if flag else str(exc)) from None


def load_model(path: Path | None, verbose: bool) -> Any:
    from fse.core.gguf import ModelError, default_model_path
    from fse.core.model import Model

    try:
        return Model(path if path is not None else default_model_path(), verbose=verbose)
    except ModelError as exc:
        # "model: PATH: why" names the flag the user gave: "--model: PATH: why".
        raise InputError(flag_message(str(exc)) if path is not None else str(exc)) from None


def positive(flag: str, value: int, high: int | None = None) -> int:
    if value < 1 or (high is not None and value > high):
        accepted = f"1..{high}" if high is not None else ">= 1"
        raise InputError(f"{flag}: {value} is invalid; accepted: {accepted}")
    return value


def exit_code(verdict: Verdict) -> int:
    """0 completed, 3 halted, 4 cancelled, 1 error (every other status)."""
    codes = {
        Status.COMPLETED: EXIT_OK,
        Status.HALTED: EXIT_HALTED,
        Status.CANCELLED: EXIT_CANCELLED,
    }
    return codes.get(verdict.status, EXIT_ERROR)
