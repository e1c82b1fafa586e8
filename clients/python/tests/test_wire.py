"""fse_client without a daemon: wire translation, rendering, exit codes, argument checks."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from fse_client import Completion, Device, FseError, Health, Sampling, Status
from fse_client import cli as example
from fse_client.channel import check_address
from fse_client.errors import error_from_rpc
from fse_client.v1 import fse_pb2
from fse_client.wire import info_from_wire, start_message, token_from_wire, verdict_from_wire


def test_unspecified_health_is_none_not_a_crash() -> None:
    event = token_from_wire(fse_pb2.Token(index=0, id=5, text="a", health=0))
    assert event.health is None
    assert example.token_json(event)["health"] is None


def test_unknown_status_is_an_error_never_completed() -> None:
    assert verdict_from_wire(fse_pb2.Verdict(status=0)).status == Status.ERROR
    assert verdict_from_wire(fse_pb2.Verdict(status=99)).status == Status.ERROR


def test_unset_optional_fields_stay_unset() -> None:
    v = verdict_from_wire(fse_pb2.Verdict(status=fse_pb2.STATUS_COMPLETED, tokens=3))
    assert (v.guard, v.value, v.threshold, v.token_index) == (None, None, None, None)
    halted = verdict_from_wire(
        fse_pb2.Verdict(status=fse_pb2.STATUS_HALTED, guard="l2_norm", value=0.0, token_index=0)
    )
    assert (halted.value, halted.token_index, halted.threshold) == (0.0, 0, None)


@pytest.mark.parametrize(
    ("wire", "completion"),
    [
        (fse_pb2.COMPLETION_END_OF_GENERATION, Completion.END_OF_GENERATION),
        (fse_pb2.COMPLETION_STOP_SEQUENCE, Completion.STOP_SEQUENCE),
        (fse_pb2.COMPLETION_MAX_TOKENS, Completion.MAX_TOKENS),
    ],
)
def test_completion_says_why_a_completed_stream_ended(wire: int, completion: Completion) -> None:
    v = verdict_from_wire(
        fse_pb2.Verdict(
            status=fse_pb2.STATUS_COMPLETED,
            completion=wire,  # type: ignore[arg-type]
            tokens=3,
            policy="default",
            policy_sha256="ab" * 32,
        )
    )
    assert v.completion == completion
    doc = json.loads(json.dumps(example.verdict_json(v)))
    assert doc["completion"] == completion.value
    assert list(doc)[:3] == ["type", "status", "completion"]
    assert example.verdict_line(v) == (
        f"[completed at {completion.value}] 3 tokens released · policy default (abababababab)"
    )


def test_unspecified_or_unknown_completion_is_null() -> None:
    for status, completion in [(fse_pb2.STATUS_HALTED, 0), (fse_pb2.STATUS_COMPLETED, 0), (1, 99)]:
        v = verdict_from_wire(fse_pb2.Verdict(status=status, completion=completion))  # type: ignore[arg-type]
        assert v.completion is None
        assert example.verdict_json(v)["completion"] is None
    # A daemon from before the field: a completed verdict without a reason.
    assert example.verdict_line(verdict_from_wire(fse_pb2.Verdict(status=1))).startswith(
        "[completed] 0 tokens released"
    )


def test_start_message_sends_only_given_sampling_fields() -> None:
    msg = start_message("hi", sampling=Sampling(temperature=0.0, seed=7), timeout=0.0004)
    s = msg.start.sampling
    assert s.HasField("temperature") and s.temperature == 0.0 and s.seed == 7
    assert not s.HasField("top_k") and not s.HasField("top_p") and not s.HasField("min_p")
    assert msg.start.timeout_ms == 1  # never 0 (= no deadline) for a positive timeout


def test_json_numbers_round_trip_and_non_finite_is_null() -> None:
    x = 0.1 + 0.2  # 0.30000000000000004: needs all 17 digits
    event = token_from_wire(fse_pb2.Token(nll=x, ppl=math.inf, variance=math.nan, health=1))
    doc = json.loads(json.dumps(example.token_json(event)))
    assert doc["nll"] == x and doc["ppl"] is None and doc["variance"] is None
    assert doc["health"] == Health.GREEN.value


def test_entropy_is_carried_and_printed_after_l2_norm() -> None:
    event = token_from_wire(
        fse_pb2.Token(index=2, id=9, text="x", l2_norm=2574.2, entropy=1.2345678901234567, health=1)
    )
    assert event.entropy == 1.2345678901234567
    doc = json.loads(json.dumps(example.token_json(event)))
    assert doc["entropy"] == 1.2345678901234567  # the same double, all 17 digits
    keys = ["type", "index", "id", "text", "nll", "ppl", "variance", "max_prob", "l2_norm"]
    assert list(doc) == [*keys, "entropy", "health"]
    infinite = token_from_wire(fse_pb2.Token(entropy=math.inf, health=1))
    assert example.token_json(infinite)["entropy"] is None


def test_verdict_line_formats_like_c() -> None:
    v = verdict_from_wire(
        fse_pb2.Verdict(
            status=fse_pb2.STATUS_HALTED,
            guard="l2_norm",
            value=2574.2049,
            threshold=10.0,
            token_index=0,
            policy="test",
            policy_sha256="ab" * 32,
        )
    )
    assert example.verdict_line(v) == (
        "[halted by l2_norm: value 2574.2, threshold 10, at token 0] "
        "0 tokens released · policy test (abababababab)"
    )


@pytest.mark.parametrize("addr", ["unix:/tmp/x.sock", "unix:///tmp/x", "localhost:50051"])
def test_addresses_accepted(addr: str) -> None:
    assert check_address(addr) == addr


@pytest.mark.parametrize("addr", ["", "unix:", "localhost", ":80", "host:0", "host:http"])
def test_addresses_refused_with_the_forms(addr: str) -> None:
    with pytest.raises(ValueError, match="unix:PATH or HOST:PORT"):
        check_address(addr)


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_unreachable_is_told_apart_from_a_refusal() -> None:
    down = error_from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "failed to connect to all"), "a:1")
    assert down.message.startswith("cannot reach the daemon at a:1")
    refused = error_from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "audit log: disk full"), "a:1")
    assert refused.message == "audit log: disk full"
    assert str(refused) == "UNAVAILABLE: audit log: disk full"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--addr", "unix:/x", "--max-tokens", "0", "hi"], "--max-tokens: 0 is invalid"),
        (["--addr", "unix:/x", "--timeout", "-1", "hi"], "--timeout: -1.0 is invalid"),
        (["--addr", "unix:/x", "--cancel-after", "0", "hi"], "--cancel-after: 0 is invalid"),
        (["--addr", "unix:/x", ""], "PROMPT: must not be empty"),
        (["--addr", "nowhere", "hi"], "--addr: address 'nowhere' is invalid"),
        (["--addr", "unix:/x", "--top-k", "many", "hi"], "--top-k: invalid int value"),
        (["--addr", "a:1", "--tls-ca", "c", "--tls-cert", "c", "hi"], "--tls-key: required"),
        (["--addr", "a:1", "--tls-ca", "c", "--tls-key", "k", "hi"], "--tls-cert: required"),
        (["--addr", "a:1", "--tls-cert", "c", "--tls-key", "k", "hi"], "--tls-ca: required"),
        (
            [
                "--addr",
                "a:1",
                "--tls-ca",
                __file__,
                "--tls-cert",
                "/nonexistent/c.pem",
                "--tls-key",
                __file__,
                "hi",
            ],
            "--tls-cert: /nonexistent/c.pem: cannot read",
        ),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        example.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("guarded-generate: error: ") and words in err[0]


def test_invalid_argument_from_the_daemon_is_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(args: object) -> int:
        raise FseError(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: 9 is out of range")

    monkeypatch.setattr(example, "run", refuse)
    assert example.main(["--addr", "unix:/x", "hi"]) == 2
    monkeypatch.setattr(
        example, "run", lambda a: (_ for _ in ()).throw(FseError(grpc.StatusCode.INTERNAL, "x"))
    )
    assert example.main(["--addr", "unix:/x", "hi"]) == 1


def test_info_names_the_backend_and_the_layers_of_each_device() -> None:
    model = fse_pb2.ModelInfo(
        name="m",
        path="/secret/m.gguf",
        size_bytes=1 << 40,
        backend="CUDA",
        layers=18,
        gpu_layers=18,
        devices=[
            fse_pb2.Device(name="CUDA0", description="H100", kind="gpu", memory_bytes=1 << 36),
            fse_pb2.Device(name="CPU", description="Xeon", kind="cpu", memory_bytes=1 << 35),
        ],
    )
    model.devices[0].layers = 18
    info = info_from_wire(fse_pb2.Info(version="1", model=model))
    assert info.model.devices[0] == Device("CUDA0", "H100", "gpu", 1 << 36, 18)
    doc = json.loads(json.dumps(example.info_json(info)))
    assert "path" not in doc["model"]
    assert {k: doc["model"][k] for k in ("backend", "layers", "gpu_layers")} == {
        "backend": "CUDA",
        "layers": 18,
        "gpu_layers": 18,
    }
    assert doc["model"]["devices"] == [
        {
            "name": "CUDA0",
            "description": "H100",
            "kind": "gpu",
            "memory_bytes": 1 << 36,
            "layers": 18,
        },
        {"name": "CPU", "description": "Xeon", "kind": "cpu", "memory_bytes": 1 << 35, "layers": 0},
    ]
    # A daemon from before these fields: no backend, no devices, an empty list.
    old = info_from_wire(fse_pb2.Info(model=fse_pb2.ModelInfo(name="m")))
    assert (old.model.backend, old.model.layers, old.model.devices) == ("", 0, ())
    assert example.info_json(old)["model"]["devices"] == ()
