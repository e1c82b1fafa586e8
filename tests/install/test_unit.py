"""fse as a system service: the unit (systemd-analyze verify and security), the example
config, `make install`, and the unit's seccomp rules applied to a real daemon.

The unit's seccomp settings (MemoryDenyWriteExecute=, RestrictAddressFamilies=) are
checked by a filter with the same rules, installed before exec'ing a real daemon. The
sd_notify protocol is tested in tests/serve/test_sd_notify.py.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from fse.core.gguf import cache_dir
from fse.serve.config import KEYS
from fse_client import Status
from support.daemons import (
    FSE,
    ROOT,
    Daemon,
    audit_records,
    wait_serving,
)
from support.notify import NotifySocket, notify_env
from support.ports import free_port
from support.streams import client_verdict

UNIT = ROOT / "daemon" / "systemd" / "fse.service"
EXAMPLE = ROOT / "daemon" / "systemd" / "fse.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)
SMALL = ("--max-streams", "2", "--ctx-per-stream", "512")


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


WORKER_UNIT = ROOT / "daemon" / "systemd" / "fse-rpc-worker.service"


@needs_analyze
def test_rpc_worker_unit_verifies_with_exposure_at_most_2(tmp_path: Path) -> None:
    """The RPC worker's unit (docs/rpc.md), hardened as the daemon's."""
    assert SYSTEMD_ANALYZE is not None
    launcher = Path(sys.executable).parent / "fse"
    text = WORKER_UNIT.read_text()
    unit = tmp_path / WORKER_UNIT.name
    unit.write_text(re.sub(r"^ExecStart=\S+ ", f"ExecStart={launcher} ", text, flags=re.M))
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(WORKER_UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(
        r"Overall exposure level for fse-rpc-worker\.service: (\d+\.\d+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    settings = unit_settings(WORKER_UNIT)
    assert settings["ExecStart"] == [
        "/usr/local/bin/fse rpc-worker --listen ${FSE_RPC_LISTEN} $FSE_RPC_FLAGS"
    ]
    assert "FSE_RPC_LISTEN=127.0.0.1:50052 FSE_RPC_FLAGS=" in settings["Environment"]
    assert settings["MemoryDenyWriteExecute"] == ["yes"] and settings["DynamicUser"] == ["yes"]


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
    worker = prefix / "lib" / "systemd" / "system" / "fse-rpc-worker.service"
    assert unit_settings(worker)["ExecStart"] == [
        f"{PREFIX}/bin/fse rpc-worker --listen ${{FSE_RPC_LISTEN}} $FSE_RPC_FLAGS"
    ]
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
        port = free_port()
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
        verdict = client_verdict(daemon.addr, "The capital of France is", 8)
        assert verdict.status == Status.COMPLETED and verdict.tokens == 8, daemon.log()
        assert client_verdict(f"127.0.0.1:{port}").status == Status.COMPLETED
        assert daemon.stop() == 0, daemon.log()
        assert "STOPPING=1" in listener.lines()
    finally:
        listener.close()
