"""Continuous batching: one thread owns the llama.cpp context and steps every stream.

Each loop iteration builds one batch holding the next token of every decoding
stream plus prompt chunks of newly admitted ones, calls llama_decode once (the
GIL is released meanwhile), then measures and samples every stream's logits in
one C call spread over a few threads (Context.sample), judges each stream's
token and hands the released events to the asyncio side: queued in one Mailbox per
event loop, woken from inside the next llama_decode call (fse.serve.handoff).
Where a local GPU decodes (`pipelined`), each step's tokens are judged and sent after
the next decode is launched, while the device computes; a token only ever leaves once
its guards have passed it. Streams are llama.cpp sequence ids; a finished stream frees
its sequence (KV cache cleared) for the next one.

Knows nothing of gRPC: the server translates requests into `Request`s and
`Handle.events` into wire messages.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from fse.core.engine import Context, Slot, Step
from fse.core.errors import EngineError
from fse.core.faults import Faults
from fse.core.model import Model
from fse.core.policy import Policy
from fse.core.runner import content_mask
from fse.core.stream import Deadline, GuardedStream
from fse.core.types import (
    CANCELLED,
    DEADLINE,
    ERROR,
    HALTED,
    INTERNAL,
    SHUTDOWN,
    Event,
    Request,
    Status,
    Verdict,
)
from fse.serve.handoff import Mailbox
from fse.serve.metrics import NO_METRICS, MetricsSink

log = structlog.get_logger("fse.serve.scheduler")


class Overloaded(Exception):
    """Every slot is busy and the waiting queue is full."""


class NotAccepting(Exception):
    """The scheduler is draining for shutdown or has stopped."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_streams: int = 8  # sequences decoded together
    max_queue: int = 16  # admitted streams waiting for a free sequence
    ctx_per_stream: int = 2048  # prompt + generated tokens per stream
    max_tokens: int = 2048  # upper bound of Request.max_tokens
    n_batch: int = 512  # tokens per llama_decode call (prompt chunks share it)


@dataclass(eq=False)
class Handle:
    """One stream as the asyncio side sees it: its events and a way to cancel it."""

    request: Request
    policy: Policy
    prompt: list[int]
    faults: Faults
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    deadline: Deadline | None = None  # set once, by submit: request.timeout from admission
    cancelled: bool = False  # set from the asyncio side; read by the scheduler each step
    stream_id: int = 0  # the daemon's own number for the stream (audit log)
    client: str = ""  # who asked: token:NAME, cert:SUBJECT, unix (audit log)
    # What the servicer sent (tokens, characters of text), counted on the event loop;
    # read by the verdict record once the servicer withheld the rest (a protocol error).
    sent: int = 0
    sent_chars: int = 0
    withheld: bool = False
    ended: bool = False  # the verdict is being recorded: too late to withhold anything
    # Set once the verdict's audit line has been written (or kept for a retry): the
    # servicer sends the verdict only then, so a client never sees an unrecorded one.
    recorded: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        self.cancelled = True

    def withhold(self) -> bool:
        """From now on nothing more is sent (event loop). False if the stream's verdict
        is already recorded: then everything it released must still go out."""
        with _ENDING:
            if self.ended:
                return False
            self.withheld = True
            return True

    def end(self) -> tuple[int, int] | None:
        """The stream's verdict is about to be recorded (decode thread): (tokens, chars)
        sent if the servicer withheld the rest, else None (all released goes out)."""
        with _ENDING:
            self.ended = True
            return (self.sent, self.sent_chars) if self.withheld else None


# withhold() and end() decide together whether a verdict counts what was released or
# only what was sent; one lock for all streams, taken once or twice per stream.
_ENDING = threading.Lock()


@dataclass(eq=False)
class _Active:
    handle: Handle
    slot: Slot
    stream: GuardedStream
    next_token: int = -1  # released token to feed at the next decode; -1 while prefilling
    prompt_judged: bool = False  # the prompt guards have had their say (once, after prefill)
    content: list[bool] | None = None  # the prompt tokens judged (content_mask)
    released_at: float | None = None  # perf_counter() of its last released token (metrics)
    # Pipelined: the step sampled after the last decode, judged once the next decode is
    # under way (its token is in that decode already, unless it is the stream's last).
    pending: Step | None = None

    @property
    def next_index(self) -> int:
        """The index of the token this stream would release next."""
        return self.slot.index - (self.pending is not None)


Deliver = list[tuple[Handle, Sequence[Event]]]


class Scheduler:
    """Owns Model + Context on its own thread. `submit` is called from the event loop."""

    def __init__(
        self,
        model: Model,
        limits: Limits,
        n_threads: int,
        *,
        on_stream_end: Callable[[Handle, Verdict], None] | None = None,
        metrics: MetricsSink = NO_METRICS,
        graph_stats: bool = False,
        pipelined: bool = False,
    ) -> None:
        """`pipelined`: judge each step's tokens while the next decode runs (_step); for
        backends whose llama_decode returns before the device has finished (GPUs)."""
        self.model = model
        self.limits = limits
        self.pipelined = pipelined
        self.ctx = Context(
            model,
            n_ctx=limits.ctx_per_stream * limits.max_streams,
            n_seq_max=limits.max_streams,
            n_threads=n_threads,
            n_batch=limits.n_batch,
            graph_stats=graph_stats,
        )
        self._waiting: collections.deque[Handle] = collections.deque()
        self._active: list[_Active] = []
        # The active streams with the debug fault hang@K, the only ones the decode thread
        # looks at before each step: with none (always, unless --allow-debug-faults and a
        # call asked for it) that check is a loop over an empty list.
        self._hang_watch: list[_Active] = []
        self._free_seqs = list(range(limits.max_streams - 1, -1, -1))
        self._wake = threading.Condition()
        # One per event loop that submitted a stream (made there, under _wake); those
        # holding events nobody has woken them for yet (decode thread; see _post).
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox[Deliver]] = {}
        self._unwoken: set[Mailbox[Deliver]] = set()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fse-scheduler", daemon=True)
        self.on_stream_end = on_stream_end  # with each verdict, on the decode thread
        # Read by the watchdog on the event loop: when the current step began (None while
        # idle), and the tokens released so far (for STATUS=).
        self.step_started: float | None = None
        self.tokens_released = 0
        self.metrics = metrics  # called on the decode thread
        # Set by abandon(): the decode thread is stuck in llama.cpp for good (a lost RPC
        # worker) and its streams were ended from outside; if it ever returns, it stops.
        self.abandoned = False

    # -- event-loop side ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def load(self) -> tuple[int, int]:
        """(active, waiting) streams."""
        with self._wake:
            return len(self._active), len(self._waiting)

    def check_capacity(self, extra: int = 0) -> None:
        """Raise NotAccepting while draining, Overloaded if `extra` more streams and one
        would not fit (running + waiting)."""
        with self._wake:
            self._check_capacity(extra)

    def _check_capacity(self, extra: int) -> None:
        """check_capacity, with self._wake held (submit checks and queues under it)."""
        if not self._accepting:  # a drain wins over a full queue: come back elsewhere
            raise NotAccepting("the daemon is shutting down")
        running, waiting, limits = len(self._active), len(self._waiting), self.limits
        if running + waiting + extra >= limits.max_streams + limits.max_queue:
            load = (
                f"{running} streams running, {waiting} waiting and {extra} being prepared"
                if extra
                else f"{running} streams running and {waiting} waiting"
            )
            raise Overloaded(
                f"{load} (max_streams {limits.max_streams}, max_queue {limits.max_queue})"
            )

    def submit(self, handle: Handle, on_queue: Callable[[], None] | None = None) -> None:
        """Queue a validated stream, or raise Overloaded / NotAccepting at once.

        Queued is admitted: its deadline (Deadline.start) runs from now. `on_queue` runs
        once the stream is sure to be queued, before the decode thread can see it (the
        audit log's stream.started comes before anything it does)."""
        with self._wake:
            self._check_capacity(0)
            if handle.loop not in self._mailboxes:
                self._mailboxes[handle.loop] = Mailbox(handle.loop, _put_all)
            handle.deadline = Deadline.start(handle.request.timeout, time.monotonic())
            if on_queue is not None:
                on_queue()
            self._waiting.append(handle)
            self._wake.notify()

    def stop_accepting(self) -> None:
        with self._wake:
            self._accepting = False

    def shutdown(self, timeout: float | None = None) -> bool:
        """End every stream still running or waiting with guard `shutdown`, then stop.

        False if the decode thread did not stop within `timeout` (a llama_decode that
        never returns): its context is then left alone, as freeing it under a running
        decode would crash; the process is about to exit anyway."""
        with self._wake:
            self._accepting = False
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("decode.stuck_at_shutdown", seconds=timeout)
            return False
        self.ctx.close()
        for box in self._mailboxes.values():  # the decode thread wrote its last
            try:
                box.loop.call_soon_threadsafe(box.close)
            except RuntimeError:  # its loop is closed: only the descriptor is left to close
                box.close()
        return True

    def abandon(self, message: str) -> int:
        """End every stream from the calling thread (the event loop) while the decode
        thread is stuck inside llama_decode for good (fse.serve.rpcwatch: a lost RPC
        worker): an `error` verdict, guard `internal`, for each running and waiting one,
        recorded and delivered as usual, without touching the context (the stuck decode
        owns it). Nothing is accepted after. Returns how many streams it ended."""
        deliver: Deliver = []
        with self._wake:
            self.abandoned = True
            self._accepting = False
            active, self._active = self._active, []
            waiting = list(self._waiting)
            self._waiting.clear()
        for a in active:
            a.stream.fail(message)  # an error releases nothing held back
            verdict = a.stream.verdict
            assert verdict is not None
            deliver.append((a.handle, [verdict]))
            self.metrics.verdict(verdict)
            if self.on_stream_end is not None:
                self.on_stream_end(a.handle, verdict)
        for handle in waiting:
            self._end_unstarted(handle, deliver, ERROR, INTERNAL, message=message)
        self._post(deliver)
        self._flush()
        return len(active) + len(waiting)

    # -- scheduler thread -----------------------------------------------------

    def _run(self) -> None:
        while True:
            deliver: Deliver = []
            with self._wake:
                if self._waiting or self._stopping or not self._active:
                    self._flush()  # no decode comes next at once: deliver the last step's now
                while not self._active and not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    self._end_all(deliver)
                    self._post(deliver)
                    self._flush()
                    return
                self._admit(deliver)
            self._sweep(deliver)
            self._post(deliver)  # cancel/deadline verdicts go with the next decode's wake-up
            deliver = []
            if self.abandoned:  # its streams were ended by abandon(): nothing left to do
                self._flush()
                return
            if self._active:
                try:
                    self._step(deliver)
                except EngineError as exc:
                    log.error("decode.failed", error=str(exc))
                    for a in list(self._active):
                        self._close(a, deliver, a.stream.fail(str(exc)))
                finally:
                    self.step_started = None
            self._post(deliver)

    def _admit(self, deliver: Deliver) -> None:
        while self._waiting and self._free_seqs:
            handle = self._waiting.popleft()
            if handle.cancelled:
                self._end_unstarted(handle, deliver, CANCELLED)
                continue
            seq = self._free_seqs.pop()
            try:
                r = handle.request
                stream = GuardedStream(
                    handle.policy,
                    r.stop,
                    handle.faults,
                    max_tokens=r.max_tokens,
                    deadline=handle.deadline,
                )
                slot = Slot(
                    self.ctx,
                    seq,
                    r.sampling,
                    ppl_window=handle.policy.ppl_window,
                    faults=handle.faults,
                    score_prompt=stream.scores_prompt,
                )
                slot.start(handle.prompt)
                content = (
                    content_mask(self.model, handle.request, handle.prompt)
                    if stream.scores_prompt
                    else None
                )
            except (EngineError, MemoryError, ValueError) as exc:
                self._free_seqs.append(seq)
                self._end_unstarted(handle, deliver, ERROR, INTERNAL, message=str(exc))
                continue
            active = _Active(handle, slot, stream, content=content)
            self._active.append(active)
            if handle.faults.hang_at is not None:
                self._hang_watch.append(active)

    def _sweep(self, deliver: Deliver) -> None:
        """Cancelled and overdue streams end before the next decode (within one step),
        waiting ones too: a queued stream must not outlive its deadline or its client."""
        now = time.monotonic()
        with self._wake:
            gone = [
                h
                for h in self._waiting
                if h.cancelled or (h.deadline is not None and h.deadline.passed(now))
            ]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            if h.cancelled:
                self._end_unstarted(h, deliver, CANCELLED)
            else:
                deadline = h.deadline
                assert deadline is not None  # not cancelled: gone for its deadline
                elapsed = now - deadline.started
                self._end_unstarted(h, deliver, HALTED, DEADLINE, elapsed, deadline.seconds)
        for a in list(self._active):
            released = a.stream.before_step(a.handle.cancelled, now, a.next_index)
            if a.stream.verdict is not None:  # a pending step is dropped unjudged
                self._close(a, deliver, released)

    def heartbeat_age(self) -> float:
        """Seconds the current step has been running; 0 while idle."""
        started = self.step_started
        return 0.0 if started is None else time.monotonic() - started

    def _step(self, deliver: Deliver) -> None:
        ctx = self.ctx
        self.step_started = time.monotonic()
        for a in self._hang_watch:  # empty unless a stream has the debug fault hang@K
            if a.slot.index == a.handle.faults.hang_at:
                if self.pipelined:  # an asynchronous decode would return, its outputs never
                    self._judge_pending(deliver)
                self._flush()  # as the decode's own wake-up would have
                threading.Event().wait()  # a llama_decode that never returns (the watchdog test)
        for a in self._active:
            if a.next_token >= 0:
                a.slot.queue_token(a.next_token)
        budget = ctx.n_batch - ctx.n_in_batch
        for a in self._active:
            if a.slot.prefilling and budget > 0:
                budget -= a.slot.queue_prompt(budget)
        if ctx.n_in_batch == 0:  # pipelined, every stream's last token awaits its judgment
            self._judge_pending(deliver)
            return
        began = time.perf_counter()
        ctx.decode(self._wake_fd())
        self._unwoken.clear()  # woken by the decode (if it failed, _flush wakes it later)
        if self.abandoned:  # back from a decode given up for lost: the streams are ended
            return
        self.metrics.step(time.perf_counter() - began)
        if self.pipelined:  # the device decodes meanwhile: judge and send the last tokens
            self._judge_pending(deliver)
        scoring = [a.slot for a in self._active if a.slot._scoring]
        if scoring:  # prompt positions in this batch: their nll, before the next decode
            ctx.score(scoring)
        fresh = [a for a in self._active if not a.prompt_judged and not a.slot.prefilling]
        for a in fresh:  # prompts decoded by this step: judged once, before their first token
            a.prompt_judged = True
            if a.slot.score_prompt and not a.stream.judge_prompt(a.slot.prompt_nll, a.content):
                self._close(a, deliver)
        ready = [a for a in self._active if not a.slot.prefilling]  # the rest: no logits yet
        steps = ctx.sample([a.slot for a in ready])
        if self.pipelined:
            for a, step in zip(ready, steps, strict=True):
                a.pending = step  # judged after the next decode is launched
                a.next_token = -1 if self._is_last(a, step) else step.metrics.token
            return
        for a, step in zip(ready, steps, strict=True):
            self._judge(a, step, deliver)
            a.next_token = step.metrics.token

    def _judge(self, a: _Active, step: Step, deliver: Deliver) -> None:
        released = a.stream.step(step)
        if a.stream.verdict is not None:
            self._close(a, deliver, released)
        else:
            self._release(a, deliver, released)

    def _judge_pending(self, deliver: Deliver) -> None:
        """Pipelined: judge the steps sampled before this decode and send what they
        release now, not at the next decode: the device is busy for a whole step."""
        for a in list(self._active):
            if (step := a.pending) is not None:
                a.pending = None
                self._judge(a, step, deliver)
        self._post(deliver)
        deliver.clear()
        self._flush()

    @staticmethod
    def _is_last(a: _Active, step: Step) -> bool:
        """Whether this step ends its stream whatever the guards say: its token is then not
        decoded (it may not even fit in the sequence's context)."""
        limit = a.stream.max_tokens
        return (
            step.end_of_generation
            or step.metrics.non_finite > 0
            or (limit is not None and step.metrics.index + 1 >= limit)
        )

    def _release(self, a: _Active, deliver: Deliver, released: Sequence[Event]) -> None:
        if released:
            self.tokens_released += len(released)
            deliver.append((a.handle, released))
            self._measure_release(a, len(released))

    def _measure_release(self, a: _Active, n: int) -> None:
        """Per token: one counter increment and one histogram observe, nothing more. A
        stream's first token has no gap; tokens released together are 0 s apart."""
        now = time.perf_counter()
        metrics = self.metrics
        metrics.released(n)
        if a.released_at is not None:
            metrics.gap(now - a.released_at)
        for _ in range(n - 1):
            metrics.gap(0.0)
        a.released_at = now

    def _close(self, a: _Active, deliver: Deliver, released: Sequence[Event] = ()) -> None:
        """The stream has its verdict: release what it let go, free its sequence."""
        self._release(a, deliver, released)
        verdict = a.stream.verdict
        assert verdict is not None
        a.slot.close()  # frees the sampler and clears the sequence's KV cache
        self._active.remove(a)
        if a.handle.faults.hang_at is not None:
            self._hang_watch.remove(a)
        self._free_seqs.append(a.slot.seq)
        deliver.append((a.handle, [verdict]))
        self.metrics.verdict(verdict)
        if self.on_stream_end is not None:
            self.on_stream_end(a.handle, verdict)

    def _end_unstarted(
        self,
        handle: Handle,
        deliver: Deliver,
        status: Status,
        guard: str | None = None,
        value: float | None = None,
        threshold: float | None = None,
        message: str = "",
    ) -> None:
        """Verdict for a stream that never got a sequence (nothing was generated)."""
        stream = GuardedStream(handle.policy)
        token_index = 0 if status == HALTED else None
        stream.finish(status, guard, value, threshold, token_index, message)
        assert stream.verdict is not None
        deliver.append((handle, [stream.verdict]))
        self.metrics.verdict(stream.verdict)
        if self.on_stream_end is not None:
            self.on_stream_end(handle, stream.verdict)

    def _end_all(self, deliver: Deliver) -> None:
        for a in list(self._active):
            self._close(a, deliver, a.stream.finish(HALTED, SHUTDOWN, token_index=a.next_index))
        while self._waiting:
            self._end_unstarted(self._waiting.popleft(), deliver, HALTED, SHUTDOWN)

    def _post(self, deliver: Deliver) -> None:
        """Queue every stream's events for its event loop, one item per loop and step.
        They go out at the next wake-up: from inside the next decode (_wake_fd), or from
        _flush where no decode follows at once; never more than one step late."""
        if not deliver:
            return
        by_box: dict[Mailbox[Deliver], Deliver] = {}
        for handle, events in deliver:
            by_box.setdefault(self._mailboxes[handle.loop], []).append((handle, events))
        for box, items in by_box.items():
            box.put(items)
            self._unwoken.add(box)

    def _flush(self) -> None:
        """Wake every loop with events queued, now."""
        for box in self._unwoken:
            box.wake()
        self._unwoken.clear()

    def _wake_fd(self) -> int:
        """The eventfd the next decode writes to (-1: none); any other loop is woken now."""
        if not self._unwoken:
            return -1
        first, *others = self._unwoken
        for box in others:
            box.wake()
        self._unwoken = {first}  # until the decode returns (_step clears it)
        return first.fd


def _put_all(items: Deliver) -> None:
    for handle, events in items:
        for event in events:
            handle.events.put_nowait(event)
