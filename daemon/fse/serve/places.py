"""Places: what one caller, and every caller together, may hold at once, whatever door
they came in by (gRPC or HTTP).

A call holds a place from the moment it is let in until it ends, whether it is waiting
for its request, being prepared or running: one of its caller's `per_client_streams`
and, until the scheduler has it (`queued`), one of the daemon's max_streams + max_queue.
Both doors share one `Places`, so a caller cannot double its limit by using both.
"""

from __future__ import annotations

import collections

from fse.serve.scheduler import NotAccepting, Overloaded, Scheduler


class PerCallerLimit(Exception):
    """This caller already runs per_client_streams streams."""


class Places:
    """The places held, by caller, and those the scheduler does not have yet. Event
    loop only."""

    def __init__(self, per_client_streams: int = 0) -> None:
        self.per_client_streams = per_client_streams  # 0 = no per-caller limit
        self._calls_of: collections.Counter[str] = collections.Counter()
        self.pending = 0  # places held by calls the scheduler does not have yet

    def no_room(
        self, scheduler: Scheduler, caller: str
    ) -> PerCallerLimit | Overloaded | NotAccepting | None:
        """Why a new call gets no place (a drain first, then the per-caller limit, then
        overload: places held by calls the scheduler does not have yet count as load)."""
        limit = self.per_client_streams
        try:
            scheduler.check_capacity(extra=self.pending)
        except NotAccepting as exc:
            return exc
        except Overloaded as exc:
            if not (limit and self._calls_of[caller] >= limit):
                return exc
        if limit and self._calls_of[caller] >= limit:
            return PerCallerLimit(
                f"per-caller limit: {caller} already runs {limit} streams "
                f"(per_client_streams {limit})"
            )
        return None

    def hold(self, caller: str) -> None:
        """Take a place for `caller` (pending until `queued`)."""
        self._calls_of[caller] += 1
        self.pending += 1

    def queued(self) -> None:
        """A held call is with the scheduler now (or was refused): no longer pending."""
        self.pending -= 1

    def release(self, caller: str) -> None:
        """A held call ended."""
        self._calls_of[caller] -= 1
        if not self._calls_of[caller]:
            del self._calls_of[caller]
