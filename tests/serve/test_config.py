"""The daemon's config file: strict loading, flags over keys, `fse config check`."""
# ruff: noqa: E501  (the table of bad keys reads best one case per line)

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fse.core.errors import InputError
from fse.serve.config import KEYS, load, read_file, to_toml
from support.daemons import ROOT, run_fse


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
        ('[model]\ngraph_stats = "yes"\n', "model.graph_stats: 'yes' is out of range; accepted: auto, on or off"),
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
    example = ROOT / "daemon/systemd/fse.toml"
    if not example.exists():
        pytest.fail("daemon/systemd/fse.toml is missing")
    checked = run_fse("config", "check", str(example))
    assert checked.returncode == 0, checked.stderr


# -- a config others may write, a FIFO, TOML nested too deeply (issue 18) ----------------

DEEP = "x = " + "[" * 1000 + "]" * 1000 + "\n"  # deeper than tomllib can recurse


def one_error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"fse {command}: error: ")
    return line


@pytest.mark.parametrize("command", [("config", "check"), ("serve", "--config")])
def test_a_config_others_can_write_is_refused(tmp_path: Path, command: tuple[str, str]) -> None:
    """Whoever can write the config can point the daemon at their own tokens or policies."""
    path = write(tmp_path, "[server]\nmax_queue = 2\n")
    path.chmod(0o666)
    line = one_error_line(run_fse(*command, str(path)), command[0])
    assert line.endswith(
        f"{path}: writable by its group and others (mode 0666), who could change what the "
        f"daemon trusts; accepted: writable by its owner only (chmod go-w {path})"
    )
    path.chmod(0o644)  # its owner may write it (the default umask's 0644)
    assert run_fse("config", "check", str(path)).returncode == 0


@pytest.mark.parametrize("command", [("config", "check"), ("serve", "--config")])
def test_a_fifo_as_the_config_is_refused(tmp_path: Path, command: tuple[str, str]) -> None:
    """A FIFO used to hang the command until somebody wrote to it."""
    path = tmp_path / "fse.toml"
    os.mkfifo(path, 0o600)
    line = one_error_line(run_fse(*command, str(path), timeout=60), command[0])
    assert line.endswith(f"{path}: a FIFO, not a regular file; accepted: a regular file "
                         "(or a symlink to one)")  # fmt: skip


def test_a_symlinked_config_is_followed_and_its_target_checked(tmp_path: Path) -> None:
    """A config under /etc that links elsewhere is normal; the target is what counts."""
    target = tmp_path / "real.toml"
    target.write_text("[server]\nmax_queue = 3\n")
    link = tmp_path / "fse.toml"
    link.symlink_to(target)
    assert read_file(link)["server.max_queue"] == 3
    target.chmod(0o664)
    with pytest.raises(InputError, match=r"writable by its group \(mode 0664\)"):
        read_file(link)


@pytest.mark.parametrize("command", [("config", "check"), ("serve", "--config")])
def test_toml_nested_too_deeply_is_one_line(tmp_path: Path, command: tuple[str, str]) -> None:
    """Finding 6: a RecursionError traceback, exit 1, from both commands."""
    path = write(tmp_path, DEEP)
    line = one_error_line(run_fse(*command, str(path)), command[0])
    assert line.endswith(f"{path}: invalid TOML: arrays or tables nested too deeply")


def test_a_rejected_value_is_shown_bounded(tmp_path: Path) -> None:
    """Errors quote what the file held, but never all of a huge or deeply nested value."""
    path = write(tmp_path, f'[server]\nsocket_mode = "{"7" * 100_000}"\n')
    with pytest.raises(InputError) as bad:
        load(path, {})
    assert "server.socket_mode: '777" in str(bad.value) and len(str(bad.value)) < 400
    nested = write(tmp_path, "[server]\nlisten = " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(InputError) as deep:
        load(nested, {})
    assert "server.listen: [[[[...]]]] is out of range" in str(deep.value)


def test_an_integer_too_large_for_a_float_is_out_of_range(tmp_path: Path) -> None:
    """It was an OverflowError traceback; the policy's checks, now shared, said this."""
    path = write(tmp_path, f"[server]\ndrain_seconds = 1{'0' * 400}\n")
    line = one_error_line(run_fse("config", "check", str(path)), "config")
    assert line.startswith(f"fse config: error: {path}: server.drain_seconds: 1000")
    assert line.endswith("is out of range; accepted: seconds 0..3600")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[server]\nmax_streams = "4"\n', 'server.max_streams: expected an integer, got a string ("4"); accepted: integer 1..256'),
        ("[server]\nallow_insecure_tcp = 1\n", "server.allow_insecure_tcp: expected a boolean, got an integer (1); accepted: true or false"),
        ("[server]\nmax_streams = 1979-05-27\n", "server.max_streams: expected an integer, got a date (datetime.date(1979, 5, 27))"),
        ("[server]\nlisten = \"unix:a\"\n", 'server.listen: expected an array, got a string ("unix:a")'),
        ("[audit]\nfsync = true\n", "audit.fsync: expected a string, got a boolean (true)"),
        ("server = [1]\n", "server: expected a table, got an array ([1])"),
    ],
)  # fmt: skip
def test_a_wrong_type_is_described_as_toml_spells_it(tmp_path: Path, text: str, words: str) -> None:
    """The words of fse.core.values, as for policies (a date was "an array" here)."""
    with pytest.raises(InputError) as bad:
        load(write(tmp_path, text), {})
    assert str(bad.value).startswith(f"{tmp_path / 'fse.toml'}: {words}")


def test_printed_strings_escape_what_toml_forbids_raw(tmp_path: Path) -> None:
    """A path with a newline or a quote printed an invalid config; the policy writer's
    escapes, now shared, apply."""
    odd = 'audit "log"\\\n\tend\x7f.jsonl'
    printed = to_toml(load(None, {"audit.path": odd}))
    assert 'path = "audit \\"log\\"\\\\\\n\\tend\\u007f.jsonl"' in printed
    assert read_file(write(tmp_path, printed))["audit.path"] == odd


# -- listen addresses -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["unix:", "unix://", "localhost", "host:port", ":80",
                                     "127.0.0.1:65536", "::1:7000", "[nope]:7000"])  # fmt: skip
def test_a_listen_address_is_checked_with_the_config(tmp_path: Path, address: str) -> None:
    """`unix:` (an empty socket path) passed `fse config check`; serve then refused it."""
    path = write(tmp_path, f'[server]\nlisten = ["unix:/run/fse/fse.sock", "{address}"]\n')
    line = one_error_line(run_fse("config", "check", str(path)), "config")
    assert line == (
        f"fse config: error: {path}: server.listen: ['unix:/run/fse/fse.sock', '{address}'] "
        "is out of range; accepted: a non-empty list of unix:PATH (PATH not empty) or "
        "HOST:PORT (PORT 0..65535)"
    )
    flag = one_error_line(run_fse("serve", "--listen", address), "serve")
    assert flag.startswith(f"fse serve: error: --listen: ['{address}'] is out of range")


@pytest.mark.parametrize("address", ["unix:fse.sock", "unix:///run/fse.sock", "127.0.0.1:0",
                                     "[::1]:7000", "example.org:443"])  # fmt: skip
def test_listen_addresses_that_are_accepted(address: str) -> None:
    assert load(None, {"server.listen": [address]}).server.listen == (address,)


def test_gpu_layers_without_a_gpu_stop_the_start_in_one_line(tmp_path: Path) -> None:
    """A model meant for a GPU must not silently run at CPU speed: asking for GPU layers
    where llama.cpp has no GPU is a start-up error naming the key (the default, "auto",
    runs on the CPU there)."""
    from fse.core.model import gpu_offload

    if gpu_offload():
        pytest.skip("this machine's llama.cpp has a GPU: the refusal cannot happen here")
    sock = tmp_path / "fse.sock"
    result = run_fse("serve", "--listen", f"unix:{sock}", "--gpu-layers", "4", timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "fse serve: error: model.gpu_layers: 4 layers asked for a GPU, but this llama.cpp has "
        'no GPU backend or no GPU is present; accepted: "auto"' in result.stderr
    )
    assert not sock.exists()  # the socket bound before the model loads is removed again
    every = run_fse("serve", "--listen", f"unix:{sock}", "--gpu-layers", "all", timeout=60)
    assert every.returncode == 1 and "model.gpu_layers: every layer asked for a GPU" in (
        every.stderr
    )
    for bad, words in (
        ("-2", 'model.gpu_layers: -2 is out of range; accepted: "auto" (every layer'),
        ('"most"', "model.gpu_layers: 'most' is out of range; accepted: \"auto\" (every"),
        ('"20"', "model.gpu_layers: '20' is out of range; accepted: \"auto\""),
        ("1.5", "model.gpu_layers: expected an integer or a string, got a float (1.5)"),
    ):
        checked = run_fse("config", "check", str(write(tmp_path, f"[model]\ngpu_layers = {bad}\n")))
        assert checked.returncode == 2 and words in checked.stderr, checked.stderr


def test_gpu_layers_take_a_count_or_a_word() -> None:
    for given, settled in ((0, 0), (20, 20), ("all", "all"), ("auto", "auto")):
        assert load(None, {"model.gpu_layers": given}).model.gpu_layers == settled
    assert load(None, {}).model.gpu_layers == "auto"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('split_mode = "rows"', "model.split_mode: 'rows' is out of range; accepted: none, layer"),
        ('tensor_split = "3,x"', "model.tensor_split: '3,x' is out of range; accepted: comma-sep"),
        ('tensor_split = "0,0"', "model.tensor_split: '0,0' is out of range; accepted: comma-sep"),
        ("main_gpu = 256", "model.main_gpu: 256 is out of range; accepted: integer 0..255"),
    ],
)
def test_gpu_split_keys_name_what_they_accept(tmp_path: Path, text: str, words: str) -> None:
    checked = run_fse("config", "check", str(write(tmp_path, f"[model]\n{text}\n")))
    assert checked.returncode == 2 and words in checked.stderr, checked.stderr


def test_gpu_split_keys_reach_the_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\nsplit_mode = "row"\ntensor_split = "3,1"\nmain_gpu = 1\n')
    model = load(path, {}).model
    assert (model.split_mode, model.tensor_split, model.main_gpu) == ("row", "3,1", 1)
