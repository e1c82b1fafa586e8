"""GuardService in this process: prepare has no side effects, admit queues.

The daemon prepares large requests in a worker thread, so a request whose RPC is
cancelled meanwhile must leave nothing behind in the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fse.core.model import Model
from fse.core.policy import load_policies
from fse.core.types import COMPLETED, Request, Sampling, TokenEvent, Verdict
from fse.serve.audit import AuditLog, verify
from fse.serve.scheduler import Handle, Limits
from fse.serve.service import GuardService, InvalidRequest


@pytest.fixture(scope="module")
def service(model: Model) -> Iterator[GuardService]:
    svc = GuardService(
        model, load_policies(), Limits(max_streams=2, ctx_per_stream=256), n_threads=1
    )
    svc.start()
    yield svc
    svc.shutdown()


def test_prepare_queues_nothing(service: GuardService) -> None:
    request = Request(prompt="The capital of France is", max_tokens=4)
    prepared = service.prepare(request)
    assert prepared.prompt[:1] == [service.model.tokenize("x")[0]]  # BOS first
    assert len(prepared.prompt) > 3
    assert prepared.policy.name == "default"
    assert prepared.request.sampling.seed is not None  # drawn now, reported in Started
    assert service.scheduler.load == (0, 0)


def test_prepare_names_the_field(service: GuardService) -> None:
    with pytest.raises(InvalidRequest, match=r"^policy: unknown policy 'nope'; accepted: "):
        service.prepare(Request(prompt="hi", max_tokens=4, policy="nope"))
    # The count is the prompt's whole length, found without listing its tokens.
    n_tokens = len(service.model.tokenize("word " * 400))
    with pytest.raises(
        InvalidRequest,
        match=rf"^prompt: {n_tokens} tokens do not fit the context of 256 tokens per stream; "
        "accepted: at most 255 tokens$",
    ):
        service.prepare(Request(prompt="word " * 400, max_tokens=4))
    assert service.scheduler.load == (0, 0)


def test_prepare_in_a_thread_then_admit_on_the_loop(service: GuardService) -> None:
    """The daemon's path for large requests: prepare off the loop, admit on it."""
    request = Request(
        prompt="The capital of France is", max_tokens=6, sampling=Sampling(temperature=0)
    )

    async def run() -> list[TokenEvent | Verdict]:
        prepared = await asyncio.to_thread(service.prepare, request)
        assert threading.current_thread() is threading.main_thread()
        handle = service.admit(prepared)
        events: list[TokenEvent | Verdict] = []
        while not events or not isinstance(events[-1], Verdict):
            events.append(await handle.events.get())
        return events

    events = asyncio.run(run())
    verdict = events[-1]
    assert isinstance(verdict, Verdict)
    assert (verdict.status, verdict.tokens) == (COMPLETED, 6)
    assert [e.index for e in events[:-1] if isinstance(e, TokenEvent)] == list(range(6))
    assert service.scheduler.load == (0, 0)


def test_a_slow_audit_device_does_not_stall_decoding(model: Model, tmp_path: Path) -> None:
    """A stream's verdict is posted to the audit log's writer thread: while the device
    hangs on that line, the decode thread goes on and other streams finish; the line is
    written, in its place in the chain, once the device answers."""
    log = AuditLog(tmp_path / "audit.jsonl")
    hanging, answer = threading.Event(), threading.Event()
    append = log._append

    def slow_append(data: bytes) -> None:
        if b'"event":"stream.verdict"' in data and not answer.is_set():
            hanging.set()
            answer.wait(120)
        append(data)

    log._append = slow_append  # type: ignore[method-assign]
    svc = GuardService(
        model, load_policies(), Limits(max_streams=2, ctx_per_stream=256), n_threads=1, audit=log
    )
    svc.start()
    greedy = Sampling(temperature=0)

    async def verdict_of(handle: Handle) -> Verdict:
        while not isinstance(event := await handle.events.get(), Verdict):
            pass
        return event

    async def run() -> Verdict:
        short = svc.admit(svc.prepare(Request(prompt="One", max_tokens=1, sampling=greedy)))
        long = svc.admit(svc.prepare(Request(prompt="Two", max_tokens=24, sampling=greedy)))
        await verdict_of(short)
        assert await asyncio.to_thread(hanging.wait, 60), "the short verdict was never written"
        # Before: the decode thread itself hung in the write, and this timed out.
        return await asyncio.wait_for(verdict_of(long), 60)

    try:
        verdict = asyncio.run(run())
        assert (verdict.status, verdict.tokens) == (COMPLETED, 24)
        answer.set()
        deadline = time.monotonic() + 30
        while not log.retry() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        answer.set()
        svc.shutdown()
        log.close()
    events = [
        json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()
    ]
    assert events == ["stream.started"] * 2 + ["stream.verdict"] * 2
    assert verify(tmp_path / "audit.jsonl").ok
