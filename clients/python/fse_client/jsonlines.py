"""The JSON lines of a guarded stream (docs/protocol.md): one object per token, then
one verdict. The one encoder of that contract in Python: `guarded-generate` uses it
over fse_client's events, and the daemon's own `fse generate --json` over its domain
events, so the two cannot drift. Plain values in, a dict for `json.dumps` out."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def number(x: float | None) -> float | None:
    """The double itself (json writes its shortest round-trip form, so every client
    prints the same value); NaN and infinities become null (valid JSON)."""
    return float(x) if x is not None and math.isfinite(x) else None


def token_json(
    *,
    index: int,
    id: int,
    text: str,
    nll: float,
    ppl: float,
    variance: float,
    max_prob: float,
    l2_norm: float,
    entropy: float,
    health: str | None,
    warnings: Iterable[tuple[str, float | None, float | None]] = (),
) -> dict[str, Any]:
    """A token line; `warnings`: (guard, value, threshold) of each trip in warn mode;
    `entropy`: of the raw next-token distribution, in nats."""
    doc: dict[str, Any] = {
        "type": "token",
        "index": index,
        "id": id,
        "text": text,
        "nll": number(nll),
        "ppl": number(ppl),
        "variance": number(variance),
        "max_prob": number(max_prob),
        "l2_norm": number(l2_norm),
        "entropy": number(entropy),
        "health": health,
    }
    trips = [
        {"guard": guard, "value": number(value), "threshold": number(threshold)}
        for guard, value, threshold in warnings
    ]
    if trips:
        doc["warnings"] = trips
    return doc


def verdict_json(
    *,
    status: str,
    guard: str | None,
    value: float | None,
    threshold: float | None,
    token_index: int | None,
    tokens: int,
    text: str,
    policy: str,
    policy_sha256: str,
    message: str = "",
    completion: str | None = None,
) -> dict[str, Any]:
    """The verdict line, the last of a stream. `completion`: why a completed stream ended
    (end_of_generation, stop_sequence, max_tokens), None (null) for any other status."""
    doc: dict[str, Any] = {
        "type": "verdict",
        "status": status,
        "completion": completion,
        "guard": guard,
        "value": number(value),
        "threshold": number(threshold),
        "token_index": token_index,
        "tokens": tokens,
        "text": text,
        "policy": policy,
        "policy_sha256": policy_sha256,
    }
    if message:
        doc["message"] = message
    return doc
