"""`fse experiment`: the flags, their checks, and the run (fse.tools.experiment runs
the suite and writes the reports and plots)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.cli.calibrate import open_runner
from fse.cli.common import EXIT_ERROR, EXIT_OK, add_local_flags, resolve_policy
from fse.core.errors import InputError
from fse.tools import experiment as ex
from fse.tools.runner import Progress, RunError

if TYPE_CHECKING:
    from fse.core.policy import Policy

DEFAULT_POLICIES = ("default", "pro")
DEFAULT_OUT = "fse-experiment"


def add_parser(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "experiment",
        help="run the status-report prompt suite under policies; write a table and plots",
        description=(
            "Run a prompt suite (factual, creative, nonsense, loop, degeneration, simulated "
            "fault, ...) under each policy with several seeds, and write report.md, "
            "report.json, ppl.png and metrics.png into --out."
        ),
    )
    p.add_argument("--addr", help="daemon address (unix:PATH or HOST:PORT); default: in-process")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME|FILE",
        help="policy to compare (repeatable; default: default and pro)",
    )
    p.add_argument("--policies-dir", type=Path, help="directory of extra NAME.toml policies")
    p.add_argument(
        "--suite", type=Path, help="suite TOML (default: the built-in status-report suite)"
    )
    p.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory ({DEFAULT_OUT})"
    )
    p.add_argument("--seeds", type=int, help="seeds per prompt (default: the suite's, 3)")
    p.add_argument(
        "--seed", type=int, default=1, help="first seed; prompt runs use seed, seed+1, ... (1)"
    )
    p.add_argument(
        "--max-tokens", type=int, help="tokens per run at most (default: the suite's, 96)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip ppl.png and metrics.png")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the unguarded reference runs drawn in the plots",
    )
    add_local_flags(p)
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        return _experiment(args)
    except RunError as exc:
        print(f"fse experiment: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fse-write-test-{id(out)}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out: {out}: not writable: {exc.strerror or exc}") from None


def _experiment(args: argparse.Namespace) -> int:
    if args.seeds is not None and not 1 <= args.seeds <= 1000:
        raise InputError(f"--seeds: {args.seeds} is invalid; accepted: 1..1000")
    if args.max_tokens is not None and not 1 <= args.max_tokens <= 8192:
        raise InputError(f"--max-tokens: {args.max_tokens} is invalid; accepted: 1..8192")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed: {args.seed} is invalid; accepted: 0 <= seed < 2^32")
    suite = ex.load_suite(args.suite) if args.suite is not None else ex.builtin_suite()
    policies: list[Policy] = []
    for name in args.policy or DEFAULT_POLICIES:
        policy = resolve_policy(name, args.policies_dir, "--policy")
        if any(p.name == policy.name for p in policies):
            raise InputError(f"--policy: {name!r}: a policy named {policy.name!r} is given twice")
        policies.append(policy)
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
            print(
                "fse experiment: matplotlib is not installed; writing the reports without "
                "ppl.png and metrics.png (pip install 'fse[plot]')",
                file=sys.stderr,
            )
    _prepare_out(args.out)
    seeds = args.seeds or suite.seeds

    started = time.monotonic()
    runner = open_runner(args)
    try:
        reference = not args.no_reference
        progress = Progress(ex.run_count(suite, policies, seeds, reference), "experiment")
        cells = ex.run_suite(
            runner,
            suite,
            policies,
            seeds=seeds,
            max_tokens=args.max_tokens,
            base_seed=args.seed,
            reference=reference,
            progress=progress,
        )
    finally:
        runner.close()
    seconds = time.monotonic() - started

    doc = ex.report_doc(
        cells,
        suite,
        policies,
        runner,
        seeds=seeds,
        base_seed=args.seed,
        max_tokens=args.max_tokens,
        seconds=seconds,
        command=_command_line(args),
        plots=plots,
    )
    out: Path = args.out
    ex.write_reports(out, doc, suite, policies)
    if plots:
        ex.write_plots(cells, suite, policies, out, args.max_tokens)
    print(ex.summary_text(doc))
    written = ["report.md", "report.json"] + (["ppl.png", "metrics.png"] if plots else [])
    print(f"wrote {', '.join(str(out / f) for f in written)}")
    return EXIT_OK


def _command_line(args: argparse.Namespace) -> str:
    parts = ["fse", "experiment"]
    for p in args.policy or []:
        parts += ["--policy", p]
    if args.policies_dir is not None:
        parts += ["--policies-dir", str(args.policies_dir)]
    if args.suite is not None:
        parts += ["--suite", str(args.suite)]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.seed != 1:
        parts += ["--seed", str(args.seed)]
    if args.max_tokens is not None:
        parts += ["--max-tokens", str(args.max_tokens)]
    if args.no_reference:
        parts.append("--no-reference")
    if args.no_plots:
        parts.append("--no-plots")
    if args.addr:
        parts += ["--addr", args.addr]
    if args.model is not None:
        parts += ["--model", str(args.model)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)
