"""64 concurrent oversized prompts against a running stream: latency and memory.

An attacker (or a buggy client) sends 64 prompts of ~1 MiB at once while one honest
stream is generating. The daemon must refuse them (overload first, then size, before
any full tokenization) without slowing the honest stream or keeping the memory.

Rounds interleave a quiet run (the honest stream alone) with a burst run (the same
stream, the 64 prompts fired at its 20th token); medians over rounds:
  - the honest stream's token gaps, p50 and max, quiet vs burst;
  - the daemon's RSS (VmRSS) before and after the burst, and its peak (VmHWM);
  - the RSS before the first burst and after the last (what bursts keep adds up).

    .venv/bin/python bench/bench_oversized.py [--rounds 3] [--burst 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import SINGLE_PROMPT, start_daemon, stream_stamps
from fse_client.v1 import fse_pb2, fse_pb2_grpc

N_TOKENS = 150
FIRE_AT = 20


def rss_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def honest_gaps(addr: str, burst: int) -> tuple[list[float], collections.Counter[str]]:
    """The honest stream's gaps; with burst > 0, that many ~1 MiB prompts at token 20."""
    big = fse_pb2.GenerateClientMessage(
        start=fse_pb2.GenerateRequest(prompt="a " * (500 << 10), max_tokens=8)
    )
    outcomes: collections.Counter[str] = collections.Counter()

    async def send_big(stub: fse_pb2_grpc.GuardStub) -> None:
        try:
            async for _ in stub.Generate(iter([big])):
                pass
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        tasks: list[asyncio.Task[None]] = []

        def fire(count: int) -> None:
            if count == FIRE_AT:
                tasks.extend(asyncio.create_task(send_big(stub)) for _ in range(burst))

        stamps = await stream_stamps(stub, SINGLE_PROMPT, N_TOKENS, fire)
        await asyncio.gather(*tasks)
    return [b - a for a, b in itertools.pairwise(stamps)], outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--daemon-python",
        help="the python whose `-m fse.cli serve` to measure (default: this one); "
        "e.g. another checkout's .venv/bin/python, to compare two versions",
    )
    args = parser.parse_args()
    quiet_p50, quiet_max, burst_p50, burst_max = [], [], [], []
    rss_before, rss_after, peak_added = [], [], []
    outcomes: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        python = args.daemon_python or sys.executable
        process, addr, _ = start_daemon(Path(tmp), args.threads, python)
        try:
            asyncio.run(honest_gaps(addr, 0))  # warm-up
            for _ in range(args.rounds):
                gaps, _ = asyncio.run(honest_gaps(addr, 0))
                quiet_p50.append(statistics.median(gaps))
                quiet_max.append(max(gaps))
                before, peak = rss_mib(process.pid, "VmRSS"), rss_mib(process.pid, "VmHWM")
                gaps, seen = asyncio.run(honest_gaps(addr, args.burst))
                outcomes.update(seen)
                burst_p50.append(statistics.median(gaps))
                burst_max.append(max(gaps))
                rss_before.append(before)
                rss_after.append(rss_mib(process.pid, "VmRSS"))
                peak_added.append(rss_mib(process.pid, "VmHWM") - peak)
        finally:
            process.terminate()
            process.wait()
    med = statistics.median
    print(f"{args.burst} concurrent ~1 MiB prompts at token {FIRE_AT} of a running stream, "
          f"{args.rounds} rounds, medians:")  # fmt: skip
    print(f"  refusals by code (all rounds): {dict(outcomes)}")
    print(
        f"  honest stream gap p50: quiet {1e3 * med(quiet_p50):.1f} ms, "
        f"burst {1e3 * med(burst_p50):.1f} ms (x{med(burst_p50) / med(quiet_p50):.2f})"
    )
    print(
        f"  honest stream gap max: quiet {1e3 * med(quiet_max):.1f} ms, "
        f"burst {1e3 * med(burst_max):.1f} ms (x{med(burst_max) / med(quiet_max):.2f})"
    )
    print(
        f"  daemon RSS: {med(rss_before):.0f} MiB before, {med(rss_after):.0f} MiB after "
        f"(+{med(rss_after) - med(rss_before):.0f}); peak raised by {med(peak_added):.0f} MiB"
    )
    # Memory a burst keeps adds up over the rounds: the medians above would hide it.
    rounds = ", ".join(f"{a:.0f}->{b:.0f}" for a, b in zip(rss_before, rss_after, strict=True))
    print(
        f"  daemon RSS over all {args.rounds} bursts: {rss_before[0]:.0f} MiB before the first, "
        f"{rss_after[-1]:.0f} MiB after the last (+{rss_after[-1] - rss_before[0]:.0f}); "
        f"each burst, before->after: {rounds}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
