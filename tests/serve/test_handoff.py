"""The decode thread's handoff to the event loop (fse.serve.handoff, native/fse_decode.c):
events reach the loop at a wake-up and not before, in order, with nothing lost at close;
the decode call itself writes the wake-up."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from fse.core.engine import Context
from fse.core.model import Model
from fse.serve.handoff import Mailbox


async def _spin(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0.01)


def test_items_reach_the_loop_in_order_at_the_wake_up_and_not_before() -> None:
    async def run() -> None:
        got: list[int] = []
        box = Mailbox(asyncio.get_running_loop(), got.append)
        try:
            for i in range(3):
                box.put(i)
            await _spin()
            assert got == []  # queued, nobody woke the loop
            box.wake()
            await _spin()
            assert got == [0, 1, 2]
            box.wake()  # a wake-up with nothing queued delivers nothing twice
            await _spin()
            assert got == [0, 1, 2]
        finally:
            box.close()

    asyncio.run(run())


def test_another_thread_writing_the_eventfd_wakes_the_loop_as_the_decode_does() -> None:
    async def run() -> None:
        got: list[str] = []
        box = Mailbox(asyncio.get_running_loop(), got.append)
        try:

            def decode_thread() -> None:
                box.put("token")
                os.eventfd_write(box.fd, 1)  # what fse_decode writes

            thread = threading.Thread(target=decode_thread)
            thread.start()
            thread.join()
            await _spin()
            assert got == ["token"]
        finally:
            box.close()

    asyncio.run(run())


def test_close_delivers_what_is_left_and_a_late_wake_up_writes_nothing() -> None:
    async def run() -> list[str]:
        got: list[str] = []
        box = Mailbox(asyncio.get_running_loop(), got.append)
        box.put("verdict")  # never woken: close must still hand it over
        box.close()
        assert got == ["verdict"]
        with pytest.raises(OSError):
            os.fstat(box.fd)  # closed
        box.wake()  # no error, and no write into whatever file reuses the number
        box.close()  # twice is harmless
        return got

    assert asyncio.run(run()) == ["verdict"]


def test_closing_on_a_closed_loop_closes_the_descriptor() -> None:
    loop = asyncio.new_event_loop()
    box: Mailbox[int] = Mailbox(loop, lambda _: None)
    loop.close()
    box.close()
    with pytest.raises(OSError):
        os.fstat(box.fd)


def test_the_decode_call_writes_the_wake_up_and_only_when_asked(model: Model) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with Context(model, n_ctx=256, n_threads=1) as ctx:
            ctx.add(model.tokenize("Hello")[0], 0, 0, True)
            ctx.decode()
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)  # nothing written without a wake_fd
            ctx.add(model.tokenize("Hello")[0], 1, 0, True)
            ctx.decode(fd)
            assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)
