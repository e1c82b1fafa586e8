"""How events look to a person (coloured text) or a program (JSON lines)."""

from __future__ import annotations

import codecs
import io
import json
import os
from typing import IO, Any

from fse_client import jsonlines

from fse.core.types import COMPLETED, HALTED, TokenEvent, Verdict

COLOURS = {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31m"}
RESET = "\x1b[0m"


def token_json(event: TokenEvent) -> dict[str, Any]:
    m = event.metrics
    return jsonlines.token_json(
        index=event.index,
        id=event.token,
        text=event.text,
        nll=m.nll,
        ppl=m.ppl,
        variance=m.variance,
        max_prob=m.max_prob,
        l2_norm=m.l2_norm,
        entropy=m.entropy,
        health=event.health,
        warnings=[(t.guard, t.value, t.threshold) for t in event.warnings],
    )


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    return jsonlines.verdict_json(
        status=verdict.status,
        completion=verdict.completion,
        guard=verdict.guard,
        value=verdict.value,
        threshold=verdict.threshold,
        token_index=verdict.token_index,
        tokens=verdict.tokens,
        text=verdict.text,
        policy=verdict.policy,
        policy_sha256=verdict.policy_sha256,
        message=verdict.message,
    )


def use_colour(stream: IO[str]) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def _utf8(stream: IO[str]) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return codecs.lookup(encoding).name == "utf-8"


class JsonRenderer:
    def __init__(self, out: IO[str]) -> None:
        self.out = out
        # Raw UTF-8 where the stream takes it; \u escapes (still the same JSON) where it
        # does not, so model text never fails to encode and the verdict always gets out.
        self.ensure_ascii = not _utf8(out)

    def token(self, event: TokenEvent) -> None:
        self.out.write(json.dumps(token_json(event), ensure_ascii=self.ensure_ascii) + "\n")
        self.out.flush()

    def verdict(self, verdict: Verdict) -> None:
        self.out.write(json.dumps(verdict_json(verdict), ensure_ascii=self.ensure_ascii) + "\n")
        self.out.flush()


class HumanRenderer:
    """Text as it is released, coloured by health; the verdict goes to `err`."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out, self.err = out, err
        self.colour = use_colour(out)
        for stream in (out, err):  # text the terminal cannot encode shows as "?"
            if not _utf8(stream) and isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(errors="replace")

    def token(self, event: TokenEvent) -> None:
        if self.colour:
            self.out.write(f"{COLOURS[event.health]}{event.text}{RESET}")
        else:
            self.out.write(event.text)
        self.out.flush()

    def verdict(self, verdict: Verdict) -> None:
        self.out.write("\n")
        self.out.flush()
        self.err.write(verdict_line(verdict) + "\n")
        self.err.flush()


def verdict_line(verdict: Verdict) -> str:
    policy = f"policy {verdict.policy} ({verdict.policy_sha256[:12]})"
    if verdict.status == HALTED:
        value = "n/a" if verdict.value is None else f"{verdict.value:.6g}"
        threshold = "n/a" if verdict.threshold is None else f"{verdict.threshold:.6g}"
        what = (
            f"halted by {verdict.guard}: value {value}, threshold {threshold}, "
            f"at token {'n/a' if verdict.token_index is None else verdict.token_index}"
        )
    elif verdict.status == COMPLETED and verdict.completion is not None:
        what = f"completed at {verdict.completion}"
    else:
        what = verdict.status
    detail = f": {verdict.message}" if verdict.message else ""
    return f"[{what}{detail}] {verdict.tokens} tokens released · {policy}"
