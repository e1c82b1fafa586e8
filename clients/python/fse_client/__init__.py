"""fse-client: guarded token streams from a libfse daemon, over gRPC.

Depends on grpcio and protobuf only. `Client` is synchronous, `AsyncClient` asyncio;
both yield typed token events and end every generation with exactly one Verdict.
"""

from fse_client.aio import AsyncClient, AsyncGeneration
from fse_client.client import Client, Generation
from fse_client.errors import FseError
from fse_client.types import (
    Completion,
    Device,
    GuardTrip,
    Health,
    Info,
    Limits,
    ModelInfo,
    PolicyInfo,
    Sampling,
    Started,
    Status,
    TokenEvent,
    Verdict,
)

__all__ = [
    "AsyncClient",
    "AsyncGeneration",
    "Client",
    "Completion",
    "Device",
    "FseError",
    "Generation",
    "GuardTrip",
    "Health",
    "Info",
    "Limits",
    "ModelInfo",
    "PolicyInfo",
    "Sampling",
    "Started",
    "Status",
    "TokenEvent",
    "Verdict",
]
