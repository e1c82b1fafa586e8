"""The tamper-evident audit log: one JSON line per decision, each chained to the last.

Every line is a JSON object that starts with `ts` (RFC 3339 UTC), `seq` (1, 2, ...)
and `event`, carries the event's fields, and ends with `prev`: the sha256 (hex) of
the previous line's bytes without its newline, or 64 zeros for the first line. In
keyed mode (`key_file`) a last field `mac` follows: HMAC-SHA256 with the key over
the line's bytes without the `,"mac":"..."` part. docs/audit.md describes every
event and what each mode does and does not prove.

The log is one active file and, with `rotate_bytes`, rotated files `NAME.1` (the
newest) .. `NAME.<keep>`; the chain runs on across them: each new file opens with an
`audit.rotated` line chained to the last line of the file before it, and an
`audit.pruned` line for the file that rotation deleted (its seq range and last hash).
A line longer than `rotate_bytes` is written alone after those, so rotation always
makes progress. `verify()` walks a chain over one or several files (or a directory),
names the first line that breaks it, says whether its start is known (seq 1, or right
after lines an `audit.pruned` record or the caller's anchor accounts for) and lists
the streams that never got a verdict.

Opening a log checks it first: its directory writable only by its owner (the daemon's
user or root) unless sticky; the log a regular file of the daemon's user with one name
(no hard link), opened without following a symlink (the pid file `NAME.lock` and the
rotated files too); not in use by another writer (an exclusive flock on the log file
itself, so a second name for it, a hard link or a linked directory, meets the lock
too); a tail that verifies (keyed or not, as this log is). It then reads back what
the last run left: the streams that started and never got a verdict (`orphans`, a
daemon killed mid-stream) and the next free stream number, so that stream numbers stay
unique along the chain.

Writing fails closed: a line that cannot be written (disk full, file size limit,
I/O error, a failed fsync or rotation) is kept in memory, the log reports itself
unhealthy (the daemon then refuses new streams and reports NOT_SERVING) and every
later write or `retry()` tries again, in order, so nothing is lost and the chain
stays whole. A partly written line is cut off again before the retry. A write never
waits long for another thread's write (a stalled disk): after LOCK_WAIT its line
stays queued, the log reports itself unhealthy, and the writer that holds the lock,
or a later retry, writes it.

Prompts and outputs are recorded as sha256 unless the log was opened with
`text=True`.
"""

from fse.serve.audit.format import (
    FSYNC_MODES,
    GENESIS,
    AuditError,
    line_hash,
    load_key,
    rotated_path,
)
from fse.serve.audit.verify import Head, Orphan, Pruned, Verification, chain_files, verify
from fse.serve.audit.writer import AuditLog

__all__ = [
    "FSYNC_MODES",
    "GENESIS",
    "AuditError",
    "AuditLog",
    "Head",
    "Orphan",
    "Pruned",
    "Verification",
    "chain_files",
    "line_hash",
    "load_key",
    "rotated_path",
    "verify",
]
