"""The audit log on its own: the chain, resuming it, finding tampering, failing closed.

The daemon's use of it (which events, refusing streams while it cannot be
written) is tested through the real server in test_audit_daemon.py; rotation, fsync,
orphans, the lock, keyed mode and start checks in test_audit_files.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from fse.serve import audit
from fse.serve.audit import GENESIS, AuditError, AuditLog, verify
from support.audit import edit_first, write_log
from support.daemons import audit_records, run_fse


def test_each_line_chains_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = path.read_bytes().splitlines()
    docs = audit_records(path)
    assert [d["seq"] for d in docs] == [1, 2, 3]
    assert docs[0]["prev"] == GENESIS
    for before, doc in zip(lines, docs[1:], strict=False):
        assert doc["prev"] == hashlib.sha256(before).hexdigest()
    assert list(docs[0])[:3] == ["ts", "seq", "event"] and list(docs[0])[-1] == "prev"
    assert docs[0]["ts"].endswith("Z")
    result = verify(path)
    assert result.ok and result.lines == 3
    assert result.head.hash == hashlib.sha256(lines[-1]).hexdigest()


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    write_log(path, 2)
    assert [d["seq"] for d in audit_records(path)] == [1, 2, 3, 4]
    assert verify(path).ok


def test_content_is_hashed_unless_text_is_asked(tmp_path: Path) -> None:
    hashed, text = tmp_path / "hashed.jsonl", tmp_path / "text.jsonl"
    write_log(hashed, 1)
    write_log(text, 1, text=True)
    (doc,) = audit_records(hashed)
    assert "output" not in doc
    assert doc["output_sha256"] == hashlib.sha256(b"text 0").hexdigest()
    (doc,) = audit_records(text)
    assert doc["output"] == "text 0" and "output_sha256" not in doc


def test_unset_fields_are_left_out_and_non_finite_values_refused(tmp_path: Path) -> None:
    """A verdict's value is None when non-finite (fse.core.stream), so a NaN reaching
    the log is a caller's bug: refused at once, before it can block the chain."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write("stream.verdict", guard="non_finite", value=None, threshold=None)
    with pytest.raises(ValueError):
        log.write("stream.verdict", value=float("nan"))
    with pytest.raises(ValueError, match="reserved"):
        log.write("stream.verdict", prev="0" * 64)
    assert log.healthy and log.write("stream.verdict", value=1.5)
    log.close()
    first, second = audit_records(path)
    assert "value" not in first and "threshold" not in first and second["value"] == 1.5
    assert verify(path).ok
    assert not hasattr(audit, "name_non_finite")


# How each change shows: an edited line breaks the prev of the line after it.
TAMPERING = {
    "edited": (edit_first, "line 2: prev"),
    "deleted": (lambda lines: [lines[0], *lines[2:]], "line 2: seq is 3, expected 2"),
    "reordered": (lambda lines: [lines[0], lines[2], lines[1], lines[3]], "line 2: seq is 3"),
    "inserted": (lambda lines: [lines[0], lines[0], *lines[1:]], "line 2: seq is 1"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_verify_names_the_tampered_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    change, problem = TAMPERING[case]
    path.write_bytes(b"\n".join(change(path.read_bytes().splitlines())) + b"\n")
    result = verify(path)
    assert not result.ok
    assert result.problem.startswith(problem), result.problem
    # Lines before the break are intact; an edit also puts the edited line in doubt.
    assert result.lines == (0 if case == "edited" else 1)


def test_healthy_while_another_thread_writes(tmp_path: Path) -> None:
    """A record waits in memory during every write (os.write releases the GIL); a
    reader on another thread must not take that for a failing log."""
    log = AuditLog(tmp_path / "audit.jsonl")
    done = threading.Event()

    def writer() -> None:
        for i in range(3000):
            log.write("stream.verdict", stream=i)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen_unhealthy = 0
    while not done.is_set():
        seen_unhealthy += not log.healthy
    thread.join()
    log.close()
    assert seen_unhealthy == 0
    assert verify(tmp_path / "audit.jsonl").lines == 3000


def test_verify_cli(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    ok = run_fse("audit", "verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{path}: ok: 3 lines, unkeyed, last seq 3 sha256 ")
    path.write_bytes(path.read_bytes().replace(b"text 1", b"text 9", 1) + b'{"seq":4')
    broken = run_fse("audit", "verify", str(path))
    assert broken.returncode == 1
    assert broken.stdout.strip() == (
        f"{path}: BROKEN: line 4: incomplete (no newline at the end of the file); "
        "lines 1..3 are intact"
    )
    missing = run_fse("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"fse audit: error: {tmp_path / 'nope.jsonl'}: cannot read: No such file or directory"
    )


def test_a_log_that_does_not_end_in_a_record_is_not_resumed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with path.open("ab") as f:
        f.write(b'{"ts":"x","seq":3')
    with pytest.raises(AuditError, match="line 3: incomplete"):
        AuditLog(path)
    path.write_bytes(b"not json\n")
    with pytest.raises(AuditError, match="line 1: not JSON"):
        AuditLog(path)
    with pytest.raises(AuditError, match="cannot open: Is a directory"):
        AuditLog(tmp_path)


# A process whose file size limit makes the audit writes fail (EFBIG) for real, then
# lifts the limit again: nothing is lost and no partial line stays behind.
FAILING_DISK = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from fse.serve.audit import AuditLog, verify

    path = Path(sys.argv[1])
    changes = []
    log = AuditLog(path, on_health=lambda ok, error: changes.append([ok, error]))
    log.write("server.started")
    size = path.stat().st_size
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))  # room for a partial line
    first = log.write("stream.started", stream=1, prompt="p" * 100)
    second = log.write("stream.verdict", stream=1, status="cancelled")
    failing = dict(healthy=log.healthy, retry=log.retry(), size=path.stat().st_size,
                   verify=verify(path).ok, lines=verify(path).lines)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    recovered = log.retry()
    print(json.dumps(dict(first=first, second=second, failing=failing, size=size,
                          recovered=recovered, healthy=log.healthy, changes=changes)))
    """
)


def test_write_failure_keeps_lines_and_reports_unhealthy_until_it_can_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    run = subprocess.run(
        [sys.executable, "-c", FAILING_DISK, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["first"] is False and result["second"] is False
    failing = result["failing"]
    assert failing == {
        "healthy": False,
        "retry": False,
        "size": result["size"],  # the partial line was cut off again
        "verify": True,
        "lines": 1,
    }
    assert result["recovered"] is True and result["healthy"] is True
    (down, up) = result["changes"]
    assert down[0] is False and "audit.jsonl" in down[1]
    assert up == [True, ""]
    docs = audit_records(path)
    assert [(d["seq"], d["event"]) for d in docs] == [
        (1, "server.started"),
        (2, "stream.started"),
        (3, "stream.verdict"),
    ]
    assert verify(path).ok


def test_a_bug_in_the_writer_thread_fails_closed_and_keeps_the_thread(tmp_path: Path) -> None:
    """The audit-writer thread writes every verdict: an unexpected error in a flush makes
    the log unhealthy (new streams refused) and still answers the poster, and the thread
    goes on writing once the error is gone."""
    log = AuditLog(tmp_path / "audit.jsonl")
    flush, broken = log._flush, [True]

    def buggy_flush() -> bool:
        if broken:
            broken.clear()
            raise RuntimeError("a bug")
        return flush()

    log._flush = buggy_flush  # type: ignore[method-assign]
    answered = threading.Event()
    log.post("stream.verdict", {"stream": 1}, then=answered.set)
    assert answered.wait(10), "the poster was never answered"
    assert not log.healthy and "RuntimeError('a bug')" in log.error
    second = threading.Event()
    log.post("stream.verdict", {"stream": 2}, then=second.set)  # the thread is still there
    assert second.wait(10) and log.healthy
    log.close()
    assert [r["stream"] for r in audit_records(tmp_path / "audit.jsonl")] == [1, 2]
