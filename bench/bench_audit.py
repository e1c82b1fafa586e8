"""The cost per stream of the audit log's `fsync = always` against `interval`.

Two ways, both interleaved over rounds (modes in random order each round, as the
shared host drifts) and reported as medians with their ratio:
  - daemon: two real `fse serve` processes, one per fsync mode, each with its audit
    log in its own temporary directory; per round, N short greedy streams (2 tokens)
    are run one after another against each and timed end to end from the client
    (gRPC over a unix socket). Every stream writes two audit records
    (stream.started, stream.verdict): `always` pays two fdatasync calls per stream.
  - auditlog: an AuditLog alone writing those two records per stream, without the
    model: the audit log's own cost, free of the decode's noise.

    .venv/bin/python bench/bench_audit.py [--rounds 5] [--streams 20] [--json]
    .venv/bin/python bench/bench_audit.py --skip-daemon   # the AuditLog figure only

Where the temporary directory lives matters (tmpfs makes fsync free): pass --dir to
measure on the disk the audit log will be on.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median
from fse.serve.audit import AuditLog

MODES = ("always", "interval")
PROMPT = "The capital of France is"


def start_daemon(workdir: Path, fsync: str) -> tuple[subprocess.Popen[bytes], str]:
    """A real daemon, as bench_daemon.py starts one, with this fsync mode."""
    addr = f"unix:{workdir / 'bench.sock'}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fse.cli",
            "serve",
            "--listen",
            addr,
            "--threads",
            "1",
            "--max-streams",
            "1",
            "--ctx-per-stream",
            "256",
            "--audit-log",
            str(workdir / "fse-audit.jsonl"),
            "--audit-fsync",
            fsync,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "daemon.log").open("w"),
    )
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process, addr
            except grpc.RpcError:
                if process.poll() is not None:
                    break
            time.sleep(0.05)
    raise RuntimeError(f"daemon ({fsync}) not serving; see {workdir / 'daemon.log'}")


def stream_seconds(stub: fse_pb2_grpc.GuardStub, n: int) -> list[float]:
    """Wall time of n streams run one after another (each a whole Generate call)."""
    start = fse_pb2.GenerateRequest(
        prompt=PROMPT, max_tokens=2, sampling=fse_pb2.Sampling(temperature=0)
    )
    times = []
    for _ in range(n):
        began = time.perf_counter()
        for _msg in stub.Generate(iter([fse_pb2.GenerateClientMessage(start=start)])):
            pass
        times.append(time.perf_counter() - began)
    return times


def auditlog_seconds(path: Path, fsync: str, n: int) -> list[float]:
    """Time per stream of an AuditLog writing a stream's two records."""
    log = AuditLog(path, fsync=fsync)
    times = []
    for i in range(n):
        began = time.perf_counter()
        log.write("stream.started", stream=i, request_id="", prompt=PROMPT, max_tokens=2)
        log.write("stream.verdict", stream=i, request_id="", status="completed", output=" Paris")
        times.append(time.perf_counter() - began)
    log.close()
    return times


def summary(samples: dict[str, list[float]]) -> dict[str, float]:
    always, interval = median(samples["always"]), median(samples["interval"])
    return {
        "always_ms": always * 1e3,
        "interval_ms": interval * 1e3,
        "cost_ms": (always - interval) * 1e3,
        "ratio": always / interval,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=20, help="streams per mode per round")
    parser.add_argument("--dir", type=Path, default=None, help="where the logs go")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in random.sample(MODES, len(MODES)):
                path = root / f"auditlog-{mode}-{r}.jsonl"
                samples[mode] += auditlog_seconds(path, mode, args.streams * 5)
        results["auditlog"] = summary(samples)
        if not args.skip_daemon:
            daemons = {}
            for mode in MODES:
                workdir = root / mode
                workdir.mkdir()
                daemons[mode] = start_daemon(workdir, mode)
            try:
                samples = {m: [] for m in MODES}
                channels = {m: grpc.insecure_channel(daemons[m][1]) for m in MODES}
                stubs = {m: fse_pb2_grpc.GuardStub(channels[m]) for m in MODES}  # type: ignore[no-untyped-call]
                for m in MODES:
                    stream_seconds(stubs[m], 3)  # warm up
                for _ in range(args.rounds):
                    for mode in random.sample(MODES, len(MODES)):
                        samples[mode] += stream_seconds(stubs[mode], args.streams)
                results["daemon"] = summary(samples)
                for channel in channels.values():
                    channel.close()
            finally:
                for process, _ in daemons.values():
                    process.terminate()
                    process.wait(60)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"audit fsync cost per stream ({args.rounds} interleaved rounds, medians; logs in {tmp})")
    for name, res in results.items():
        print(
            f"  {name:8s}: always {res['always_ms']:.3f} ms, interval {res['interval_ms']:.3f} ms "
            f"per stream: always costs {res['cost_ms']:+.3f} ms ({res['ratio']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
