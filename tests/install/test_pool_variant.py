"""fse_step.c's own thread pool, the build without OpenMP (this machine's ggml uses
OpenMP, so the extension here takes the other branch): compiled from the same sources
with the system C compiler and run against the one-vector results."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_the_pthread_pool_gives_every_job_what_it_gets_alone(tmp_path: Path) -> None:
    binary = tmp_path / "pool_check"
    sources = [NATIVE / n for n in ("fse_step.c", "fse_stats.c", "fse_sample.c")]
    check = Path(__file__).with_name("pool_check.c")
    subprocess.run(
        ["cc", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread",
         f"-I{NATIVE}", *map(str, sources), str(check), "-lm", "-o", str(binary)],
        check=True,
    )  # fmt: skip
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
