"""systemd's end of $NOTIFY_SOCKET: no systemd runs as PID 1 here, so the notify tests
play its part, a datagram socket bound on a temporary NOTIFY_SOCKET (a path, or an
abstract "@name"), with WATCHDOG_USEC set in the daemon's environment."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from support.waits import LIVE

WATCHDOG_USEC = 2_000_000


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


def notify_env(listener: NotifySocket, watchdog_usec: int | None = WATCHDOG_USEC) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": listener.address}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env
