"""The asyncio client.

async with AsyncClient("unix:/run/fse/fse.sock") as client:
    generation = await client.generate("The capital of France is", max_tokens=16)
    async for event in generation:    # TokenEvent..., then the Verdict
        ...                           # await generation.cancel()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
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


class AsyncGeneration:
    """One Generate stream; `async for` yields token events, then the verdict."""

    def __init__(self, call: Any, addr: str) -> None:
        self._call = call
        self._addr = addr
        self.started: Started | None = None
        self.verdict: Verdict | None = None
        self._cancel_sent = False

    async def cancel(self) -> None:
        """Send a Cancel message; the stream still ends with a `cancelled` verdict.

        Once sent, or once the daemon has ended the call (its verdict may still be unread
        behind buffered tokens), there is nothing left to cancel: a no-op, not an error."""
        if self.verdict is not None or self._cancel_sent or self._call.done():
            return
        self._cancel_sent = True
        try:
            await self._call.write(wire.CANCEL)
        except grpc.RpcError as exc:
            if not self._call.done():
                raise error_from_rpc(exc, self._addr) from None

    def close(self) -> None:
        """Abandon the call (the daemon cancels the stream)."""
        self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for message in self._call:
                kind = message.WhichOneof("kind")
                if kind == "started":
                    self.started = wire.started_from_wire(message.started)
                elif kind == "token":
                    yield wire.token_from_wire(message.token)
                elif kind == "verdict":
                    self.verdict = wire.verdict_from_wire(message.verdict)
                    await self._call.done_writing()
                    yield self.verdict
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self._addr) from None
        if self.verdict is None:
            raise FseError(
                grpc.StatusCode.UNKNOWN,
                f"the daemon at {self._addr} ended the stream without a verdict",
            )


class AsyncClient:
    """The asyncio twin of fse_client.Client (same arguments)."""

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
            addr, tls_ca, options, aio=True, tls_cert=tls_cert, tls_key=tls_key
        )
        self._stub = fse_pb2_grpc.GuardStub(self._channel)
        self._metadata = call_metadata(token)

    async def generate(
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
    ) -> AsyncGeneration:
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
        call = self._stub.Generate(metadata=[*self._metadata, *metadata])
        try:
            await call.write(start)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.addr) from None
        return AsyncGeneration(call, self.addr)

    async def info(self, timeout: float | None = 10.0) -> Info:
        try:
            reply = await self._stub.GetInfo(
                fse_pb2.GetInfoRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.addr) from None
        return wire.info_from_wire(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
