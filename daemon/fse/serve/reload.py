"""SIGHUP: re-read the policies directory without ever blocking the event loop.

The signal handler only asks for a reload; a task runs it. The files are read in a
worker thread, so a slow disk (or anything that slipped past fse.core.files) costs
that thread, never the health checks, the streams or the watchdog pings. Reloads never
overlap: a SIGHUP during a reload asks for one more pass after it, since the files may
have changed after they were read. Each pass tells systemd RELOADING=1 and ends in
READY=1 with either `policy.loaded` or `policy.reload_rejected` in the audit log: any
error at all keeps the policies that serve now (fail closed) and is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from fse.core.policy import Policy, PolicyError, load_policies
from fse.serve.notify import Notifier

log = structlog.get_logger("fse.serve")

Replace = Callable[[Mapping[str, Policy]], None]
Record = Callable[..., Any]  # AuditLog.write: (event, **fields)


class PolicyReloader:
    def __init__(
        self,
        policies_dir: Path | None,
        replace: Replace,
        record: Record,
        notify: Notifier,
        status: Callable[[], str],
    ) -> None:
        self.policies_dir = policies_dir
        self.replace = replace
        self.record = record
        self.notify = notify
        self.status = status
        self._wanted = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        """The SIGHUP handler (on the event loop): start a reload, or queue one more."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Before STOPPING=1: a reload in flight is abandoned (its READY=1 would tell
        systemd the service runs again). A worker thread still reading finishes alone
        and its result is dropped."""
        self._wanted = False
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False
            self.notify.reloading()
            await self._reload_once()
            self.notify.send("READY=1", self.status())

    async def _reload_once(self) -> None:
        try:
            policies = await asyncio.to_thread(load_policies, self.policies_dir)
            self.replace(policies)
        except Exception as exc:  # fail closed: whatever went wrong, the old set serves
            error = str(exc) if isinstance(exc, PolicyError) else f"{type(exc).__name__}: {exc}"
            log.warning("policy.reload_rejected", error=error)
            self.record("policy.reload_rejected", error=error)
            return
        hashes = {p.name: p.sha256 for p in policies.values()}
        log.info("policy.loaded", policies=hashes)
        self.record("policy.loaded", policies=hashes)
