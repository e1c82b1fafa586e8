"""The scheduler's decode thread in this process: what it looks at before each step."""

from __future__ import annotations

import asyncio

from fse.core.faults import NO_FAULTS, Faults
from fse.core.model import Model
from fse.core.policy import load_policies
from fse.core.types import COMPLETED, Request, Sampling, Verdict
from fse.serve.metrics import MetricsSink
from fse.serve.scheduler import Limits
from fse.serve.service import GuardService

REQUEST = Request(prompt="The capital of France is", max_tokens=6, sampling=Sampling(temperature=0))


def test_the_hang_check_looks_only_at_streams_with_a_hang_fault(model: Model) -> None:
    """The debug fault hang@K is checked before each step only for the streams that have
    it: with none, the check is a loop over nothing; a stream with hang@K is watched
    while it runs and no longer once it has ended."""
    service = GuardService(
        model,
        load_policies(),
        Limits(max_streams=2, ctx_per_stream=256),
        n_threads=1,
        allow_faults=True,
    )
    watched: list[int] = []  # per decode step, how many streams the hang check looked at

    class Steps(MetricsSink):
        def step(self, seconds: float) -> None:  # decode thread, right after the check
            watched.append(len(service.scheduler._hang_watch))

    service.scheduler.metrics = Steps()

    async def run(faults: Faults) -> Verdict:
        handle = service.admit(service.prepare(REQUEST, faults))
        while not isinstance(event := await handle.events.get(), Verdict):
            pass
        return event

    service.start()
    try:
        plain = asyncio.run(run(NO_FAULTS))
        steps_plain = len(watched)
        faulted = asyncio.run(run(Faults(hang_at=1000)))  # never reached: 6 tokens first
    finally:
        service.shutdown()
    assert (plain.status, plain.tokens) == (faulted.status, faulted.tokens) == (COMPLETED, 6)
    assert steps_plain > 0 and watched[:steps_plain] == [0] * steps_plain
    assert len(watched) > steps_plain and set(watched[steps_plain:]) == {1}
    assert service.scheduler._hang_watch == []
