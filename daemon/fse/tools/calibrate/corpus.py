"""The prompts a calibration runs: the built-in set, or a corpus file (one prompt
per line, or JSON lines of prompts or chat messages; docs/calibration.md)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fse.core.errors import InputError
from fse.tools.runner import Prompt

if TYPE_CHECKING:
    pass


def builtin_prompts() -> list[Prompt]:
    """The built-in calibration prompt set (fse/data/calibration_prompts.txt)."""
    resource = resources.files("fse") / "data" / "calibration_prompts.txt"
    text = resource.read_text(encoding="utf-8")
    return _text_prompts(text, "<built-in calibration_prompts.txt>")


def _text_prompts(text: str, source: str) -> list[Prompt]:
    return [
        Prompt(text=line, source=f"{source}:{n}")
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]


def read_corpus(path: Path, flag: str = "--corpus") -> list[Prompt]:
    """Prompts of a corpus file; any problem is an InputError naming flag, file and line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{flag}: {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag}: {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        prompts = _jsonl_prompts(text, path, flag)
    else:
        prompts = _text_prompts(text, str(path))
    if not prompts:
        raise InputError(f"{flag}: {path}: no prompts (empty file)")
    return prompts


def _jsonl_prompts(text: str, path: Path, flag: str) -> list[Prompt]:
    out: list[Prompt] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{flag}: {path} line {n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(doc, dict):
            raise InputError(f'{where}: expected an object with "prompt" or "messages"')
        unknown = sorted(set(doc) - {"prompt", "messages"})
        if unknown:
            raise InputError(f'{where}: unknown key "{unknown[0]}"; accepted: prompt, messages')
        prompt, messages = doc.get("prompt"), doc.get("messages")
        if (prompt is None) == (messages is None):
            raise InputError(f'{where}: give exactly one of "prompt" and "messages"')
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f'{where}: "prompt" must be a non-empty string')
            out.append(Prompt(text=prompt, source=f"{path}:{n}"))
            continue
        if not isinstance(messages, list) or not messages:
            raise InputError(f'{where}: "messages" must be a non-empty list')
        pairs: list[tuple[str, str]] = []
        for i, msg in enumerate(messages):
            ok = (
                isinstance(msg, dict)
                and set(msg) == {"role", "content"}
                and isinstance(msg["role"], str)
                and msg["role"]
                and isinstance(msg["content"], str)
            )
            if not ok:
                raise InputError(
                    f'{where}: "messages[{i}]" must be {{"role": non-empty string, '
                    f'"content": string}}'
                )
            pairs.append((msg["role"], msg["content"]))
        out.append(Prompt(messages=tuple(pairs), source=f"{path}:{n}"))
    return out
