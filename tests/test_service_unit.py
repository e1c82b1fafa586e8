"""fse as a system service: the unit (systemd-analyze verify and security), the example
config, `make install`, and the sd_notify protocol as systemd would see it, with real
daemon processes (no mocks).

No systemd runs as PID 1 here, so the notify tests play systemd's part: a datagram
socket bound on a temporary NOTIFY_SOCKET (a path, or an abstract "@name"), and
WATCHDOG_USEC set in the daemon's environment. The unit's seccomp settings
(MemoryDenyWriteExecute=, RestrictAddressFamilies=) are checked by a filter with the
same rules, installed before exec'ing a real daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import FSE, Daemon, audit_records, wait_serving
from fse.core.gguf import cache_dir
from fse.serve.config import KEYS
from fse_client import Client, Sampling, Status, Verdict

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "daemon" / "systemd" / "fse.service"
EXAMPLE = ROOT / "daemon" / "systemd" / "fse.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)
THREADS = ("--threads", "1")
SMALL = ("--max-streams", "2", "--ctx-per-stream", "512")
LONG_PROMPT = "Count: 1, 2, 3, 4, 5, 6,"  # greedy: runs for hundreds of tokens
WATCHDOG_USEC = 2_000_000
LIVE = 60.0  # liveness bound for what must happen at all (never a performance claim)


# -- playing systemd's part ----------------------------------------------------------


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET: every datagram, with when it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._received: list[tuple[float, list[str]]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append((time.monotonic(), data.decode().split("\n")))

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self._sock.close()

    @property
    def received(self) -> list[tuple[float, list[str]]]:
        with self._lock:
            return list(self._received)

    def wait_for(
        self, line: str, *, after: int = 0, timeout: float = LIVE, process: Any = None
    ) -> int:
        """Index of the first datagram from `after` on with a line starting with `line`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (_, lines) in enumerate(self.received[after:], after):
                if any(x.startswith(line) for x in lines):
                    return i
            if process is not None and process.poll() is not None:
                raise AssertionError(f"daemon exited with {process.returncode} before {line}")
            time.sleep(0.02)
        raise AssertionError(f"no {line} within {timeout}s; got {self.received}")

    def lines(self, after: int = 0) -> list[str]:
        return [x for _, lines in self.received[after:] for x in lines]

    def pings(self) -> list[float]:
        return [t for t, lines in self.received if "WATCHDOG=1" in lines]


@pytest.fixture()
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


@pytest.fixture()
def notify_abstract() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@fse-test-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    yield listener
    listener.close()


@pytest.fixture()
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start `fse serve` (or `command`) with its own environment; killed at the end."""
    started: list[Daemon] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] = FSE,
        listen: bool = True,
    ) -> Daemon:
        workdir = tmp_path_factory.mktemp("svc")
        addr = f"unix:{workdir / 'fse.sock'}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        log_path = workdir / "daemon.log"
        process = subprocess.Popen(
            [*command, "serve", *(("--listen", addr) if listen else ()), *THREADS, *args],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            cwd=workdir,
            env={**base, **(env or {})},
        )
        daemon = Daemon(process, addr, [addr], log_path, workdir / "fse-audit.jsonl")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL, timeout=10)


def notify_env(listener: NotifySocket, watchdog_usec: int | None = WATCHDOG_USEC) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": listener.address}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def generate(addr: str, prompt: str = "Hi", max_tokens: int = 4, **kw: Any) -> Verdict:
    with Client(addr) as client:
        gen = client.generate(
            prompt, max_tokens=max_tokens, sampling=Sampling(temperature=0.0), **kw
        )
        for _ in gen:
            pass
    assert gen.verdict is not None
    return gen.verdict


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [r for r in daemon.audit() if r.get("event") == name]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = LIVE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- the unit ------------------------------------------------------------------------


def unit_with_exec(target: Path, launcher: Path, source: Path = UNIT) -> Path:
    """A copy of the unit whose ExecStart names a file that exists (verify checks it)."""
    text = source.read_text()
    rewritten = re.sub(r"^ExecStart=\S+ ", f"ExecStart={launcher} ", text, flags=re.M)
    assert rewritten != text
    target.mkdir(parents=True, exist_ok=True)
    unit = target / "fse.service"
    unit.write_text(rewritten)
    return unit


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    launcher = Path(sys.executable).parent / "fse"
    assert launcher.is_file()
    unit = unit_with_exec(tmp_path, launcher)
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@needs_analyze
def test_unit_security_exposure_is_at_most_2() -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for fse\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_keeps_what_the_daemon_needs() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/usr/local/bin/fse serve --config /etc/fse/fse.toml"]
    assert unit["ExecReload"] == ["kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    for directory in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert unit[directory] == ["fse"]
    assert unit["ConfigurationDirectory"] == ["fse"]
    assert "FSE_CACHE_DIR=%S/fse" in unit["Environment"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["LoadCredential"] == ["fse-audit.key"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert unit["MemoryDenyWriteExecute"] == ["yes"]
    # The stop timeout leaves room for the example's drain, the gRPC grace and the audit close.
    drain = tomllib.loads(EXAMPLE.read_text())["server"]["drain_seconds"]
    (stop,) = unit["TimeoutStopSec"]
    assert stop.endswith("s") and float(stop[:-1]) >= drain + 10
    (watchdog,) = unit["WatchdogSec"]
    assert watchdog.endswith("s") and float(watchdog[:-1]) > 0


# -- the example config --------------------------------------------------------------


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text().splitlines()
    doc = tomllib.loads(EXAMPLE.read_text())
    for key in KEYS:
        assert key.name in doc.get(key.section, {}), f"{key.dotted} missing"
    section = ""
    for i, line in enumerate(text):
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            name = line.split("=", 1)[0].strip()
            assert text[i - 1].startswith("# "), f"{section}.{name} has no comment above it"
    assert doc["server"]["listen"] == ["unix:/run/fse/fse.sock"]
    assert doc["audit"]["path"] == "/var/log/fse/audit.jsonl"
    result = subprocess.run(
        [*FSE, "config", "check", str(EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- make install --------------------------------------------------------------------

PREFIX = "/opt/fse-test"


def make_install(destdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `make install` into a temporary DESTDIR: the staging root."""
    destdir = tmp_path_factory.mktemp("destdir")
    result = make_install(destdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return destdir


def test_make_install_lays_out_the_service(installed: Path) -> None:
    prefix = installed / PREFIX.lstrip("/")
    launcher = prefix / "bin" / "fse"
    assert os.access(launcher, os.X_OK)
    unit = prefix / "lib" / "systemd" / "system" / "fse.service"
    assert unit_settings(unit)["ExecStart"] == [
        f"{PREFIX}/bin/fse serve --config /etc/fse/fse.toml"
    ]
    config = installed / "etc" / "fse" / "fse.toml"
    assert config.read_text() == EXAMPLE.read_text()
    # The package is a real copy in the venv of its own, not the checkout's editable one.
    where = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    venv_python = prefix / "lib" / "fse" / "venv" / "bin" / "python"
    origin = subprocess.run(
        [str(venv_python), "-c", "import fse, fse._native; print(fse.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert origin.returncode == 0, origin.stderr
    assert origin.stdout.startswith(str(prefix / "lib" / "fse" / "venv")), origin.stdout
    if SYSTEMD_ANALYZE is not None:
        check = unit_with_exec(installed / "verify", launcher, unit)
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", str(check)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_installed_fse_serves_the_example_config(
    installed: Path, launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    prefix = installed / PREFIX.lstrip("/")
    config = (installed / "etc" / "fse" / "fse.toml").read_text()
    sock, audit = tmp_path / "fse.sock", tmp_path / "audit.jsonl"
    config = config.replace("unix:/run/fse/fse.sock", f"unix:{sock}")
    config = config.replace("/var/log/fse/audit.jsonl", str(audit))
    assert str(sock) in config and str(audit) in config
    (tmp_path / "fse.toml").write_text(config)
    daemon = launch(
        "--config",
        str(tmp_path / "fse.toml"),
        *SMALL,
        command=[str(prefix / "bin" / "fse")],
        listen=False,
        env={"FSE_CACHE_DIR": str(cache_dir())},  # the model already assembled there
    )
    daemon.addr = f"unix:{sock}"
    wait_serving(daemon.addr, daemon.process)
    client = Path(sys.executable).parent / "fse"
    result = subprocess.run(
        [str(client), "generate", "--addr", daemon.addr, "Hi", "--max-tokens", "4",
         "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log()
    assert daemon.stop() == 0, daemon.log()
    records = audit_records(audit)
    assert [r["event"] for r in records if r["event"] == "stream.verdict"] == ["stream.verdict"]
    assert any(r["event"] == "server.stopping" for r in records)


def test_make_install_never_overwrites_the_config(installed: Path) -> None:
    config = installed / "etc" / "fse" / "fse.toml"
    edited = config.read_text().replace("max_streams = 8", "max_streams = 3")
    config.write_text(edited)
    again = make_install(installed)  # idempotent: a second run succeeds and keeps it
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == edited
    assert "kept" in again.stdout
    assert os.access(installed / PREFIX.lstrip("/") / "bin" / "fse", os.X_OK)


# -- the unit's seccomp rules, applied to a real daemon --------------------------------

# MemoryDenyWriteExecute=yes and RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 as
# systemd compiles them (seccomp-util.c): no mmap that is both writable and executable,
# no mprotect/pkey_mprotect adding PROT_EXEC, no shmat with SHM_EXEC (EPERM); no socket()
# of another family (EAFNOSUPPORT). Installed, then the command is exec'd.
SECCOMP_WRAPPER = r"""
import ctypes, errno, os, struct, sys

LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
ARCH_X86_64 = 0xC000003E
MMAP, MPROTECT, SHMAT, SOCKET, PKEY_MPROTECT = 9, 10, 30, 41, 329
ARG = lambda i: 16 + 8 * i  # low 32 bits of seccomp_data.args[i] (little endian)

prog = []  # (code, jt label or 0, jf label or 0, k)
def op(code, k, jt=0, jf=0): prog.append([code, jt, jf, k])
labels = {}
def label(name): labels[name] = len(prog)

op(LD, 4); op(JEQ, ARCH_X86_64, 0, "allow")
op(LD, 0)
op(JEQ, MMAP, "mmap"); op(JEQ, MPROTECT, "prot"); op(JEQ, PKEY_MPROTECT, "prot")
op(JEQ, SHMAT, "shmat"); op(JEQ, SOCKET, "socket")
op(RET, ALLOW)
label("mmap"); op(LD, ARG(2)); op(AND, 0x6); op(JEQ, 0x6, "eperm", "allow")
label("prot"); op(LD, ARG(2)); op(JSET, 0x4, "eperm", "allow")
label("shmat"); op(LD, ARG(2)); op(JSET, 0o100000, "eperm", "allow")
label("socket"); op(LD, ARG(0))
op(JEQ, 1, "allow"); op(JEQ, 2, "allow"); op(JEQ, 10, "allow")
op(RET, ERRNO | errno.EAFNOSUPPORT)
label("eperm"); op(RET, ERRNO | errno.EPERM)
label("allow"); op(RET, ALLOW)

raw = b""
for i, (code, jt, jf, k) in enumerate(prog):
    jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
    jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
    raw += struct.pack("HBBI", code, jt, jf, k)
buf = ctypes.create_string_buffer(raw)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0
):
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""

PROBE = r"""
import mmap, socket
for prot in (mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,):
    try:
        mmap.mmap(-1, 4096, prot=prot)
        print("wx-mmap allowed")
    except PermissionError:
        print("wx-mmap denied")
for family in (socket.AF_NETLINK, socket.AF_PACKET):
    try:
        socket.socket(family, socket.SOCK_RAW).close()
        print("family allowed")
    except OSError as exc:
        print("family denied", exc.errno)
for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    socket.socket(family, socket.SOCK_STREAM).close()
print("ok")
"""

x86_64_only = pytest.mark.skipif(
    platform.machine() != "x86_64" or sys.platform != "linux",
    reason="the seccomp emulation is written for x86_64 Linux syscall numbers",
)


@x86_64_only
def test_seccomp_rules_of_the_unit_do_not_break_the_daemon(
    launch: Callable[..., Daemon], tmp_path: Path
) -> None:
    wrapper = tmp_path / "seccomp_exec.py"
    wrapper.write_text(SECCOMP_WRAPPER)
    sandboxed = [sys.executable, str(wrapper), sys.executable]
    # The filter really denies what the unit denies...
    probe = subprocess.run([*sandboxed, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:3] == [
        "wx-mmap denied",
        f"family denied {errno.EAFNOSUPPORT}",
        f"family denied {errno.EAFNOSUPPORT}",
    ], probe.stdout
    # ...and a daemon under it loads llama.cpp, binds unix and TCP, notifies and serves.
    listener = NotifySocket(str(tmp_path / "n.sock"))
    try:
        port = _free_port()
        daemon = launch(
            *SMALL,
            "--listen",
            f"127.0.0.1:{port}",
            "--listen",
            f"[::1]:{port}",
            command=[*sandboxed, "-m", "fse.cli"],
            env=notify_env(listener),
        )
        listener.wait_for("READY=1", process=daemon.process)
        verdict = generate(daemon.addr, "The capital of France is", 8)
        assert verdict.status == Status.COMPLETED and verdict.tokens == 8, daemon.log()
        assert generate(f"127.0.0.1:{port}").status == Status.COMPLETED
        assert daemon.stop() == 0, daemon.log()
        assert "STOPPING=1" in listener.lines()
    finally:
        listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- sd_notify -----------------------------------------------------------------------


def test_ready_status_watchdog_reload_and_stop(
    launch: Callable[..., Daemon], notify_path: NotifySocket, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    strict = policies / "strict.toml"
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = 50.0\n')
    daemon = launch(*SMALL, "--policies-dir", str(policies), env=notify_env(notify_path))
    ready = notify_path.wait_for("READY=1", process=daemon.process)
    # READY=1 means served: the socket is bound and the model loaded, so a stream works
    # at once, with no health polling in between.
    assert generate(daemon.addr).status == Status.COMPLETED, daemon.log()
    assert any(x.startswith("STATUS=") for x in notify_path.received[ready][1])
    # Before it, STATUS= said what the daemon was doing (systemctl status while loading).
    assert any(x.startswith("STATUS=loading") for _, lines in notify_path.received[:ready]
               for x in lines)  # fmt: skip
    # Watchdog pings about every WATCHDOG_USEC/2, and never as late as WATCHDOG_USEC.
    wait_until(lambda: len(notify_path.pings()) >= 6, "six watchdog pings", LIVE)
    gaps = [b - a for a, b in zip(notify_path.pings(), notify_path.pings()[1:], strict=False)]
    assert 0.7 <= statistics.median(gaps) <= 1.4, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    # STATUS= keeps coming while serving (systemctl status shows the load).
    notify_path.wait_for("STATUS=", after=ready + 1, timeout=15)

    # SIGHUP with a good policy dir: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = 60.0\n')
    mark = len(notify_path.received)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify_path.wait_for("RELOADING=1", after=mark)
    lines = notify_path.received[reloading][1]
    (usec,) = [int(x.split("=", 1)[1]) for x in lines if x.startswith("MONOTONIC_USEC=")]
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify_path.wait_for("READY=1", after=reloading + 1) > reloading
    wait_until(lambda: len(events(daemon, "policy.loaded")) == 2, "policy reloaded")

    # SIGHUP with a broken policy: the same pair, the reload rejected, the old set serving.
    strict.write_text('name = "strict"\n[guards.perplexity]\nthreshold = -1\n')
    mark = len(notify_path.received)
    daemon.process.send_signal(signal.SIGHUP)
    reloading = notify_path.wait_for("RELOADING=1", after=mark)
    notify_path.wait_for("READY=1", after=reloading + 1)
    wait_until(lambda: bool(events(daemon, "policy.reload_rejected")), "reload rejected")
    (rejected,) = events(daemon, "policy.reload_rejected")
    assert "threshold" in rejected["error"]
    verdict = generate(daemon.addr, policy="strict")
    assert verdict.status == Status.COMPLETED and verdict.policy == "strict"
    loaded = events(daemon, "policy.loaded")[-1]["policies"]["strict"]
    assert verdict.policy_sha256 == loaded

    # SIGTERM: STOPPING=1, then a clean exit.
    mark = len(notify_path.received)
    assert daemon.stop() == 0, daemon.log()
    stopping = notify_path.wait_for("STOPPING=1", after=mark, timeout=5)
    assert "READY=1" not in notify_path.lines(stopping)


def test_watchdog_pings_stop_when_decode_hangs(
    launch: Callable[..., Daemon], notify_abstract: NotifySocket
) -> None:
    """An abstract @name socket; a decode step that never returns silences the watchdog."""
    daemon = launch(*SMALL, "--allow-debug-faults", env=notify_env(notify_abstract))
    notify_abstract.wait_for("READY=1", process=daemon.process)
    wait_until(lambda: len(notify_abstract.pings()) >= 3, "watchdog pings")
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT,
            max_tokens=64,
            sampling=Sampling(temperature=0.0),
            metadata=[("fse-debug-fault", "hang@3")],
        )
        for tokens, event in enumerate(gen, 1):
            assert not isinstance(event, Verdict)
            if tokens == 3:
                break
        hung_at = time.monotonic()
        # The step has been stuck longer than WATCHDOG_USEC: no ping for that long, so
        # systemd would have killed and restarted the daemon.
        time.sleep(3 * WATCHDOG_USEC / 1e6)
        last = notify_abstract.pings()[-1]
        assert last < hung_at + WATCHDOG_USEC / 1e6 + 0.5, last - hung_at
        assert time.monotonic() - last > 1.5 * WATCHDOG_USEC / 1e6
        assert daemon.process.poll() is None  # only the watchdog notices
        gen.close()
    assert "watchdog.decode_stuck" in daemon.log()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL


def test_sigterm_drains_the_stream_in_flight(
    launch: Callable[..., Daemon], notify_path: NotifySocket
) -> None:
    daemon = launch(*SMALL, "--drain-seconds", "120", env=notify_env(notify_path, None))
    notify_path.wait_for("READY=1", process=daemon.process)
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT, max_tokens=48, sampling=Sampling(temperature=0.0), request_id="drained"
        )
        it = iter(gen)
        first = [next(it) for _ in range(3)]
        mark = len(notify_path.received)
        daemon.process.send_signal(signal.SIGTERM)
        stopping = notify_path.wait_for("STOPPING=1", after=mark)
        assert any("draining" in x for x in notify_path.received[stopping][1])
        # A reload asked for while draining changes nothing and never says READY=1 again.
        daemon.process.send_signal(signal.SIGHUP)
        rest = list(it)
    assert len(first) == 3
    verdict = gen.verdict
    assert verdict is not None and verdict.status == Status.COMPLETED, verdict
    assert verdict.tokens == 48
    assert daemon.process.wait(LIVE) == 0, daemon.log()
    assert rest and isinstance(rest[-1], Verdict)
    assert "READY=1" not in notify_path.lines(stopping)
    (logged,) = [e for e in events(daemon, "stream.verdict") if e["request_id"] == "drained"]
    assert logged["status"] == "completed"


def test_second_sigterm_cuts_a_long_drain_short(
    launch: Callable[..., Daemon], notify_path: NotifySocket
) -> None:
    daemon = launch(*SMALL, "--drain-seconds", "600", env=notify_env(notify_path, None))
    notify_path.wait_for("READY=1", process=daemon.process)
    with Client(daemon.addr) as client:
        gen = client.generate(
            LONG_PROMPT, max_tokens=400, sampling=Sampling(temperature=0.0), request_id="cut"
        )
        it = iter(gen)
        for _ in range(3):
            next(it)
        daemon.process.send_signal(signal.SIGTERM)
        notify_path.wait_for("STOPPING=1")
        for _ in range(3):  # still streaming while it drains
            assert not isinstance(next(it), Verdict)
        cut_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(StopIteration):
            while True:
                next(it)
    verdict = gen.verdict
    assert verdict is not None, daemon.log()
    assert verdict.status == Status.HALTED and verdict.guard == "shutdown", verdict
    assert verdict.tokens < 400
    assert daemon.process.wait(LIVE) == 0, daemon.log()
    assert time.monotonic() - cut_at < LIVE
    assert "server.drain_cut_short" in daemon.log()
    (logged,) = [e for e in events(daemon, "stream.verdict") if e["request_id"] == "cut"]
    assert (logged["status"], logged["guard"]) == ("halted", "shutdown")
