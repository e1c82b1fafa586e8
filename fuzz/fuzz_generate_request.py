"""Fuzz target: GenerateRequest / ChatMessage decoding and validation, as the daemon runs
them on a Generate call's first message: fse.serve.wire.lenient (protobuf bytes -> a
message or an Undecodable naming the bad field), request_from_wire, then
fse.serve.service.check_request (everything checked without the model).

Two modes: arbitrary bytes as the wire message, and a GenerateClientMessage built from the
input (every field set or not, edge-case numbers, NUL and non-UTF-8 text), serialized,
then maybe cut or with a byte changed.

Invariants: decoding never raises (a refused message is an Undecodable whose error names
a field or the message); explain_undecodable never raises, on any bytes; validation
raises only InputError, with a message; a request that passes has finite sampling values
in their documented ranges, 1 <= max_tokens <= the limit, at most 16 stop sequences of
1..256 bytes, a request_id of at most 128 bytes and a prompt of at most 1 MiB; and
protobuf's own wire-format round trip keeps the request.
"""

from __future__ import annotations

import math

from fse.core.errors import InputError
from fse.serve.scheduler import Limits
from fse.serve.service import check_request
from fse.serve.wire import Undecodable, explain_undecodable, lenient, request_from_wire
from fse_client.v1 import fse_pb2
from fuzzlib import Reader, main, refused

LIMITS = Limits(max_tokens=2047, ctx_per_stream=2048)
PARSE = lenient(fse_pb2.GenerateClientMessage)


def built(reader: Reader) -> bytes:
    """A GenerateClientMessage from the input, serialized (and maybe damaged)."""
    start = fse_pb2.GenerateRequest()
    if reader.chance():
        start.prompt = reader.text(128)
    for _ in range(reader.below(4)):
        start.messages.add(role=reader.text(16), content=reader.text(64))
    if reader.chance():
        start.max_tokens = reader.integer() & 0xFFFFFFFF
    s = start.sampling
    for name in ("temperature", "top_p", "min_p"):
        if reader.chance():
            setattr(s, name, reader.number())
    if reader.chance():
        s.top_k = (reader.integer() & 0xFFFFFFFF) - (1 << 31)
    if reader.chance():
        s.seed = reader.integer() & 0xFFFFFFFF
    if reader.chance():
        start.policy = reader.text(16)
    for _ in range(reader.below(20)):
        start.stop.append(reader.text(300) if reader.chance() else reader.text(8))
    if reader.chance():
        start.request_id = reader.text(200)
    if reader.chance():
        start.timeout_ms = reader.integer() & 0xFFFFFFFF
    msg = fse_pb2.GenerateClientMessage(start=start)
    data: bytes = msg.SerializeToString()
    damage = reader.below(4)
    if data and damage == 1:  # one byte changed: maybe a string no longer UTF-8
        at = reader.below(len(data))
        data = data[:at] + bytes([reader.u8()]) + data[at + 1 :]
    elif damage == 2:
        data = data[: reader.below(len(data) + 1)]
    return data


def one_input(data: bytes) -> None:
    reader = Reader(data)
    wire = built(reader) if reader.chance() else reader.rest()
    assert isinstance(explain_undecodable(wire, fse_pb2.GenerateClientMessage.DESCRIPTOR), str)
    msg = PARSE(wire)
    if isinstance(msg, Undecodable):
        assert msg.error and isinstance(msg.error, str)
        return
    if msg.WhichOneof("kind") != "start":
        return
    again = fse_pb2.GenerateClientMessage.FromString(msg.SerializeToString())
    assert again == msg, "protobuf's round trip changed the message"
    remaining = None if reader.chance() else reader.number()
    if remaining is not None and not (math.isfinite(remaining) and remaining > 0):
        remaining = None  # grpc gives a positive number of seconds, or None
    request = request_from_wire(msg.start, remaining)
    _, error = refused(lambda: check_request(request, LIMITS), InputError)
    if error is not None:
        return
    s = request.sampling
    assert math.isfinite(s.temperature) and s.temperature >= 0, s
    assert s.top_k >= 0 and 0 < s.top_p <= 1 and 0 <= s.min_p <= 1, s
    assert s.seed is None or 0 <= s.seed < 2**32
    assert 1 <= request.max_tokens <= LIMITS.max_tokens
    assert len(request.stop) <= 16 and all(1 <= len(x.encode()) <= 256 for x in request.stop)
    assert len(request.request_id.encode()) <= 128
    assert len(request.prompt.encode("utf-8", "surrogatepass")) <= 1 << 20
    assert request.timeout is None or (math.isfinite(request.timeout) and request.timeout > 0)


if __name__ == "__main__":
    main(one_input)
