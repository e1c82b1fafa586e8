"""The synchronous client.

with Client("unix:/run/fse/fse.sock") as client:
    generation = client.generate("The capital of France is", max_tokens=16)
    for event in generation:          # TokenEvent..., then the Verdict
        ...                           # generation.cancel() stops it within one step
    print(generation.verdict)
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from fse_client import wire
from fse_client.channel import Metadata, call_metadata, check_address, open_channel
from fse_client.errors import FseError, error_from_rpc
from fse_client.types import Info, Sampling, Started, TokenEvent, Verdict
from fse_client.v1 import fse_pb2, fse_pb2_grpc

Event = TokenEvent | Verdict


def _until_none(
    outgoing: queue.SimpleQueue[fse_pb2.GenerateClientMessage | None],
) -> Iterator[fse_pb2.GenerateClientMessage]:
    """The request stream: what is put on the queue, until None (a blocking get, no poll)."""
    while (message := outgoing.get()) is not None:
        yield message


class Generation:
    """One Generate stream. Iterating yields token events, then the verdict, and ends.

    `cancel()` (from any thread) asks the daemon to stop: the stream still ends with a
    `cancelled` verdict. A gRPC failure raises FseError, never a made-up verdict."""

    def __init__(
        self,
        stub: fse_pb2_grpc.GuardStub,
        start: fse_pb2.GenerateClientMessage,
        metadata: Metadata,
        addr: str,
    ) -> None:
        self._addr = addr
        # What the request stream sends; None ends it. A blocking get, not a poll.
        self._outgoing: queue.SimpleQueue[fse_pb2.GenerateClientMessage | None] = (
            queue.SimpleQueue()
        )
        self._outgoing.put(start)
        # The request stream must not refer back to this object: grpc's call object would
        # then sit in a reference cycle, and its __del__, run by the cyclic collector at
        # any moment, takes a lock that the interrupted code may hold (a hang at exit).
        self._call: Any | None = stub.Generate(_until_none(self._outgoing), metadata=metadata)
        self.started: Started | None = None
        self.verdict: Verdict | None = None

    def cancel(self) -> None:
        """Send a Cancel message; the daemon ends the stream within one decode step."""
        self._outgoing.put(wire.CANCEL)

    def close(self) -> None:
        """Abandon the call (the daemon sees the client go away and cancels it)."""
        self._outgoing.put(None)
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __iter__(self) -> Iterator[Event]:
        if self._call is None:
            raise FseError(grpc.StatusCode.CANCELLED, "this generation was closed or read")
        try:
            for message in self._call:
                kind = message.WhichOneof("kind")
                if kind == "started":
                    self.started = wire.started_from_wire(message.started)
                elif kind == "token":
                    yield wire.token_from_wire(message.token)
                elif kind == "verdict":
                    self.verdict = wire.verdict_from_wire(message.verdict)
                    self._outgoing.put(None)  # nothing more to send: half-close now
                    yield self.verdict
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._addr) from None
        finally:
            # Done with the call (or abandoned: cancel it). grpc's call object must not
            # outlive its use: freed at interpreter exit, its __del__ can wait forever on
            # a lock held by one of grpc's threads that exit has already frozen.
            self.close()
        if self.verdict is None:
            raise FseError(
                grpc.StatusCode.UNKNOWN,
                f"the daemon at {self._addr} ended the stream without a verdict",
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.verdict is None:
            self.close()


class Client:
    """A channel to one daemon. `addr` is unix:PATH or HOST:PORT; `tls_ca` (PEM bytes or a
    path) makes it TLS; `tls_cert` and `tls_key` (PEM bytes or paths, both or neither)
    present a client certificate for mutual TLS; `token` is sent as `authorization: Bearer
    TOKEN` on every call."""

    def __init__(
        self,
        addr: str,
        *,
        tls_ca: bytes | str | Path | None = None,
        tls_cert: bytes | str | Path | None = None,
        tls_key: bytes | str | Path | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.addr = check_address(addr)
        self._channel = open_channel(
            addr, tls_ca, options, aio=False, tls_cert=tls_cert, tls_key=tls_key
        )
        self._stub = fse_pb2_grpc.GuardStub(self._channel)
        self._metadata = call_metadata(token)

    def generate(
        self,
        prompt: str = "",
        *,
        messages: Sequence[tuple[str, str]] = (),
        max_tokens: int = 256,
        sampling: Sampling | None = None,
        policy: str = "",
        stop: Sequence[str] = (),
        request_id: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Generation:
        """Start a guarded generation (a prompt, or chat messages as (role, content))."""
        start = wire.start_message(
            prompt,
            messages=messages,
            max_tokens=max_tokens,
            sampling=sampling,
            policy=policy,
            stop=stop,
            request_id=request_id,
            timeout=timeout,
        )
        return Generation(self._stub, start, [*self._metadata, *metadata], self.addr)

    def info(self, timeout: float | None = 10.0) -> Info:
        """The served model, the policies a request may name, and the limits."""
        try:
            reply = self._stub.GetInfo(
                fse_pb2.GetInfoRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.addr) from None
        return wire.info_from_wire(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
