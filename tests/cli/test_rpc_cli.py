"""RPC workers' addresses on the command line and in the config (docs/rpc.md): ggml's RPC
has no authentication, so a non-loopback address is refused unless allowed, with one
line naming the flag or key. Nothing here loads the model or starts a worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.cli import assert_one_line_usage_error
from support.daemons import run_fse

REMOTE = "10.0.0.7:50052"


REFUSED = [
    (("serve", "--rpc", REMOTE), ("--rpc: 10.0.0.7:50052 is not a loopback", "--allow-remote-rpc")),
    (
        ("generate", "--local", "--rpc", REMOTE, "hi"),
        ("--rpc: 10.0.0.7:50052", "--allow-remote-rpc"),
    ),
    (("rpc-worker", "--listen", "0.0.0.0:50052"), ("--listen: 0.0.0.0:50052", "--allow-remote")),
    (("rpc-worker", "--listen", "[::]:50052"), ("--listen: '[::]:50052' is not accepted",)),
    (("serve", "--rpc", "localhost"), ("--rpc:", "HOST:PORT")),
    (("serve", "--rpc", "127.0.0.1:0"), ("--rpc:", "PORT 1..65535")),
    (("generate", "--addr", "unix:x", "--rpc", "127.0.0.1:1", "hi"), ("--rpc: only with --local",)),
    (("serve", "--rpc", "127.0.0.1:5000", "--rpc", "127.0.0.1:5000"), ("named twice",)),
]


@pytest.mark.parametrize(("args", "needles"), REFUSED)
def test_refused_with_one_line(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_one_line_usage_error(run_fse(*args), *needles)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fse.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def test_config_allows_remote_workers_only_when_told(tmp_path: Path) -> None:
    remote = _config(tmp_path, f'[model]\nrpc = ["{REMOTE}"]\n')
    result = run_fse("config", "check", str(remote))
    assert_one_line_usage_error(result, "model.rpc: 10.0.0.7:50052", "model.allow_remote_rpc")
    allowed = _config(
        tmp_path, f'[model]\nrpc = ["{REMOTE}", "127.0.0.1:50053"]\nallow_remote_rpc = true\n'
    )
    result = run_fse("config", "check", str(allowed))
    assert result.returncode == 0, result.stderr
    assert f'rpc = ["{REMOTE}", "127.0.0.1:50053"]' in result.stdout
    assert "allow_remote_rpc = true" in result.stdout
    assert "rpc_stall_seconds = 30.0" in result.stdout
    bad = _config(tmp_path, '[model]\nrpc = ["no-port"]\n')
    assert_one_line_usage_error(run_fse("config", "check", str(bad)), "model.rpc")
