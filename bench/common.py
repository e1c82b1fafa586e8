"""Shared helpers for the benchmarks: llama.cpp's own tools, medians, RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def llama_tools_dir() -> Path:
    """llama-bench and llama-batched-bench, built once from the same pinned source."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "native" / "libllama.py"), "--tools"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def llama_bench_tg(
    model: Path, threads: int, n_gen: int = 64, reps: int = 1, extra: Sequence[str] = ()
) -> list[float]:
    """tokens/s of llama-bench's tg test (decode one token at a time, no sampling);
    `extra`: more flags (-ngl 99)."""
    return _llama_bench(model, threads, ["-p", "0", "-n", str(n_gen), *extra], reps)


def llama_bench_pp(model: Path, threads: int, n_prompt: int = 512, reps: int = 1) -> list[float]:
    """tokens/s of llama-bench's pp test (one prompt of n_prompt tokens, batched)."""
    return _llama_bench(model, threads, ["-p", str(n_prompt), "-n", "0"], reps)


def _llama_bench(model: Path, threads: int, test: list[str], reps: int) -> list[float]:
    out = subprocess.run(
        [
            str(llama_tools_dir() / "llama-bench"),
            *("-m", str(model), "-t", str(threads), *test, "-r", str(reps), "-o", "json"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = json.loads(out.stdout)
    return [float(x) for row in rows for x in row["samples_ts"]]


def llama_batched_bench(
    model: Path,
    threads: int,
    parallel: list[int],
    n_prompt: int = 32,
    n_gen: int = 64,
    unified_kv: bool = True,
    extra: Sequence[str] = (),
) -> dict[int, float]:
    """Aggregate generation tokens/s (S_TG) of llama-batched-bench per parallelism.

    unified_kv matches the daemon's context (-kvu); without it llama.cpp keeps one
    KV buffer per sequence, its own default. `extra`: more flags (-ngl 99)."""
    n_ctx = max(parallel) * (n_prompt + n_gen) + 64
    out = subprocess.run(
        [
            str(llama_tools_dir() / "llama-batched-bench"),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-c",
            str(n_ctx),
            "-b",
            "512",
            "-ub",
            "512",
            "-npp",
            str(n_prompt),
            "-ntg",
            str(n_gen),
            "-npl",
            ",".join(map(str, parallel)),
            "--output-format",
            "jsonl",
            *(["-kvu"] if unified_kv else []),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[int, float] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            result[int(row["pl"])] = float(row["speed_tg"])
    if missing := sorted(set(parallel) - set(result)):
        raise RuntimeError(
            f"llama-batched-bench gave no result for -npl {missing}: {out.stderr[-800:]}"
        )
    return result


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_serving(
    addr: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    """Until the daemon at `addr` reports SERVING; RuntimeError naming its log if it
    exits or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start; see {log}")
            time.sleep(0.02)
