"""Soak: many clients against one daemon for N minutes, every way a client can behave,
one SIGKILL and restart of the daemon in the middle; then the audit chain is checked
against what every client saw.

The daemon (started here) listens on a unix socket and on a TLS TCP listener that
requires bearer tokens (a throwaway CA, certificate and token made with openssl in the
work directory). `--clients` processes each loop over a weighted mix:

- `stream`: an ordinary sampled stream, over the socket or TLS (its token gaps are the
  gap percentiles);
- `halt`: "la la la ..." under `pro`, greedy: the loop guard halts it;
- `cancel`: a Cancel after the third token;
- `kill`: a child process starts a stream, reads two tokens and is SIGKILLed;
- `slow`: a reader that sleeps 150 ms per token;
- `bad`: an invalid request (unknown policy, a negative temperature, top_p 0, no start);
- `oversized`: a prompt beyond the context, or beyond the 4 MiB message limit;
- `wrong_token`: the TLS listener with a token it does not know.

The script sends SIGHUP (a policy file rewritten, then reloaded) every minute, and
SIGKILLs the daemon halfway through and starts it again on the same audit log. Every 10 s
it samples the daemon's RSS, open descriptors and threads, and the token gaps clients
reported in that window; it plots them to soak.png (the `plot` extra's matplotlib).

At the end: the clients stop, the daemon gets SIGTERM (exit 0 expected), and
- `fse audit verify` passes over the rotated files;
- every `stream.started` has exactly one `stream.verdict`, or is an orphan of the
  restart (a stream in flight when the daemon was killed, named by the next start);
- every client's verdict (status and token count) matches the audit record of its
  request id, and every stream a client saw Started for is in the audit log;
- every outcome is an expected one for its kind: UNAVAILABLE only around the restart.

`lost` counts the streams the audit log cannot account for, `unexpected` the outcomes
a client's kind may not have; the exit code is 0 when both are 0, the audit log verifies
and the daemon stopped with 0. The last stdout line is one JSON object (streams, lost,
rss_drift_mib, fd_drift, gap_p50_ms, gap_p99_ms, restarts, orphans, ...); the work
directory keeps results.jsonl, samples.json, problems.txt, the daemon's logs and its
audit log. docs/soak.md says how to read them.

    .venv/bin/python bench/soak.py --minutes 30 [--clients 64] [--workdir DIR]
    make soak SOAK_MINUTES=30
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import queue
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
Code = grpc.StatusCode
GuardStub: Any = fse_pb2_grpc.GuardStub  # generated, untyped
Msg = fse_pb2.GenerateClientMessage

SAMPLE_SECONDS = 10.0
RELOAD_SECONDS = 60.0
# A gRPC deadline long enough for a stream queued behind the others (64 clients, 8 slots,
# two slow cores); the daemon's own verdicts come first.
CALL_SECONDS = 600.0
WARM_UP = 60.0  # seconds of a daemon run before its RSS and descriptors count as settled
# Client outcomes around the restart: from the kill until this long after SERVING again
# (a client's channel may still be backing off), UNAVAILABLE is expected.
RESTART_GRACE = 5.0
MIX = {
    "stream": 40,
    "halt": 10,
    "cancel": 10,
    "kill": 4,
    "slow": 8,
    "bad": 10,
    "oversized": 6,
    "wrong_token": 6,
}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Once upon a time, a fox who wanted to fly",
    "Water boils at sea level at a temperature of",
    "def fibonacci(n):",
]
LA = "la la la la la la la la"
CTX_PER_STREAM = 512
STATUS = {
    fse_pb2.STATUS_COMPLETED: "completed",
    fse_pb2.STATUS_HALTED: "halted",
    fse_pb2.STATUS_CANCELLED: "cancelled",
}
# What each kind may end with besides a verdict (the status codes of docs/protocol.md).
EXPECTED_CODES = {
    "bad": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "oversized": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"},
    "wrong_token": {"UNAUTHENTICATED"},
}
QUEUED_OUT = {"RESOURCE_EXHAUSTED"}  # more streams than slots and queue: refused at once


@dataclass
class Target:
    """Where and how the clients reach the daemon."""

    unix: str
    tls: str
    ca: bytes
    token: str


@dataclass
class Result:
    """One scenario run by one client."""

    client: int
    kind: str
    request_id: str
    began: float  # time.time(): comparable across processes
    ended: float
    via: str = "unix"
    started: bool = False  # a Started message arrived
    status: str = ""  # the verdict's status ("" when none arrived)
    guard: str = ""
    tokens: int = 0
    code: str = "OK"  # the RPC's status code
    details: str = ""
    gaps: list[float] = field(default_factory=list)


# -- the clients -----------------------------------------------------------------------


def channel_to(target: Target, via: str) -> grpc.Channel:
    options = [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if via == "unix":
        return grpc.insecure_channel(target.unix, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=target.ca)
    return grpc.secure_channel(target.tls, creds, options=options)


def start_msg(prompt: str, max_tokens: int, request_id: str, **fields: Any) -> Msg:
    sampling = fields.pop("sampling", None) or fse_pb2.Sampling()
    return Msg(
        start=fse_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, request_id=request_id, sampling=sampling, **fields
        )
    )


class Call:
    """A Generate call whose requests can be added while it runs (a Cancel mid-stream)."""

    def __init__(self, channel: grpc.Channel, first: Msg, metadata: tuple[tuple[str, str], ...]):
        self.outgoing: queue.Queue[Msg | None] = queue.Queue()
        self.outgoing.put(first)
        self.call = GuardStub(channel).Generate(
            self._requests(), metadata=metadata, timeout=CALL_SECONDS
        )

    def _requests(self) -> Iterator[Msg]:
        while (msg := self.outgoing.get()) is not None:
            yield msg

    def close(self) -> None:
        self.outgoing.put(None)


def run_stream(
    result: Result,
    target: Target,
    first: Msg,
    *,
    cancel_after: int = -1,
    delay: float = 0.0,
    token: str | None = None,
) -> None:
    """One Generate call, read to its end, into `result`."""
    metadata: tuple[tuple[str, str], ...] = ()
    if result.via == "tls":
        metadata = (("authorization", f"Bearer {token or target.token}"),)
    last = 0.0
    with channel_to(target, result.via) as channel:
        call = Call(channel, first, metadata)
        try:
            for msg in call.call:
                kind = msg.WhichOneof("kind")
                now = time.monotonic()
                if kind == "started":
                    result.started = True
                elif kind == "token":
                    if last and result.kind == "stream":
                        result.gaps.append(now - last)
                    last = now
                    result.tokens += 1
                    if result.tokens == cancel_after:
                        call.outgoing.put(Msg(cancel=fse_pb2.Cancel()))
                    if delay:
                        time.sleep(delay)
                elif kind == "verdict":
                    result.status = STATUS.get(msg.verdict.status, str(msg.verdict.status))
                    result.guard = msg.verdict.guard
                    result.tokens = msg.verdict.tokens
            result.code = "OK"
        except grpc.RpcError as exc:
            result.code = exc.code().name
            result.details = (exc.details() or "")[:200]
        finally:
            call.close()


def run_kill(result: Result, target: Target) -> None:
    """A child process starts the stream and is SIGKILLed after its second token."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--victim", target.unix, result.request_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()  # "started" after two tokens, or the error
    child.kill()
    child.wait()
    result.started = line == "started"
    result.code = "KILLED" if result.started else (line or "EXITED")


def victim(unix: str, request_id: str) -> int:
    """The process `kill` kills: one stream, two tokens, then waits to die."""
    with grpc.insecure_channel(unix) as channel:
        first = start_msg(PROMPTS[0], 64, request_id)
        try:
            tokens = 0
            for msg in GuardStub(channel).Generate(iter([first]), timeout=CALL_SECONDS):
                tokens += msg.WhichOneof("kind") == "token"
                if tokens == 2:
                    print("started", flush=True)
                    time.sleep(3600)
        except grpc.RpcError as exc:
            print(exc.code().name, flush=True)
    return 0


def scenario(kind: str, client: int, n: int, target: Target, rng: random.Random) -> Result:
    request_id = f"c{client}-{n}-{kind}"
    result = Result(client, kind, request_id, time.time(), 0.0)
    result.via = "tls" if kind == "wrong_token" or rng.random() < 0.3 else "unix"
    sampled = fse_pb2.Sampling(temperature=0.8, seed=rng.randrange(1 << 31))
    greedy = fse_pb2.Sampling(temperature=0.0)
    prompt = rng.choice(PROMPTS)
    if kind == "stream":
        run_stream(
            result, target, start_msg(prompt, rng.randint(8, 48), request_id, sampling=sampled)
        )
    elif kind == "halt":
        run_stream(result, target, start_msg(LA, 48, request_id, sampling=greedy, policy="pro"))
    elif kind == "cancel":
        first = start_msg(prompt, 48, request_id, sampling=sampled)
        run_stream(result, target, first, cancel_after=3)
    elif kind == "slow":
        first = start_msg(prompt, 16, request_id, sampling=sampled)
        run_stream(result, target, first, delay=0.15)
    elif kind == "kill":
        result.via = "unix"
        run_kill(result, target)
    elif kind == "bad":
        bad = rng.choice(
            [
                start_msg(prompt, 8, request_id, policy="no-such-policy"),
                start_msg(prompt, 8, request_id, sampling=fse_pb2.Sampling(temperature=-1.0)),
                start_msg(prompt, 8, request_id, sampling=fse_pb2.Sampling(top_p=0.0)),
                Msg(cancel=fse_pb2.Cancel()),  # no start first
            ]
        )
        run_stream(result, target, bad)
    elif kind == "oversized":
        words = rng.choice([CTX_PER_STREAM * 2, (5 << 20) // 5])  # the context; 5 MiB
        run_stream(result, target, start_msg("word " * words, 8, request_id))
    elif kind == "wrong_token":
        first = start_msg(prompt, 8, request_id)
        run_stream(result, target, first, token=secrets.token_hex(16))
    result.ended = time.time()
    return result


def client_main(
    client: int, target: Target, until: float, results: multiprocessing.Queue[Any], seed: int
) -> None:
    """One client process: scenarios until `until` (time.time()), one result each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    n = 0
    while time.time() < until:
        kind = rng.choices(kinds, weights)[0]
        try:
            result = scenario(kind, client, n, target, rng)
        except Exception as exc:  # a client bug must show, not kill the pool
            result = Result(client, kind, f"c{client}-{n}-{kind}", time.time(), time.time())
            result.code, result.details = "CLIENT_ERROR", f"{type(exc).__name__}: {exc}"[:200]
        results.put(asdict(result))
        n += 1
        # The daemon away (the restart): back off a little, as a real client would.
        time.sleep(rng.uniform(0.5, 1.0) if result.code == "UNAVAILABLE" else rng.uniform(0, 0.3))


# -- the daemon ------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    openssl(
        "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-subj", "/CN=soak-ca", "-days", "2"
    )
    cert, key, csr, ext = (folder / n for n in ("server.pem", "server.key", "server.csr", "san"))
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
    key.chmod(0o600)
    return ca, cert, key


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POLICY = 'name = "soak"\ndescription = "reload {n}"\n[guards.perplexity]\nthreshold = {t}\n'


@dataclass
class Daemon:
    argv: list[str]
    workdir: Path
    unix: str
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> float:
        """Start it; returns when it is SERVING (time.time())."""
        log = (self.workdir / f"daemon-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(self.unix) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the daemon exited; see {log.name}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.time()
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"the daemon is not SERVING after 180 s; see {log.name}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- the run ---------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    restart_windows: list[tuple[float, float]] = field(default_factory=list)
    reloads: int = 0


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fse-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    me = Run(args, workdir)
    ca, cert, key = make_tls(workdir)
    token = secrets.token_hex(24)
    tokens = workdir / "tokens"
    tokens.write_text(f"soak {hashlib.sha256(token.encode()).hexdigest()}\n")
    tokens.chmod(0o600)
    policies = workdir / "policies"
    policies.mkdir(mode=0o700, exist_ok=True)
    (policies / "soak.toml").write_text(POLICY.format(n=0, t=400.0))
    audit_dir = workdir / "audit"
    audit_dir.mkdir(mode=0o700, exist_ok=True)
    unix = f"unix:{workdir / 'fse.sock'}"
    tls = f"127.0.0.1:{free_port()}"
    argv = [
        sys.executable, "-m", "fse.cli", "serve",
        "--listen", unix, "--listen", tls,
        "--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens", str(tokens),
        "--policies-dir", str(policies),
        "--audit-log", str(audit_dir / "audit.jsonl"), "--audit-rotate-bytes", str(1 << 20),
        "--max-streams", "8", "--max-queue", str(args.clients),
        "--ctx-per-stream", str(CTX_PER_STREAM), "--threads", str(args.threads),
    ]  # fmt: skip
    daemon = Daemon(argv, workdir, unix)
    daemon.start()
    time.sleep(1.0)
    me.events.append((time.time(), "start"))
    target = Target(unix, tls, ca.read_bytes(), token)
    sample(me, daemon, time.time(), "idle-start")
    began = time.time()
    until = began + args.minutes * 60
    restart_at = began + args.minutes * 30
    ctx = multiprocessing.get_context("spawn")
    inbox: multiprocessing.Queue[Any] = ctx.Queue()
    clients = [
        ctx.Process(target=client_main, args=(i, target, until, inbox, args.seed + i), daemon=True)
        for i in range(args.clients)
    ]
    for p in clients:
        p.start()
    drain = threading.Thread(target=collect, args=(inbox, me.results), daemon=True)
    drain.start()
    print(
        f"soak: {args.clients} clients for {args.minutes:g} min against pid {daemon.pid}; "
        f"work directory {workdir}",
        file=sys.stderr,
    )
    next_sample = began + SAMPLE_SECONDS
    next_reload = began + RELOAD_SECONDS
    restarted = False
    while time.time() < until:
        time.sleep(0.2)
        now = time.time()
        if not restarted and now >= restart_at:
            restarted = True
            killed = time.time()
            os.kill(daemon.pid, signal.SIGKILL)
            assert daemon.process is not None
            daemon.process.wait()
            me.events.append((killed, "SIGKILL"))
            serving = daemon.start()
            me.events.append((serving, "restart"))
            me.restart_windows.append((killed, serving + RESTART_GRACE))
            print(f"soak: daemon killed and restarted in {serving - killed:.1f} s", file=sys.stderr)
        if now >= next_reload:
            next_reload += RELOAD_SECONDS
            me.reloads += 1
            (policies / "soak.toml").write_text(
                POLICY.format(n=me.reloads, t=300.0 + 100 * (me.reloads % 2))
            )
            os.kill(daemon.pid, signal.SIGHUP)
            me.events.append((time.time(), "SIGHUP"))
        if now >= next_sample:
            next_sample += SAMPLE_SECONDS
            sample(me, daemon, now)
    for p in clients:
        p.join(timeout=CALL_SECONDS + 60)  # each finishes the scenario it is in
    for p in clients:
        if p.is_alive():  # stuck: that is a finding, not a reason to hang
            me.events.append((time.time(), f"client {p.pid} did not stop"))
            p.kill()
    time.sleep(2.0)  # the last connections close, the heap is trimmed
    sample(me, daemon, time.time(), "idle-end")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    exit_code = daemon.process.wait(120)
    time.sleep(0.5)
    drain.join(timeout=5)
    collect_now(inbox, me.results)
    summary = check(me, audit_dir, exit_code)
    (workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in me.results))
    (workdir / "samples.json").write_text(json.dumps(me.samples, indent=1))
    plotted = plot(me, workdir / "soak.png")
    summary["plot"] = str(plotted) if plotted else None
    summary["workdir"] = str(workdir)
    print(json.dumps(summary))
    whole = summary["lost"] == 0 and summary["unexpected"] == 0 and summary["audit_verify"] == "ok"
    return 0 if whole and exit_code == 0 else 1


def collect(inbox: multiprocessing.Queue[Any], into: list[dict[str, Any]]) -> None:
    while True:
        try:
            into.append(inbox.get(timeout=1))
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return


def collect_now(inbox: multiprocessing.Queue[Any], into: list[dict[str, Any]]) -> None:
    while True:
        try:
            into.append(inbox.get_nowait())
        except (queue.Empty, EOFError, OSError):
            return


def sample(me: Run, daemon: Daemon, now: float, phase: str = "load") -> None:
    window = [r for r in list(me.results) if now - SAMPLE_SECONDS <= r["ended"] < now]
    gaps = [g for r in window for g in r["gaps"]]
    try:
        status = proc_status(daemon.pid)
    except OSError:
        return  # between the kill and the restart
    me.samples.append(
        {
            "t": now,
            "run": daemon.starts,
            "rss_mib": status["VmRSS"] / 1024,
            "fds": status["fds"],
            "threads": status["Threads"],
            "gap_p50_ms": percentile(gaps, 0.5) * 1000,
            "gap_p99_ms": percentile(gaps, 0.99) * 1000,
            "streams": len(window),
            "phase": phase,  # idle-start (before the clients), load, idle-end (after them)
        }
    )


def in_restart(me: Run, began: float, ended: float) -> bool:
    return any(began <= b and ended >= a for a, b in me.restart_windows)


def expected(me: Run, r: dict[str, Any]) -> bool:
    """Whether a client's outcome is one its kind may have."""
    code: str = r["code"]
    if code == "UNAVAILABLE" and in_restart(me, r["began"], r["ended"]):
        return True
    if code in QUEUED_OUT and not r["started"]:
        return True
    kind: str = r["kind"]
    status: str = r["status"]
    if kind == "kill":
        return code == "KILLED" or in_restart(me, r["began"], r["ended"])
    if kind in EXPECTED_CODES:
        return code in EXPECTED_CODES[kind]
    if code != "OK" or not status:
        return False
    if kind == "halt":
        return status == "halted"
    if kind == "cancel":
        return status in ("cancelled", "completed", "halted")  # it may end before
    return status in ("completed", "halted")


def check(me: Run, audit_dir: Path, exit_code: int) -> dict[str, Any]:
    # Imported here: the client processes (spawned, so they import this module) need
    # only grpc and the stubs.
    from fse.serve.audit import chain_files, verify

    files = chain_files([audit_dir])
    result = verify(files)
    cli = subprocess.run(
        [sys.executable, "-m", "fse.cli", "audit", "verify", str(audit_dir)],
        capture_output=True,
        text=True,
    )
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    started = {r["stream"]: r for r in records if r["event"] == "stream.started"}
    verdicts: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        if r["event"] == "stream.verdict":
            verdicts[r["stream"]].append(r)
    orphans = {o.stream for o in result.orphans}
    by_request = {r.get("request_id"): s for s, r in started.items()}
    problems: list[str] = []  # streams the audit log cannot account for: lost
    unexpected: list[str] = []  # outcomes a client's kind may not have
    for stream in started:
        n = len(verdicts.get(stream, []))
        if n != 1 and not (n == 0 and stream in orphans):
            problems.append(f"stream {stream}: {n} verdicts")
    for r in me.results:
        stream = by_request.get(r["request_id"])
        if r["started"] and stream is None:
            problems.append(f"{r['request_id']}: Started but not in the audit log")
        if r["status"]:
            audited = verdicts.get(stream, [])
            if len(audited) != 1:
                problems.append(f"{r['request_id']}: a verdict, {len(audited)} in the audit log")
            elif (audited[0]["status"], audited[0].get("tokens")) != (r["status"], r["tokens"]):
                problems.append(
                    f"{r['request_id']}: client {r['status']}/{r['tokens']}, audit "
                    f"{audited[0]['status']}/{audited[0].get('tokens')}"
                )
        if not expected(me, r):
            unexpected.append(
                f"{r['request_id']}: unexpected {r['code']} {r['status']} {r['details']}"
            )
    # Leaks. RSS: under load, within each daemon run (the restart is not a leak), from its
    # first sample WARM_UP into the run (the KV cache's pages are touched as streams reach
    # longer contexts, so the idle daemon before any stream is no baseline for memory) to
    # its last; the larger of the two runs. Descriptors and threads: the idle daemon after
    # the clients against the idle daemon before them (the same settings and listeners).
    idle = {s["phase"]: s for s in me.samples if s["phase"] != "load"}
    first, last = idle.get("idle-start"), idle.get("idle-end")
    fd_drift = last["fds"] - first["fds"] if first and last else 0
    thread_drift = last["threads"] - first["threads"] if first and last else 0
    runs = collections.defaultdict(list)
    for s in me.samples:
        if s["phase"] == "load":
            runs[s["run"]].append(s)

    def settled(v: list[dict[str, Any]]) -> dict[str, Any]:
        return next((s for s in v if s["t"] - v[0]["t"] >= WARM_UP), v[0])

    rss_drift = max((v[-1]["rss_mib"] - settled(v)["rss_mib"] for v in runs.values()), default=0.0)
    gaps = [g for r in me.results for g in r["gaps"]]
    kinds = collections.Counter(r["kind"] for r in me.results)
    codes = collections.Counter(r["code"] for r in me.results)
    (me.workdir / "problems.txt").write_text("".join(p + "\n" for p in problems + unexpected))
    for p in (problems + unexpected)[:20]:
        print(f"soak: {p}", file=sys.stderr)
    loaded = sum(1 for r in records if r["event"] == "policy.loaded")
    rejected = sum(1 for r in records if r["event"] == "policy.reload_rejected")
    return {
        "streams": len(me.results),
        "audited_streams": len(started),
        "lost": len(problems),
        "unexpected": len(unexpected),
        "rss_drift_mib": round(rss_drift, 1),
        "fd_drift": fd_drift,
        "thread_drift": thread_drift,
        "rss_idle_mib": [round(x["rss_mib"], 1) for x in (first, last) if x],
        "rss_max_mib": round(max((s["rss_mib"] for s in me.samples), default=0.0), 1),
        "threads_max": max((s["threads"] for s in me.samples), default=0),
        "gap_p50_ms": round(percentile(gaps, 0.5) * 1000, 1) if gaps else None,
        "gap_p99_ms": round(percentile(gaps, 0.99) * 1000, 1) if gaps else None,
        "restarts": len(me.restart_windows),
        "orphans": len(orphans),
        "unavailable": codes.get("UNAVAILABLE", 0),
        "reloads": me.reloads,
        "policy_loaded": loaded,
        "reload_rejected": rejected,
        "audit_verify": "ok" if result.ok and cli.returncode == 0 else cli.stdout.strip()[-300:],
        "daemon_exit": exit_code,
        "kinds": dict(kinds),
        "codes": dict(codes),
        "minutes": me.args.minutes,
        "clients": me.args.clients,
    }


def plot(me: Run, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: no matplotlib (the `plot` extra): no plot", file=sys.stderr)
        return None
    if not me.samples:
        return None
    t0 = me.samples[0]["t"]
    xs = [(s["t"] - t0) / 60 for s in me.samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [
        ("RSS (MiB)", ["rss_mib"]),
        ("open descriptors", ["fds"]),
        ("threads", ["threads"]),
        ("token gap (ms)", ["gap_p50_ms", "gap_p99_ms"]),
    ]
    for ax, (title, keys) in zip(axes, series, strict=True):
        for key in keys:
            ax.plot(xs, [s[key] for s in me.samples], marker=".", label=key)
        ax.set_ylabel(title)
        for when, what in me.events:
            if what in ("SIGKILL", "restart"):
                ax.axvline((when - t0) / 60, color="red", alpha=0.4, linestyle="--")
        if len(keys) > 1:
            ax.legend()
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"fse soak: {me.args.clients} clients, {me.args.minutes:g} min (red: restart)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--victim":
        return victim(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="the daemon's decode threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="where the daemon's files go (default: a new temp dir)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients < 1:
        parser.error("--minutes must be > 0 and --clients >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
