"""Unit tests for fse.core.policy, continued: loading and resolving policy files, health
bands, and the files the daemon trusts (issue 18)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from fse.core.policy import (
    HealthBands,
    Policy,
    PolicyError,
    builtin_policy,
    load_policies,
    load_policy_file,
    parse_policy,
    resolve_policy,
)
from support.daemons import run_fse
from support.policies import PRO_TEXT, policy_with

# --- loading and resolving -------------------------------------------------------


def test_load_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(PRO_TEXT.replace('"pro"', '"mine"'))
    assert load_policy_file(path).name == "mine"
    assert load_policy_file(str(path)).name == "mine"


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(PolicyError, match=r"missing\.toml: cannot read: No such file"):
        load_policy_file(missing)
    with pytest.raises(PolicyError, match="a directory, not a regular file"):
        load_policy_file(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'name = "\xff"\n')
    with pytest.raises(PolicyError, match=r"binary\.toml: not UTF-8"):
        load_policy_file(binary)


def test_error_source_is_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(policy_with("guards.loop", "min_span", "1"))
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert str(info.value).startswith(f"{path}: guards.loop.min_span: 1 is out of range")


def test_resolve_builtin() -> None:
    assert resolve_policy("pro") is builtin_policy("pro")
    assert resolve_policy("default", None).name == "default"


def test_resolve_from_policies_dir(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text(policy_with("guards.perplexity", "threshold", "100"))
    (tmp_path / "strict.toml").write_text(
        (tmp_path / "strict.toml").read_text().replace('"pro"', '"strict"')
    )
    p = resolve_policy("strict", tmp_path)
    assert p.name == "strict"
    assert p.perplexity is not None and p.perplexity.threshold == 100.0
    assert resolve_policy("pro", tmp_path) == builtin_policy("pro")


def test_resolve_dir_name_must_match_file(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text('name = "other"\n')
    with pytest.raises(PolicyError, match="does not match the file name"):
        resolve_policy("strict", tmp_path)


def test_dir_may_not_shadow_builtin(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text('name = "default"\n')
    with pytest.raises(PolicyError, match="built-in policy name"):
        resolve_policy("default", tmp_path)
    with pytest.raises(PolicyError, match="built-in policy name"):
        load_policies(tmp_path)


def test_resolve_by_path(tmp_path: Path) -> None:
    path = tmp_path / "anything.toml"
    path.write_text('name = "whatever"\n[guards.loop]\n')
    p = resolve_policy(str(path))
    assert p.name == "whatever" and p.loop is not None
    # A path wins even when a policies_dir is given.
    assert resolve_policy(str(path), tmp_path / "nowhere").name == "whatever"


def test_resolve_unknown_lists_names(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text('name = "strict"\n')
    with pytest.raises(PolicyError) as info:
        resolve_policy("nope", tmp_path)
    msg = str(info.value)
    assert "unknown policy 'nope'" in msg
    assert "known policies: default, pro, strict" in msg
    with pytest.raises(PolicyError, match=r"no policy file 'missing\.toml'; known policies"):
        resolve_policy("missing.toml", tmp_path)
    with pytest.raises(PolicyError, match="known policies: default, pro "):
        resolve_policy("nope")


def test_resolve_invalid_dir_file_reports_error(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text('name = "strict"\n[guards.loop]\nmin_span = 0\n')
    with pytest.raises(PolicyError, match=r"strict\.toml: guards\.loop\.min_span"):
        resolve_policy("strict", tmp_path)


def test_load_policies(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text('name = "strict"\n')
    (tmp_path / "notes.txt").write_text("ignored")
    got = load_policies(tmp_path)
    assert list(got) == ["default", "pro", "strict"]
    assert got["pro"] is builtin_policy("pro")
    assert list(load_policies()) == ["default", "pro"]
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(PolicyError, match=r"broken\.toml"):
        load_policies(tmp_path)


# --- health bands ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ppl", "band"),
    [
        (1.0, "green"),
        (199.999, "green"),
        (200.0, "yellow"),  # green is strictly below green_below
        (300.0, "yellow"),
        (400.0, "yellow"),  # red is strictly above red_above
        (400.0001, "red"),
        (math.inf, "red"),
        (math.nan, "red"),  # fail closed
    ],
)
def test_health_classify(ppl: float, band: str) -> None:
    assert HealthBands(200.0, 400.0).classify(ppl) == band


def test_health_equal_bands() -> None:
    bands = HealthBands(300.0, 300.0)
    assert [bands.classify(x) for x in (299.0, 300.0, 301.0)] == ["green", "yellow", "red"]


def test_every_registry_guard_is_a_policy_field_and_a_table() -> None:
    """Each entry of fse.core.registry.GUARDS is one Policy field and one [guards.*] table,
    its defaults parse from an empty table, and its summary renders."""
    from fse.core.registry import GUARDS

    for entry in GUARDS:
        policy = parse_policy(f'name = "x"\n[guards.{entry.name}]\n')
        cfg = getattr(policy, entry.name)
        assert cfg == entry.config() and list(policy.guards()) == [entry.name]
        assert entry.summary(cfg).startswith(entry.name)
    fixed = {"name", "health", "description", "sha256"}
    fields = [f.name for f in dataclasses.fields(Policy) if f.name not in fixed]
    assert fields == [g.name for g in GUARDS]


# --- files the daemon trusts (issue 18) ---------------------------------------------------

DEEP = 'name = "deep"\nx = ' + "[" * 1000 + "]" * 1000 + "\n"  # deeper than tomllib recurses


def test_toml_nested_too_deeply_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^test\.toml: invalid TOML: .* nested too deeply$"):
        parse_policy(DEEP, "test.toml")
    (tmp_path / "deep.toml").write_text(DEEP)
    with pytest.raises(PolicyError, match=r"deep\.toml: invalid TOML: .* nested too deeply$"):
        load_policies(tmp_path)


def test_policy_check_of_deep_toml_is_one_line(tmp_path: Path) -> None:
    """Finding 6: `fse policy check` ended in a RecursionError traceback."""
    path = tmp_path / "deep.toml"
    path.write_text(DEEP)
    checked = run_fse("policy", "check", str(path))
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert checked.stderr.strip().splitlines() == [
        f"fse policy: error: {path}: invalid TOML: arrays or tables nested too deeply"
    ]


def test_policy_check_of_a_fifo_is_refused(tmp_path: Path) -> None:
    """Finding 5: reading a FIFO waited for a writer that never came."""
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    checked = run_fse("policy", "check", str(fifo), timeout=60)
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert checked.stderr.strip().splitlines() == [
        f"fse policy: error: {fifo}: a FIFO, not a regular file; accepted: a regular file "
        "(or a symlink to one)"
    ]


def test_a_symlinked_policy_is_followed_and_its_target_checked(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    target = tmp_path / "elsewhere.toml"
    target.write_text('name = "linked"\n')
    (policies / "linked.toml").symlink_to(target)
    assert "linked" in load_policies(policies)
    target.chmod(0o666)
    with pytest.raises(PolicyError, match=r"linked\.toml: writable by its group and others"):
        load_policies(policies)


@pytest.mark.parametrize(("what", "mode", "words"), [
    ("dir", 0o777, "writable by its group and others (mode 0777)"),
    ("dir", 0o1777, "writable by its group and others (mode 1777)"),  # sticky: still open
    ("dir", 0o775, "writable by its group (mode 0775)"),
    ("file", 0o646, "writable by others (mode 0646)"),
    ("file", 0o664, "writable by its group (mode 0664)"),
])  # fmt: skip
def test_policies_others_can_write_are_refused(
    tmp_path: Path, what: str, mode: int, words: str
) -> None:
    """Finding 9: whoever can write in the policies directory decides what halts."""
    policies = tmp_path / "policies"
    policies.mkdir()
    strict = policies / "strict.toml"
    strict.write_text('name = "strict"\n')
    target = policies if what == "dir" else strict
    target.chmod(mode)
    with pytest.raises(PolicyError) as refused:
        load_policies(policies)
    assert str(refused.value) == (
        f"{target}: {words}, who could change what the daemon trusts; "
        f"accepted: writable by its owner only (chmod go-w {target})"
    )
    with pytest.raises(PolicyError, match="chmod go-w"):  # by name, as `fse generate` does
        resolve_policy("strict", policies)
    target.chmod(0o755 if what == "dir" else 0o644)
    assert "strict" in load_policies(policies)


def test_a_policy_file_given_by_path_is_not_held_to_the_directory_rules(tmp_path: Path) -> None:
    """`fse policy check FILE` and `--policy FILE` validate content: the owner/mode rules
    are for what the daemon serves (the policies directory)."""
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n')
    path.chmod(0o666)
    assert load_policy_file(path).name == "mine"
    with pytest.raises(PolicyError, match="writable by its group and others"):
        load_policy_file(path, private=True)
