"""One exception type for every failure of a call: the gRPC status code and the message."""

from __future__ import annotations

import grpc

# grpc-core's wording when no connection could be made at all.
_UNREACHABLE_MARKS = ("failed to connect", "connection refused", "no such file", "dns resolution")


class FseError(Exception):
    """A call failed: `code` is the gRPC status, `message` the daemon's (or gRPC's) words."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def error_from_rpc(exc: grpc.RpcError, addr: str) -> FseError:
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(
        m in details.lower() for m in _UNREACHABLE_MARKS
    ):
        return FseError(code, f"cannot reach the daemon at {addr} ({details})")
    return FseError(code, details)
