"""The pipelined scheduler (fse.serve.scheduler, `pipelined`): where the decode runs on a
GPU, each step's tokens are judged and sent while the next decode runs. Run here on the
CPU backend, where it is forced on: each request alone must release the same tokens and
end with the same verdict as under the step-by-step scheduler, every kind of ending
included (max_tokens, a stop sequence, end of generation, a guard halt, a NaN); all of
them at once must end as well-formed; a cancel, a deadline and a shutdown with a token
pending drop it and name it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from fse.core.faults import NO_FAULTS, Faults
from fse.core.model import Model
from fse.core.placement import Placement, decode_is_async
from fse.core.policy import load_policies
from fse.core.types import (
    CANCELLED,
    COMPLETED,
    END_OF_GENERATION,
    HALTED,
    MAX_TOKENS,
    STOP_SEQUENCE,
    Request,
    Sampling,
    TokenEvent,
    Verdict,
)
from fse.serve.scheduler import Handle, Limits
from fse.serve.service import GuardService
from support.cli import LA_LOOP

GREEDY = Sampling(temperature=0)
CASES: dict[str, tuple[Request, Faults]] = {
    "max_tokens": (
        Request(prompt="The capital of France is", max_tokens=12, sampling=GREEDY),
        NO_FAULTS,
    ),
    "sampled": (
        Request(prompt="Once upon a time", max_tokens=20, sampling=Sampling(seed=3)),
        NO_FAULTS,
    ),
    "stop": (
        Request(prompt="The capital of France is", max_tokens=48, sampling=GREEDY, stop=(" of",)),
        NO_FAULTS,
    ),
    # The embedded model answers a JSON object with a newline and its end of generation.
    "eog": (
        Request(prompt='{"name": "Alice", "age": 30}', max_tokens=32, sampling=GREEDY),
        NO_FAULTS,
    ),
    "loop": (Request(prompt=LA_LOOP, max_tokens=40, sampling=GREEDY, policy="pro"), NO_FAULTS),
    "nan": (Request(prompt="Count: 1, 2, 3,", max_tokens=16, sampling=GREEDY), Faults(nan_at=3)),
    "one_token": (Request(prompt="Hello", max_tokens=1, sampling=GREEDY), NO_FAULTS),
}
Outcome = tuple[list[int], Verdict]


def service(model: Model, pipelined: bool) -> GuardService:
    return GuardService(
        model,
        load_policies(),
        Limits(max_streams=4, max_queue=8, ctx_per_stream=256),
        n_threads=2,
        allow_faults=True,
        pipelined=pipelined,
    )


async def run(svc: GuardService, request: Request, faults: Faults) -> Outcome:
    handle = svc.admit(svc.prepare(request, faults))
    tokens: list[int] = []
    while True:
        event = await handle.events.get()
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
        else:
            assert isinstance(event, Verdict)
            return tokens, event


def run_all(svc: GuardService, together: bool) -> dict[str, Outcome]:
    """Every case, one after another (the same batches in both modes: llama.cpp's sums
    may round differently when a batch holds other streams, which sampling can amplify
    into another token), or all at once."""

    async def main() -> dict[str, Outcome]:
        if together:
            outcomes = await asyncio.gather(*(run(svc, r, f) for r, f in CASES.values()))
        else:
            outcomes = [await run(svc, r, f) for r, f in CASES.values()]
        return dict(zip(CASES, outcomes, strict=True))

    return asyncio.run(main())


@pytest.fixture(scope="module")
def outcomes(model: Model) -> Iterator[dict[str, dict[str, Outcome]]]:
    found: dict[str, dict[str, Outcome]] = {}
    for mode in ("steps", "pipelined", "pipelined together"):
        svc = service(model, pipelined=mode != "steps")
        svc.start()
        try:
            found[mode] = run_all(svc, together=mode.endswith("together"))
        finally:
            assert svc.shutdown(30)
    yield found


def key(verdict: Verdict) -> tuple[object, ...]:
    return (
        verdict.status,
        verdict.guard,
        verdict.token_index,
        verdict.tokens,
        verdict.text,
        verdict.completion,
    )


def test_pipelined_releases_the_same_tokens_and_verdicts(
    outcomes: dict[str, dict[str, Outcome]],
) -> None:
    for name in CASES:
        (tokens, verdict), (p_tokens, p_verdict) = (
            outcomes["steps"][name],
            outcomes["pipelined"][name],
        )
        assert p_tokens == tokens, name
        assert key(p_verdict) == key(verdict), name
        assert verdict.tokens == len(tokens), name


@pytest.mark.parametrize("mode", ["pipelined", "pipelined together"])
def test_every_kind_of_ending_was_exercised(
    outcomes: dict[str, dict[str, Outcome]], mode: str
) -> None:
    """The comparison above means something only if the cases end as intended; so must
    they with every stream in the same batches."""
    got = {name: outcomes[mode][name][1] for name in CASES}
    for name, (tokens, verdict) in outcomes[mode].items():
        assert verdict.tokens == len(tokens), name
        if verdict.status == HALTED:
            assert verdict.token_index == verdict.tokens, name
    assert (got["max_tokens"].status, got["max_tokens"].completion) == (COMPLETED, MAX_TOKENS)
    assert got["max_tokens"].tokens == 12
    assert got["stop"].completion == STOP_SEQUENCE
    assert got["eog"].completion == END_OF_GENERATION and got["eog"].tokens < 32
    assert (got["loop"].status, got["loop"].guard) == (HALTED, "loop")
    assert (got["nan"].status, got["nan"].guard, got["nan"].token_index) == (
        HALTED,
        "non_finite",
        3,
    )
    assert got["one_token"].tokens == 1


def test_a_deadline_cancel_or_shutdown_with_a_token_pending_names_the_token_withheld(
    model: Model,
) -> None:
    """A stream ended between steps has one sampled token not yet judged: it is dropped,
    and a deadline's or a shutdown's verdict names it as the withheld one (its index =
    the tokens released)."""
    svc = service(model, pipelined=True)
    svc.start()
    story = Request(prompt="Once upon a time", max_tokens=200, sampling=GREEDY)

    async def tokens_then(handle: Handle, n: int, then: Callable[[], object]) -> Verdict:
        seen = 0
        while not isinstance(event := await handle.events.get(), Verdict):
            seen += 1
            if seen == n:
                then()
        return event

    async def main() -> tuple[Verdict, Verdict, Verdict]:
        timed = Request(prompt="Once upon a time", max_tokens=200, sampling=GREEDY, timeout=1.0)
        deadline = asyncio.ensure_future(run(svc, timed, NO_FAULTS))
        handle = svc.admit(svc.prepare(story))
        cancelled = await tokens_then(handle, 5, handle.cancel)
        timed_out = (await deadline)[1]
        handle = svc.admit(svc.prepare(story))
        loop = asyncio.get_running_loop()
        stopped = await tokens_then(handle, 5, lambda: loop.run_in_executor(None, svc.shutdown, 30))
        return timed_out, cancelled, stopped

    try:
        timed_out, cancelled, stopped = asyncio.run(main())
    finally:
        svc.shutdown(30)
    assert (timed_out.status, timed_out.guard) == (HALTED, "deadline")
    assert timed_out.token_index == timed_out.tokens < 200
    assert cancelled.status == CANCELLED and 5 <= cancelled.tokens < 200
    assert (stopped.status, stopped.guard) == (HALTED, "shutdown")
    assert stopped.token_index == stopped.tokens and 5 <= stopped.tokens < 200


def test_only_a_local_gpu_gets_the_pipeline() -> None:
    assert decode_is_async(Placement("CUDA", 18, 18, ()))
    assert decode_is_async(Placement("Vulkan", 18, 18, ()))
    assert not decode_is_async(Placement("CPU", 18, 0, ()))
    assert not decode_is_async(Placement("RPC", 18, 18, ()))


def test_a_decode_that_never_returns_still_lets_out_the_tokens_judged_before_it(
    model: Model,
) -> None:
    """The debug fault hang@K blocks the decode that yields token K: as with an
    asynchronous decode whose outputs never come, tokens 0..K-1 are judged and sent
    (the watchdog's test relies on it), and nothing after them."""
    svc = service(model, pipelined=True)
    svc.start()

    async def main() -> list[int]:
        request = Request(prompt="Once upon a time", max_tokens=10, sampling=GREEDY)
        handle = svc.admit(svc.prepare(request, Faults(hang_at=3)))
        tokens: list[int] = []
        while len(tokens) < 3:
            event = await asyncio.wait_for(handle.events.get(), 60)
            assert isinstance(event, TokenEvent), event
            tokens.append(event.index)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle.events.get(), 1.0)
        return tokens

    try:
        assert asyncio.run(main()) == [0, 1, 2]
    finally:
        assert not svc.shutdown(0.5)  # the decode thread stays stuck, as a hung GPU would
