"""Audit logs written and edited by hand, for the tests of the log on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fse.serve.audit import AuditLog


def write_log(path: Path, n: int, **options: Any) -> None:
    log = AuditLog(path, **options)
    for i in range(n):
        assert log.write("stream.verdict", stream=i, status="completed", output=f"text {i}")
    log.close()


def edit_first(lines: list[bytes]) -> list[bytes]:
    """The first line with its status changed (and its prev left as it was)."""
    doc = json.loads(lines[0])
    doc["status"] = "halted"
    return [json.dumps(doc, separators=(",", ":")).encode(), *lines[1:]]
