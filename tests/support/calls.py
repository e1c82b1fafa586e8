"""Calls by method path, below the generated stubs: what the call attack tests send."""

from __future__ import annotations

from typing import Any

from fse_client.v1 import fse_pb2

GENERATE = "/fse.v1.Guard/Generate"
GET_INFO = "/fse.v1.Guard/GetInfo"


def generate_call(channel: Any) -> Any:
    """fse.v1.Guard/Generate on a grpc channel (sync or aio)."""
    return channel.stream_stream(
        GENERATE,
        request_serializer=fse_pb2.GenerateClientMessage.SerializeToString,
        response_deserializer=fse_pb2.GenerateServerMessage.FromString,
    )


def start_message(**fields: Any) -> fse_pb2.GenerateClientMessage:
    return fse_pb2.GenerateClientMessage(start=fse_pb2.GenerateRequest(**fields))


def refusals_of(records: list[dict[str, Any]], event: str, client: str) -> tuple[int, int, int]:
    """(records written in full, summaries, refusals counted in summaries) of a peer."""
    full = [r for r in records if r["event"] == event and r.get("client", "").startswith(client)]
    summaries = [r for r in records if r["event"] == f"{event}_summary" and r["client"] == client]
    return len(full), len(summaries), sum(r["count"] for r in summaries)
