"""Chat messages through the model's own chat template (a daemon serving a model with a
template added to its metadata).

Most tests share the `main` and `single` daemons of tests/serve/conftest.py
(package-scoped); tests that kill or stop a daemon, or watch one start, get their own.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fse_client.v1 import fse_pb2, fse_pb2_grpc
from support.daemons import (
    ROOT,
    THREADS,
    Daemon,
)
from support.streams import (
    assert_well_formed,
    generate,
    start,
)

# A Gemma-style template: llama.cpp recognises it by its <start_of_turn> markers.
GEMMA_TEMPLATE = (
    "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def templated_model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with a chat template added to its metadata (gguf's own tool)."""
    out = tmp_path_factory.mktemp("templated") / "gemma-chat.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(model_path), str(out),
         "--chat-template", GEMMA_TEMPLATE],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_chat_messages_use_the_models_template(
    start_daemon: Callable[..., Daemon], templated_model: Path, tmp_path: Path
) -> None:
    from fse.core.model import Model

    messages = [("user", "What is the capital of France?")]
    with Model(templated_model) as model:
        rendered = model.apply_chat_template(messages)
        expected_tokens = model.tokenize(rendered, add_special=False, parse_special=True)
    assert rendered == (
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    # Gemma's chat turn opens with logits whose L2 norm (~13,600) is above the
    # report's 1e4: serve the policy calibrated for this model (docs/experiment).
    policies = tmp_path / "policies"
    policies.mkdir()
    calibrated = ROOT / "docs" / "experiment" / "calibrated.toml"
    (policies / "calibrated.toml").write_text(calibrated.read_text())
    daemon = start_daemon(
        *THREADS, "--model", str(templated_model), "--policies-dir", str(policies)
    )
    with daemon.channel() as channel:
        info = fse_pb2_grpc.GuardStub(channel).GetInfo(fse_pb2.GetInfoRequest(), timeout=10)
        assert info.model.chat_template
        chat = [fse_pb2.ChatMessage(role=r, content=c) for r, c in messages]
        outcome = generate(channel, [start("", max_tokens=8, messages=chat, policy="calibrated")])
    verdict = assert_well_formed(outcome)
    assert outcome.messages[0].started.prompt_tokens == len(expected_tokens)
    assert verdict.status == fse_pb2.STATUS_COMPLETED
    assert verdict.tokens > 0


@pytest.mark.slow  # rewrites the model file first
def test_chat_template_keeps_every_role_across_many_renders(templated_model: Path) -> None:
    """The role and content strings handed to llama_chat_apply_template must stay alive
    for the call: over temporaries they were sometimes freed and rendered empty."""
    from fse.core.model import Model

    with Model(templated_model) as model:
        for i in range(300):
            junk = [bytes(64) * (i % 7) for _ in range(50)]  # churn the allocator
            rendered = model.apply_chat_template([("user", f"question {i}")])
            assert rendered.startswith(f"<start_of_turn>user\nquestion {i}<end_of_turn>"), i
            del junk
