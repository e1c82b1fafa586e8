"""The daemon's config file: strict loading, flags over keys, `fse config check`."""
# ruff: noqa: E501  (the table of bad keys reads best one case per line)

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_fse
from fse.core.errors import InputError
from fse.serve.config import KEYS, load, read_file, to_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fse.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    s = load(None, {})
    assert s.server.listen == ("unix:fse.sock",)
    assert s.server.socket_mode == 0o660 and s.server.max_streams == 8
    assert s.server.max_tokens_limit == s.server.ctx_per_stream - 1 == 2047
    assert s.server.threads >= 1 and s.audit.fsync == "interval" and s.metrics.listen == ""


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nlisten = ["unix:/run/fse/fse.sock", "127.0.0.1:7000"]\nmax_streams = 4\n'
        'drain_seconds = 3\n[audit]\nfsync = "always"\n',
    )
    s = load(path, {"server.max_streams": 2})
    assert s.server.listen == ("unix:/run/fse/fse.sock", "127.0.0.1:7000")
    assert s.server.max_streams == 2  # the flag wins
    assert s.server.drain_seconds == 3.0 and isinstance(s.server.drain_seconds, float)
    assert s.audit.fsync == "always"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[server]\nmax_stream = 4\n", "server.max_stream: unknown key; accepted: listen,"),
        ("[serve]\n", "serve: unknown section; accepted: server, model,"),
        ('[server]\nmax_streams = "4"\n', "server.max_streams: expected an integer, got a string"),
        ("[server]\nmax_streams = true\n", "server.max_streams: expected an integer, got a boolean"),
        ("[server]\nmax_streams = 0\n", "server.max_streams: 0 is out of range; accepted: integer 1..256"),
        ("[server]\ndrain_seconds = inf\n", "server.drain_seconds: inf is out of range"),
        ('[server]\nsocket_mode = "rw"\n', 'server.socket_mode: \'rw\' is out of range; accepted: an octal'),
        ("[server]\nlisten = []\n", "server.listen: [] is out of range; accepted: a non-empty list"),
        ('[audit]\nfsync = "sometimes"\n', "audit.fsync: 'sometimes' is out of range; accepted: always, interval, never"),
        ("[server]\nctx_per_stream = 512\nmax_tokens_limit = 600\n", "server.max_tokens_limit: 600 does not fit"),
        ('[tls]\ncert = "c.pem"\n', "tls.key: required with tls.cert"),
        ("server = 3\n", "server: expected a table"),
        ("[server\n", "invalid TOML"),
    ],
)  # fmt: skip
def test_bad_keys_name_the_key_and_what_is_accepted(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(InputError) as bad:
        load(write(tmp_path, text), {})
    assert words in str(bad.value)


def test_a_bad_flag_is_named_as_the_flag() -> None:
    with pytest.raises(
        InputError, match=r"^--max-streams: 0 is out of range; accepted: integer 1\.\.256"
    ):
        load(None, {"server.max_streams": 0})


def test_effective_config_round_trips_and_prints_no_secret(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    key.write_text("a-very-secret-key")
    path = write(tmp_path, f'[audit]\nkey_file = "{key}"\n[server]\nmax_queue = 3\n')
    printed = to_toml(load(path, {}))
    assert "a-very-secret-key" not in printed and str(key) in printed
    again = write(tmp_path, printed)  # the output is itself a valid config
    assert read_file(again)["server.max_queue"] == 3


def test_every_key_has_words_for_what_it_accepts() -> None:
    for key in KEYS:
        assert key.accepted and key.section and key.name


def test_config_check_command(tmp_path: Path) -> None:
    good = run_fse("config", "check", str(write(tmp_path, "[server]\nmax_queue = 2\n")))
    assert good.returncode == 0 and "max_queue = 2" in good.stdout
    bad = run_fse("config", "check", str(write(tmp_path, "[server]\nmax_queue = -1\n")))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"fse config: error: {tmp_path / 'fse.toml'}: server.max_queue: -1 is out of range; "
        "accepted: integer 0..4096"
    ]


def test_serve_refuses_a_bad_config_before_loading_anything(tmp_path: Path) -> None:
    bad = run_fse("serve", "--config", str(write(tmp_path, "[server]\nthreads = 9999\n")))
    assert bad.returncode == 2
    assert "server.threads: 9999 is out of range; accepted: integer 0..512" in bad.stderr
    flag = run_fse("serve", "--max-queue", "-3")
    assert flag.returncode == 2 and "--max-queue: -3 is out of range" in flag.stderr


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "daemon/systemd/fse.toml"
    if not example.exists():
        pytest.fail("daemon/systemd/fse.toml is missing")
    checked = run_fse("config", "check", str(example))
    assert checked.returncode == 0, checked.stderr
