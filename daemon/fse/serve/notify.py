"""systemd's notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

A few lines instead of a dependency (sd_notify(3)): the socket is a path, or an abstract
name when it starts with "@". Messages: STATUS=loading while the model loads; READY=1
once it is loaded and every listener is bound; STATUS= with the load; RELOADING=1 with
MONOTONIC_USEC= then READY=1 around a SIGHUP reload; STOPPING=1 on SIGTERM (no READY=1
after it); WATCHDOG=1 every WATCHDOG_USEC/2, but only while the decode thread's
heartbeat is fresh, so a hung llama_decode stops the pings and systemd restarts the
service. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Protocol

import structlog

log = structlog.get_logger("fse.notify")
STATUS_EVERY = 5.0  # seconds between STATUS= updates


class Supervised(Protocol):
    """What the watchdog needs to know of the decode thread."""

    def heartbeat_age(self) -> float:
        """Seconds the decode thread has been stuck in one step (0 when idle or moving)."""
        ...

    def status(self) -> str: ...


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self.address = address
        self.watchdog = watchdog_usec / 1e6 if watchdog_usec else None
        self._failing = False  # a lost socket is logged once, not with every ping

    @classmethod
    def from_environment(cls) -> Notifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the process the watchdog is meant for.
        mine = not pid or pid == str(os.getpid())
        return cls(address, int(usec) if usec.isdigit() and mine else None)

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            if not self._failing:
                log.warning("notify.failed", socket=self.address, error=str(exc))
            self._failing = True
            return False
        if self._failing:
            log.info("notify.recovered", socket=self.address)
        self._failing = False
        return True

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def tasks(self, supervised: Supervised) -> list[asyncio.Task[None]]:
        """The background pings: watchdog (when systemd asked for one) and status."""
        if self.address is None:
            return []
        tasks = [asyncio.get_running_loop().create_task(self._status(supervised))]
        if self.watchdog is not None:
            tasks.append(asyncio.get_running_loop().create_task(self._watchdog(supervised)))
        return tasks

    async def _watchdog(self, supervised: Supervised) -> None:
        assert self.watchdog is not None
        every = self.watchdog / 2
        silent = False
        while True:
            # A step stuck for longer than the whole watchdog interval is a hang.
            fresh = supervised.heartbeat_age() < self.watchdog
            if fresh:
                self.send("WATCHDOG=1")
            elif not silent:
                log.error("watchdog.decode_stuck", seconds=round(supervised.heartbeat_age(), 1))
            silent = not fresh
            await asyncio.sleep(every)

    async def _status(self, supervised: Supervised) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.send(supervised.status())
