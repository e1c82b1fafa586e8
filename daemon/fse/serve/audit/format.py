"""The audit log's line format: names, the processors that turn an event into fields,
the rendering of a chained (and in keyed mode MACed) line, and the HMAC key."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fse.core.files import FileRefused, read_trusted

GENESIS = "0" * 64
# Fields holding user content: hashed unless the log records text.
CONTENT_FIELDS = ("prompt", "output")
# Names the log itself writes; an event's fields may not use them.
RESERVED = frozenset({"ts", "seq", "event", "prev", "mac"})
FSYNC_MODES = ("always", "interval", "never")
MIN_KEY_BYTES = 16
ROTATED = "audit.rotated"
PRUNED = "audit.pruned"
# The lines a rotation opens a new file with: a file holding only these takes the next
# line whatever its length (rotating again could never make it fit).
OPENERS = frozenset({ROTATED, PRUNED})
# A run of the daemon starts here; streams still open at the next one are orphans.
RUN_START = "server.started"
ORPHANS = "audit.orphans"
MAC_TAIL = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')


class AuditError(Exception):
    """The audit log cannot be opened or resumed; the message names the file and why."""


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def line_mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def load_key(path: Path) -> bytes:
    """The HMAC key in `path` (its bytes, surrounding whitespace stripped). Read as every
    trusted file is (a regular file, never a FIFO or device, writable by its owner only),
    and refused if others may read it or it is shorter than 16 bytes."""
    try:
        key = read_trusted(path).strip()
        mode = os.stat(path).st_mode
    except FileRefused as exc:
        raise AuditError(f"--audit-key-file {exc}") from None
    except OSError as exc:
        raise AuditError(f"--audit-key-file {path}: cannot read: {exc.strerror}") from None
    if mode & 0o007:
        raise AuditError(
            f"--audit-key-file {path}: readable by others (mode {stat.S_IMODE(mode):04o}); "
            "make it readable only by the service (chmod 600, or systemd LoadCredential=)"
        )
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(
            f"--audit-key-file {path}: {len(key)} bytes is too short; accepted: at least "
            f"{MIN_KEY_BYTES} bytes (for example `head -c 32 /dev/urandom > {path}`)"
        )
    return key


def rotated_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


# -- processors: small steps from an event to its line --------------------------------


Record = dict[str, Any]


def hash_content(record: Record) -> Record:
    """Replace prompt/output text by `<field>_sha256`."""
    for name in CONTENT_FIELDS:
        if name in record:
            value = record.pop(name)
            record[f"{name}_sha256"] = hashlib.sha256(str(value).encode()).hexdigest()
    return record


def drop_none(record: Record) -> Record:
    return {k: v for k, v in record.items() if v is not None}


def check_names(record: Record) -> Record:
    """The log's own names (seq, prev, mac...) cannot be an event's fields."""
    clash = RESERVED.intersection(record)
    if clash:
        raise ValueError(f"audit fields {sorted(clash)} are reserved")
    return record


def encode_fields(record: Record) -> bytes:
    """An event's fields as JSON members (`"k":v,...`, no braces). Raises ValueError
    for a NaN or infinity, which JSON cannot hold."""
    text = json.dumps(
        record, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str
    )
    return text[1:-1].encode()


@dataclass(frozen=True, slots=True)
class Entry:
    """An event ready to be chained: everything but its seq, prev and mac."""

    ts: str
    event: str
    fields: bytes


def render(entry: Entry, seq: int, prev: str, key: bytes | None = None) -> bytes:
    """The line's bytes (no newline): ts, seq and event first, then the fields, prev,
    and in keyed mode the mac over everything before it."""
    head = json.dumps(
        {"ts": entry.ts, "seq": seq, "event": entry.event},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    middle = b"," + entry.fields if entry.fields else b""
    line = head[:-1].encode() + middle + b',"prev":"' + prev.encode() + b'"}'
    if key is None:
        return line
    return line[:-1] + b',"mac":"' + line_mac(key, line).encode() + b'"}'


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
