"""A lost RPC worker fails the daemon closed (docs/rpc.md).

The pinned ggml-rpc gives two signs of a lost worker. A worker killed (its socket reset)
makes ggml-rpc's dispatcher thread call GGML_ABORT: fse.core.rpc routes that to
`RpcWatch.aborted`, which hands the loss to the event loop and parks the aborting
thread for good (ggml would abort() the moment it returned). A worker that stops
answering (SIGSTOP, a cut link) leaves llama_decode waiting on a socket with no
timeout: the decode step's heartbeat grows, and a step older than
`model.rpc_stall_seconds` counts as a lost worker too. A worker killed while the daemon
is idle leaves the daemon's connection to it half closed (CLOSE_WAIT in the kernel's
TCP table, fse.core.rpc.closed_by_worker): checked every second, also a loss.

Either way, on the event loop: health turns NOT_SERVING, the loss is logged and audited,
every running and waiting stream ends with an `error` verdict (guard `internal`, the
message naming the worker) through Scheduler.abandon, recorded in the audit chain before
its client sees it, and the daemon stops with exit code 1 so that systemd restarts it
(Restart=on-failure). Never `completed` for a partial output, never a hang.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from fse.core import rpc
from fse.core.errors import InputError
from fse.serve.audit import AuditLog
from fse.serve.config import Settings
from fse.serve.listeners import StartupError
from fse.serve.scheduler import Scheduler
from fse.serve.service import GuardService

log = structlog.get_logger("fse.serve.rpc")
# How long the aborting thread waits for the event loop to end the streams and stop the
# daemon before it exits the process itself (the loop may be waiting on that very
# thread: a worker found dead while the context is freed at shutdown).
ABORT_GRACE_SECONDS = 10.0


def add_workers(addresses: Sequence[str]) -> None:
    """Register the workers' devices before the model loads (a worker thread: it
    connects); one that cannot be reached stops the start, naming it."""
    try:
        endpoints = [rpc.parse_endpoint(a, "model.rpc") for a in addresses]
        added = rpc.add_workers(endpoints, "model.rpc")
    except InputError as exc:
        raise StartupError(str(exc)) from None
    log.info("rpc.workers", devices={str(ep): names for ep, names in added.items()})


class RpcWatch:
    """Created once the model is loaded across the workers; `start` when serving."""

    def __init__(
        self,
        endpoints: Sequence[rpc.Endpoint],
        stall_seconds: float,
        scheduler: Scheduler,
        audit: AuditLog,
    ) -> None:
        self.endpoints = list(endpoints)
        self.stall_seconds = stall_seconds
        self.scheduler = scheduler
        self.audit = audit
        self.lost: str | None = None  # why, once lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._not_serving: Callable[[], Coroutine[Any, Any, None]] | None = None
        self._health_task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, settings: Settings, service: GuardService, audit: AuditLog) -> RpcWatch | None:
        """The watch for the daemon's workers; None without any."""
        if not settings.model.rpc:
            return None
        endpoints = [rpc.parse_endpoint(a, "model.rpc") for a in settings.model.rpc]
        return cls(endpoints, settings.model.rpc_stall_seconds, service.scheduler, audit)

    def start(
        self, stop: asyncio.Event, not_serving: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Task[None]:
        """Watch from now on: `stop` is set to stop the daemon, `not_serving` turns its
        health NOT_SERVING. Returns the stall watcher's task."""
        self._loop = asyncio.get_running_loop()
        self._stop, self._not_serving = stop, not_serving
        rpc.on_abort(self.aborted)
        return self._loop.create_task(self._watch_stalls())

    def aborted(self, message: str) -> None:
        """GGML_ABORT, on the thread that aborted (ggml-rpc's dispatcher): the loss goes to
        the event loop, which ends the streams and stops the daemon (its exit comes first);
        this thread never returns to ggml, and exits the process itself (code 1) if the
        loop has not done so within ABORT_GRACE_SECONDS."""
        assert self._loop is not None
        detail = message.rsplit(": ", 1)[-1].strip()  # less ggml's file:line prefix
        log.error("rpc.abort", message=message)
        # Which worker is gone: a killed one refuses connections once its process is
        # torn down, which can come a moment after the reset that brought us here.
        refused: list[str] = []
        for _ in range(10):
            if refused := rpc.lost_workers(self.endpoints):
                break
            time.sleep(0.1)
        self._loop.call_soon_threadsafe(self.lose, f"the connection failed ({detail})", refused)
        threading.Event().wait(ABORT_GRACE_SECONDS)
        log.error("rpc.abort_exit", seconds=ABORT_GRACE_SECONDS)

    async def _watch_stalls(self) -> None:
        every = min(1.0, self.stall_seconds / 4)
        while self.lost is None:
            await asyncio.sleep(every)
            if closed := rpc.closed_by_worker(self.endpoints):  # died while idle
                self.lose("the worker closed the connection", [f"{c} (closed)" for c in closed])
                return
            age = self.scheduler.heartbeat_age()
            if age > self.stall_seconds:
                self.lose(
                    f"no answer for {age:.1f} s (a decode step longer than "
                    f"model.rpc_stall_seconds = {self.stall_seconds:g})"
                )

    def lose(self, why: str, refused: Sequence[str] = ()) -> None:
        """Fail closed, once (event loop); `refused`: the workers known to be gone."""
        if self.lost is not None:
            return
        named = ", ".join(refused) if refused else ", ".join(map(str, self.endpoints))
        self.lost = f"RPC worker lost: {named}: {why}"
        assert self._not_serving is not None and self._stop is not None
        loop = asyncio.get_running_loop()
        self._health_task = loop.create_task(self._not_serving())
        log.error("rpc.worker_lost", workers=list(refused or map(str, self.endpoints)), why=why)
        self.audit.write("rpc.worker_lost", workers=[str(e) for e in self.endpoints], why=why)
        ended = self.scheduler.abandon(self.lost)
        log.error("rpc.streams_ended", streams=ended)
        self._stop.set()
