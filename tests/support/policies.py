"""Policy texts for the policy tests: the built-in `pro` as a file, edited one key at a
time, and the one-line error a bad text gets."""

from __future__ import annotations

import pytest
from fse.core.policy import PolicyError, parse_policy

PRO_TEXT = """\
name = "pro"
[health]
green_below = 200.0
red_above = 400.0
[guards.perplexity]
threshold = 400.0
window = 16
min_tokens = 4
action = "halt"
[guards.l2_norm]
threshold = 1e4
[guards.logit_variance]
threshold = 0.1
[guards.max_prob]
threshold = 0.99
consecutive = 8
[guards.loop]
max_period = 1024
min_repeats = 3
min_span = 12
[guards.near_loop]
min_match = 0.85
[guards.prompt_perplexity]
threshold = 1000.0
window_threshold = 5000.0
"""


def policy_with(table: str, key: str, value: str) -> str:
    """A valid policy whose [table] has key = value (replacing or adding it)."""
    lines = PRO_TEXT.splitlines()
    start = lines.index(f"[{table}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [ln for ln in lines[start + 1 : end] if not ln.startswith(f"{key} =")]
    return "\n".join([*lines[: start + 1], *body, f"{key} = {value}", *lines[end:]]) + "\n"


def policy_error(text: str, source: str = "test.toml") -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(f"{source}: "), message
    return message
