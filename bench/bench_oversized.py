"""64 concurrent oversized prompts against a running stream: latency, memory and CPU.

An attacker (or a buggy client) sends 64 prompts of ~1 MiB at once while one honest
stream is generating. The daemon must refuse them (overload first, then size, before
any full tokenization) without slowing the honest stream or keeping the memory.

The attacker is a separate process, fired at the honest stream's 20th token: in the
honest client's process it would time that client's own event loop, busy sending
64 MiB, not the daemon. On a 2-core machine the attacker's own CPU (serializing and
writing 64 MiB) also competes with llama.cpp's two decode threads, which slows any
decode whatever the daemon does, as any busy neighbour would. So each round runs the
burst twice: from an attacker at nice 19, whose CPU comes from idle time only (what
remains is the daemon's own handling of the burst), and at nice 0 (the attacker's
CPU included); and, for scale, a busy neighbour with no request at all: one process
spinning a core for as long as the burst at nice 0 took.

Rounds interleave a quiet run (the honest stream alone) with the two burst runs;
medians over rounds:
  - the honest stream's token gaps, p50 and max, quiet vs each burst;
  - the burst's wall time and the attacker's CPU;
  - the daemon's CPU to refuse one burst while no stream runs (the decode threads'
    own CPU swings by more than a burst costs, so it is measured apart);
  - the daemon's RSS (VmRSS) before and 1 s after the burst, and its peak (VmHWM);
  - the RSS before the first burst and after the last (what bursts keep adds up).

    .venv/bin/python bench/bench_oversized.py [--rounds 3] [--burst 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import SINGLE_PROMPT, start_daemon, stream_stamps
from fse.serve.memory import TRIM_DELAY
from fse_client.v1 import fse_pb2, fse_pb2_grpc

N_TOKENS = 150
FIRE_AT = 20
TICK = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def burst(addr: str, count: int) -> dict[str, object]:
    """The attacker: `count` ~1 MiB prompts at once, each on its own stream, once told
    on stdin. Returns the outcomes by status code, the burst's wall time and its CPU."""
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
        await channel.channel_ready()
        stub = fse_pb2_grpc.GuardStub(channel)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        began, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(send_big(stub) for _ in range(count)))
        wall, end = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF)
    used = end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {"outcomes": dict(outcomes), "wall": wall, "cpu": used}


def spin(seconds: float) -> dict[str, object]:
    """The busy neighbour: no request at all, one core's worth of CPU for `seconds`,
    once told on stdin."""
    print("ready", flush=True)
    sys.stdin.readline()
    began, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - began < seconds:
        pass
    return {"outcomes": {}, "wall": seconds, "cpu": time.process_time() - cpu}


def attacker(addr: str, count: int, nice: int, spin: float = 0) -> subprocess.Popen[str]:
    """The attacker process (or with `spin`, the busy neighbour), waiting for the word."""
    role = ["--spin", str(spin)] if spin else ["--attack", addr, "--burst", str(count)]
    process = subprocess.Popen(
        # nice(1), not preexec_fn: a preexec_fn forces fork(), and gRPC's poller,
        # restarted in the forked child, can abort it before exec (grpc/grpc#43055).
        ["nice", "-n", str(nice), sys.executable, __file__, *role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the attacker process could not connect")
    return process


@dataclass
class Runs:
    """One kind of run (quiet, or a burst at one nice level), a value per round."""

    p50: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    max_at: list[int] = field(default_factory=list)  # the token that ended the longest gap
    wall: list[float] = field(default_factory=list)
    attacker_cpu: list[float] = field(default_factory=list)
    rss_before: list[float] = field(default_factory=list)
    rss_after: list[float] = field(default_factory=list)
    peak_added: list[float] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)


async def honest_stream(addr: str, process: subprocess.Popen[str] | None) -> list[float]:
    """The honest stream's token gaps; the attacker, if any, fires at token FIRE_AT."""

    def fire(count: int) -> None:
        if count == FIRE_AT and process is not None:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    async with grpc.aio.insecure_channel(addr) as channel:
        stub = fse_pb2_grpc.GuardStub(channel)
        stamps = await stream_stamps(stub, SINGLE_PROMPT, N_TOKENS, fire)
    return [b - a for a, b in itertools.pairwise(stamps)]


def run_once(
    pid: int, addr: str, burst: int, nice: int | None, into: Runs, spin: float = 0
) -> None:
    """One honest stream, alone (nice None) or with a burst from an attacker at `nice`
    (with `spin`, the busy neighbour instead)."""
    process = attacker(addr, burst, nice, spin) if nice is not None else None
    before, peak = rss_mib(pid, "VmRSS"), rss_mib(pid, "VmHWM")
    gaps = asyncio.run(honest_stream(addr, process))
    if process is not None:
        out, _ = process.communicate()
        report = json.loads(out)
        into.outcomes.update(report["outcomes"])
        into.wall.append(report["wall"])
        into.attacker_cpu.append(report["cpu"])
    time.sleep(2 * TRIM_DELAY)  # RSS once the daemon has handed the freed buffers back
    into.p50.append(statistics.median(gaps))
    into.max.append(max(gaps))
    into.max_at.append(gaps.index(max(gaps)) + 2)  # gaps[0] ends at token 2
    into.rss_before.append(before)
    into.rss_after.append(rss_mib(pid, "VmRSS"))
    into.peak_added.append(rss_mib(pid, "VmHWM") - peak)


def refusal_cpu(pid: int, addr: str, burst: int) -> float:
    """The daemon's CPU seconds to refuse one burst with no stream running: what the
    burst itself costs it, without the decode threads' share (a running stream's CPU
    swings by more than that from run to run)."""
    process = attacker(addr, burst, 0)
    cpu = cpu_seconds(pid)
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()
    process.communicate()
    time.sleep(2 * TRIM_DELAY)  # the heap trim after the burst counts too
    return cpu_seconds(pid) - cpu


def longest(runs: Runs) -> str:
    """Each round's longest gap and the token that ended it (the burst starts at 20)."""
    each = ", ".join(f"{1e3 * m:.0f}@{i}" for m, i in zip(runs.max, runs.max_at, strict=True))
    return f"by round, ms@token: {each}"


def report(
    burst: int,
    rounds: int,
    quiet: Runs,
    bursts: dict[int, Runs],
    history: list[tuple[float, float]],
    neighbour: Runs,
    refusing: list[float],
) -> None:
    med = statistics.median
    print(f"{burst} concurrent ~1 MiB prompts at token {FIRE_AT} of a running stream, "
          f"{rounds} rounds, medians:")  # fmt: skip
    q50, qmax = med(quiet.p50), med(quiet.max)
    print(f"  quiet: gap p50 {1e3 * q50:.1f} ms, max {1e3 * qmax:.1f} ms; {longest(quiet)}")
    for nice, runs in bursts.items():
        b50, bmax = med(runs.p50), med(runs.max)
        print(f"  burst from an attacker at nice {nice}: refusals {dict(runs.outcomes)}")
        print(
            f"    gap p50 {1e3 * b50:.1f} ms (x{b50 / q50:.2f}), "
            f"max {1e3 * bmax:.1f} ms (x{bmax / qmax:.2f}); {longest(runs)}"
        )
        print(
            f"    burst {1e3 * med(runs.wall):.0f} ms wall, attacker CPU "
            f"{1e3 * med(runs.attacker_cpu):.0f} ms"
        )
        print(
            f"    daemon RSS {med(runs.rss_before):.0f} MiB before, {med(runs.rss_after):.0f} "
            f"after (+{med(runs.rss_after) - med(runs.rss_before):.0f}); "
            f"peak raised by {med(runs.peak_added):.0f} MiB"
        )
    print(
        f"  daemon CPU to refuse one burst, no stream running: {1e3 * med(refusing):.0f} ms "
        f"({1e3 * med(refusing) / burst:.1f} ms a prompt); by round, ms: "
        + ", ".join(f"{1e3 * c:.0f}" for c in refusing)
    )
    n50, nmax = med(neighbour.p50), med(neighbour.max)
    print(
        f"  no burst, a busy neighbour at nice 0 instead (one core for as long as the burst "
        f"at nice 0 took, {1e3 * med(neighbour.wall):.0f} ms):"
    )
    print(
        f"    gap p50 {1e3 * n50:.1f} ms (x{n50 / q50:.2f}), "
        f"max {1e3 * nmax:.1f} ms (x{nmax / qmax:.2f}); {longest(neighbour)}"
    )
    # Memory a burst keeps adds up over the rounds: the medians above would hide it.
    first, last = history[0][0], history[-1][1]
    each = ", ".join(f"{a:.0f}->{b:.0f}" for a, b in history)
    print(
        f"  daemon RSS over all {len(history)} bursts: {first:.0f} MiB before the first, "
        f"{last:.0f} MiB after the last (+{last - first:.0f}); each, before->after: {each}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attack", metavar="ADDR", help=argparse.SUPPRESS)  # see attacker()
    parser.add_argument("--spin", type=float, help=argparse.SUPPRESS)  # see spin()
    parser.add_argument(
        "--daemon-python",
        help="the python whose `-m fse.cli serve` to measure (default: this one); "
        "e.g. another checkout's .venv/bin/python, to compare two versions",
    )
    args = parser.parse_args()
    if args.attack:
        print(json.dumps(asyncio.run(burst(args.attack, args.burst))))
        return 0
    if args.spin:
        print(json.dumps(spin(args.spin)))
        return 0
    quiet = Runs()
    bursts = {19: Runs(), 0: Runs()}
    history: list[tuple[float, float]] = []  # RSS (before, after) of every burst, in order
    neighbour = Runs()  # a busy process instead of the attacker: what any CPU load costs
    refusing: list[float] = []  # the daemon's CPU for a burst alone
    with tempfile.TemporaryDirectory() as tmp:
        python = args.daemon_python or sys.executable
        process, addr, _ = start_daemon(Path(tmp), args.threads, python)
        try:
            run_once(process.pid, addr, 0, None, Runs())  # warm-up
            for _ in range(args.rounds):
                run_once(process.pid, addr, 0, None, quiet)
                for nice, runs in bursts.items():
                    run_once(process.pid, addr, args.burst, nice, runs)
                    history.append((runs.rss_before[-1], runs.rss_after[-1]))
                # As long as the burst at nice 0 just took, with no request at all.
                run_once(process.pid, addr, 0, 0, neighbour, spin=bursts[0].wall[-1])
                refusing.append(refusal_cpu(process.pid, addr, args.burst))
        finally:
            process.terminate()
            process.wait()
    report(args.burst, args.rounds, quiet, bursts, history, neighbour, refusing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
