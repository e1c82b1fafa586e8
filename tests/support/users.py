"""Acting as another user: uid 65534 (nobody), the attacker in the attack tests."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.waits import LIVE

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root")


def shared_dir(prefix: str) -> Path:
    """A new directory other users can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` as uid/gid 65534 with no supplementary groups: the attacker."""
    return subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
