"""`fse calibrate`: the flags, their checks, and the files written (fse.tools.calibrate
measures and chooses the thresholds). Also the runner both tool commands open."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from fse.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    add_generation_flags,
    add_local_flags,
    load_model,
    positive,
    resolve_policy,
    sampling_from_args,
)
from fse.core.errors import InputError
from fse.tools import calibrate as cal
from fse.tools.runner import LocalRunner, RemoteRunner, RunError, Runner, write_atomic


def add_parser(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "calibrate",
        help="measure a model's healthy metrics and write a policy calibrated for it",
        description=(
            "Run healthy generations (a built-in prompt set or --corpus) at the given "
            "sampling settings, record every metric at every step, and write a policy "
            "whose thresholds sit at --quantile x --margin, clamped to hard limits."
        ),
    )
    p.add_argument("--addr", help="daemon address (unix:PATH or HOST:PORT); default: in-process")
    p.add_argument(
        "--corpus",
        type=Path,
        help="prompts: one per line, or JSONL ({'prompt': ...} or {'messages': [...]}) "
        "for a .jsonl file (default: the built-in set of 40)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="policy file to write (e.g. calibrated.toml)"
    )
    p.add_argument(
        "--name", help="policy name (default: the --out file name without .toml, e.g. calibrated)"
    )
    add_generation_flags(p)
    add_local_flags(p)
    p.set_defaults(policy="pro", max_tokens=cal.DEFAULT_MAX_TOKENS)
    helps = {
        "policy": "base policy: its guards are the ones calibrated (pro)",
        "max_tokens": f"tokens per generation at most ({cal.DEFAULT_MAX_TOKENS})",
        "seed": "first seed: generation i uses seed + i (0)",
    }
    for action in p._actions:  # the shared flags, with this command's defaults
        if action.dest in helps:
            action.help = helps[action.dest]
    p.add_argument(
        "--samples", type=int, default=1, help="generations per prompt, seeds seed.. (1)"
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=cal.QUANTILE,
        help=f"healthy quantile the thresholds sit at ({cal.QUANTILE})",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=cal.MARGIN,
        help=f"factor beyond that quantile ({cal.MARGIN})",
    )
    p.add_argument(
        "--metrics-out", type=Path, help="also write the raw per-step metrics here (JSON)"
    )
    p.set_defaults(func=cmd_calibrate)


def open_runner(args: argparse.Namespace) -> Runner:
    """The in-process runner (--model, --threads, --verbose), or the daemon's (--addr)."""
    if args.addr:
        if args.model is not None:
            raise InputError("--model: not used with --addr (the daemon owns the model)")
        return RemoteRunner(args.addr)
    positive("--threads", args.threads)
    return LocalRunner(load_model(args.model, args.verbose), args.threads)


def check_writable_file(path: Path, flag: str) -> None:
    """Fail before a long run, not after it, when `path` cannot be written."""
    if path.exists() and not path.is_file():
        raise InputError(f"{flag}: {path}: exists and is not a regular file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{flag}: {path}: directory {parent} does not exist")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise InputError(f"{flag}: {path}: not writable")


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except RunError as exc:
        print(f"fse calibrate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _calibrate(args: argparse.Namespace) -> int:
    from fse.core.policy import Policy, PolicyError

    if args.max_tokens < 1:
        raise InputError(f"--max-tokens: {args.max_tokens} is invalid; accepted: >= 1")
    if not 1 <= args.samples <= 1000:
        raise InputError(f"--samples: {args.samples} is invalid; accepted: 1..1000")
    if not (math.isfinite(args.quantile) and 0.5 <= args.quantile < 1):
        raise InputError(f"--quantile: {args.quantile} is invalid; accepted: 0.5 <= q < 1")
    if not (math.isfinite(args.margin) and 1 <= args.margin <= 100):
        raise InputError(f"--margin: {args.margin} is invalid; accepted: 1 <= margin <= 100")
    sampling = sampling_from_args(args)
    base_seed = 0 if args.seed is None else args.seed
    if not 0 <= base_seed < 2**32:
        raise InputError(f"--seed: {base_seed} is invalid; accepted: 0 <= seed < 2^32")
    base = resolve_policy(args.policy, args.policies_dir, "--policy")
    name = args.name if args.name is not None else cal.policy_name_for(args.out)
    try:
        Policy(name=name)
    except PolicyError as exc:
        raise InputError(f"--name: {exc}".replace("name: ", "", 1)) from None
    check_writable_file(args.out, "--out")
    if args.metrics_out is not None:
        check_writable_file(args.metrics_out, "--metrics-out")
    prompts = cal.read_corpus(args.corpus) if args.corpus is not None else cal.builtin_prompts()
    corpus_label = str(args.corpus) if args.corpus is not None else "built-in prompt set"

    runner = open_runner(args)
    try:
        runs = cal.collect(
            runner,
            prompts,
            samples=args.samples,
            max_tokens=args.max_tokens,
            sampling=sampling,
            base_seed=base_seed,
            progress="calibrate",
        )
    finally:
        runner.close()

    settings = cal.settings_text(sampling)
    description = cal.description_text(
        runner.model_name,
        len(runs),
        corpus_label,
        settings,
        args.max_tokens,
        args.quantile,
        args.margin,
        base,
    )
    result = cal.calibrate_policy(
        runs,
        base,
        name=name,
        n_vocab=runner.n_vocab,
        q=args.quantile,
        margin=args.margin,
        description=description,
    )
    text = cal.policy_file_text(result, runs, runner.model_name, settings)
    write_atomic(args.out, text, "--out")
    if args.metrics_out is not None:
        write_atomic(args.metrics_out, json.dumps(cal.metrics_json(runs)) + "\n", "--metrics-out")
    print("\n".join(cal.report_lines(result, runs, runner.model_name, settings)))
    print(f"wrote {args.out}: policy {result.policy.name} sha256 {result.policy.sha256}")
    print(f"check it with: fse policy check {args.out}")
    return EXIT_OK
