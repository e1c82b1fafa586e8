"""Unit tests for fse.core.policy: built-ins, canonical hashing, TOML round-trip, validation."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from conftest import run_fse
from fse.core.policy import (
    DEFAULT_PPL_WINDOW,
    HealthBands,
    L2NormGuard,
    LoopGuard,
    PerplexityGuard,
    Policy,
    PolicyError,
    builtin_names,
    builtin_policy,
    load_policies,
    load_policy_file,
    parse_policy,
    resolve_policy,
)

PRO_TEXT = """\
name = "pro"
[health]
green_below = 200.0
red_above = 400.0
[guards.perplexity]
threshold = 400.0
window = 16
min_tokens = 4
action = "halt"
[guards.l2_norm]
threshold = 1e4
[guards.logit_variance]
threshold = 0.1
[guards.max_prob]
threshold = 0.99
consecutive = 8
[guards.loop]
max_period = 1024
min_repeats = 3
min_span = 12
"""


def _with(table: str, key: str, value: str) -> str:
    """A valid policy whose [table] has key = value (replacing or adding it)."""
    lines = PRO_TEXT.splitlines()
    start = lines.index(f"[{table}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [ln for ln in lines[start + 1 : end] if not ln.startswith(f"{key} =")]
    return "\n".join([*lines[: start + 1], *body, f"{key} = {value}", *lines[end:]]) + "\n"


def _error(text: str, source: str = "test.toml") -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(f"{source}: "), message
    return message


# --- built-ins -----------------------------------------------------------------


def test_builtin_names() -> None:
    assert builtin_names() == ("default", "pro")


def test_default_builtin() -> None:
    p = builtin_policy("default")
    assert p.name == "default"
    assert p.health == HealthBands(200.0, 400.0)
    assert p.perplexity == PerplexityGuard(400.0, 16, 4, "halt")
    assert p.l2_norm == L2NormGuard(1e4, "halt")
    assert (p.logit_variance, p.max_prob, p.loop) == (None, None, None)
    assert list(p.guards()) == ["perplexity", "l2_norm"]


def test_pro_extends_default() -> None:
    default, pro = builtin_policy("default"), builtin_policy("pro")
    assert set(default.guards()) < set(pro.guards())
    for name, cfg in default.guards().items():
        assert pro.guards()[name] == cfg
    assert pro.health == default.health
    assert pro.loop == LoopGuard(1024, 3, 12, "halt")
    assert pro.logit_variance is not None and pro.logit_variance.threshold == 0.1
    assert pro.max_prob is not None
    assert (pro.max_prob.threshold, pro.max_prob.consecutive) == (0.99, 8)
    assert pro.sha256 != default.sha256


def test_builtin_matches_design_example() -> None:
    # The pro policy written out in full (PRO_TEXT): same canonical form, same hash.
    assert parse_policy(PRO_TEXT).sha256 == builtin_policy("pro").sha256


def test_unknown_builtin() -> None:
    with pytest.raises(PolicyError, match="default, pro"):
        builtin_policy("nope")


def test_ppl_window() -> None:
    assert builtin_policy("default").ppl_window == 16
    assert parse_policy(_with("guards.perplexity", "window", "0")).ppl_window == 0
    assert parse_policy('name = "bare"').ppl_window == DEFAULT_PPL_WINDOW == 16


# --- canonical form and sha256 ---------------------------------------------------


def test_sha256_is_hex_of_canonical() -> None:
    import hashlib

    p = builtin_policy("pro")
    assert len(p.sha256) == 64
    assert p.sha256 == hashlib.sha256(p.canonical().encode()).hexdigest()
    assert p.canonical() == parse_policy(PRO_TEXT).canonical()


def test_sha256_equal_for_equivalent_files() -> None:
    base = parse_policy(PRO_TEXT).sha256
    # 1e4 vs 10000.0 vs 10000 (int), 400 (int) vs 400.0
    variant = PRO_TEXT.replace("threshold = 1e4", "threshold = 10000").replace(
        "threshold = 400.0", "threshold = 4e2"
    )
    assert variant != PRO_TEXT
    assert parse_policy(variant).sha256 == base
    # Key order, table order, comments, whitespace, explicit defaults.
    reordered = """\
# a comment
name = "pro"   # trailing comment
description = "descriptions are not part of the hash"
[guards.loop]
min_span = 12
max_period = 1024
[guards.max_prob]
consecutive = 8
threshold = 0.99
action = "halt"
[guards.logit_variance]
threshold = 1e-1
[guards.l2_norm]
threshold = 10000.0
[guards.perplexity]
min_tokens = 4
threshold = 400
[health]
red_above = 400
green_below = 2e2
"""
    assert parse_policy(reordered).sha256 == base


def test_sha256_changes_with_every_setting() -> None:
    base = parse_policy(PRO_TEXT).sha256
    changes = [
        ("guards.perplexity", "threshold", "401.0"),
        ("guards.perplexity", "window", "17"),
        ("guards.perplexity", "min_tokens", "5"),
        ("guards.perplexity", "action", '"warn"'),
        ("guards.l2_norm", "threshold", "1e5"),
        ("guards.logit_variance", "threshold", "0.2"),
        ("guards.max_prob", "threshold", "0.98"),
        ("guards.max_prob", "consecutive", "9"),
        ("guards.loop", "max_period", "512"),
        ("guards.loop", "min_repeats", "4"),
        ("guards.loop", "min_span", "16"),
        ("health", "green_below", "100.0"),
        ("health", "red_above", "500.0"),
    ]
    hashes = {parse_policy(_with(t, k, v)).sha256 for t, k, v in changes}
    assert base not in hashes
    assert len(hashes) == len(changes)
    assert parse_policy(PRO_TEXT.replace('"pro"', '"pro2"')).sha256 != base
    # Turning a guard off changes it too.
    no_loop = PRO_TEXT.split("[guards.loop]")[0]
    assert parse_policy(no_loop).sha256 != base


def test_negative_zero_hashes_like_zero() -> None:
    a = parse_policy(_with("guards.logit_variance", "threshold", "-0.0"))
    b = parse_policy(_with("guards.logit_variance", "threshold", "0"))
    assert a.sha256 == b.sha256


def test_defaults_filled_in() -> None:
    bare = parse_policy('name = "x"\n[guards.loop]\n[guards.perplexity]\n[guards.max_prob]\n')
    assert bare.loop == LoopGuard(1024, 3, 12, "halt")
    assert bare.perplexity == PerplexityGuard(400.0, 16, 4, "halt")
    assert bare.health == HealthBands(200.0, 400.0)
    explicit = parse_policy(
        'name = "x"\n[health]\ngreen_below = 200\nred_above = 400\n'
        "[guards.loop]\nmax_period = 1024\nmin_repeats = 3\nmin_span = 12\n"
        '[guards.perplexity]\nthreshold = 400\nwindow = 16\nmin_tokens = 4\naction = "halt"\n'
        "[guards.max_prob]\nthreshold = 0.99\nconsecutive = 8\n"
    )
    assert bare.sha256 == explicit.sha256


# --- to_toml round-trip ----------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        builtin_policy("default"),
        builtin_policy("pro"),
        Policy("bare"),
        Policy(
            "odd.values-1",
            HealthBands(1e-3, 1e300),
            PerplexityGuard(1.0000001, 0, 4096, "warn"),
            L2NormGuard(1e-05),
            loop=LoopGuard(4096, 1000, 65536, "warn"),
            description='quote " backslash \\ newline \n tab \t del \x7f bell \x07 é 🙂',
        ),
    ],
    ids=["default", "pro", "bare", "odd"],
)
def test_to_toml_round_trip(policy: Policy) -> None:
    text = policy.to_toml()
    again = parse_policy(text, "rendered.toml")
    assert again == policy
    assert again.sha256 == policy.sha256
    assert again.description == policy.description
    assert again.to_toml() == text


def test_policies_built_in_code_are_validated() -> None:
    with pytest.raises(PolicyError, match=r"guards\.loop\.min_repeats: 1 is out of range"):
        LoopGuard(min_repeats=1)
    with pytest.raises(PolicyError, match="name"):
        Policy("has space")
    p = Policy("ints", perplexity=PerplexityGuard(threshold=400))  # int -> float
    assert p.perplexity is not None and isinstance(p.perplexity.threshold, float)
    assert dataclasses.replace(p, name="other").sha256 != p.sha256


# --- validation errors ----------------------------------------------------------


def test_unknown_top_level_key() -> None:
    msg = _error("colour = 1\n" + PRO_TEXT)
    assert "test.toml: colour: unknown key" in msg
    assert "accepted: description, guards, health, name" in msg


def test_unknown_key_in_guard_table() -> None:
    msg = _error(_with("guards.max_prob", "treshold", "0.5"))
    assert "guards.max_prob.treshold: unknown key" in msg
    assert "accepted: action, consecutive, threshold" in msg


def test_unknown_key_in_health() -> None:
    msg = _error(_with("health", "amber", "300"))
    assert "health.amber: unknown key; accepted: green_below, red_above" in msg


def test_unknown_guard() -> None:
    msg = _error(PRO_TEXT + "[guards.entropy]\nthreshold = 1\n")
    assert "guards.entropy: unknown key" in msg
    for name in ("l2_norm", "logit_variance", "loop", "max_prob", "non_finite", "perplexity"):
        assert name in msg


def test_guard_table_must_be_table() -> None:
    msg = _error('name = "x"\nguards = { loop = 3 }\n')
    assert "guards.loop: expected a table" in msg
    assert "health: expected a table" in _error('name = "x"\nhealth = 5\n')


@pytest.mark.parametrize(
    ("table", "key", "value", "expect"),
    [
        ("guards.perplexity", "threshold", '"400"', 'expected a number, got a string ("400")'),
        ("guards.perplexity", "threshold", "true", "expected a number, got a boolean (true)"),
        ("guards.l2_norm", "threshold", "[1.0]", "expected a number, got an array"),
        ("guards.perplexity", "window", "16.0", "expected an integer, got a float (16.0)"),
        ("guards.loop", "min_span", "false", "expected an integer, got a boolean"),
        ("guards.max_prob", "consecutive", '"8"', "expected an integer, got a string"),
        ("health", "green_below", "1979-05-27", "expected a number, got a date"),
    ],
)
def test_wrong_type(table: str, key: str, value: str, expect: str) -> None:
    msg = _error(_with(table, key, value))
    assert f"{table}.{key}: {expect}" in msg
    assert "accepted: " in msg


@pytest.mark.parametrize(
    ("table", "key", "value", "accepted"),
    [
        ("guards.perplexity", "threshold", "1.0", "value > 1, finite"),
        ("guards.perplexity", "threshold", "0", "value > 1, finite"),
        ("guards.perplexity", "threshold", "inf", "value > 1, finite"),
        ("guards.perplexity", "threshold", "nan", "value > 1, finite"),
        ("guards.perplexity", "window", "-1", "integer 0 <= value <= 4096"),
        ("guards.perplexity", "window", "4097", "integer 0 <= value <= 4096"),
        ("guards.perplexity", "min_tokens", "0", "integer 1 <= value <= 4096"),
        ("guards.perplexity", "min_tokens", "4097", "integer 1 <= value <= 4096"),
        ("guards.l2_norm", "threshold", "0.0", "value > 0, finite"),
        ("guards.l2_norm", "threshold", "-5", "value > 0, finite"),
        ("guards.l2_norm", "threshold", "1e400", "value > 0, finite"),
        ("guards.l2_norm", "threshold", str(10**400), "value > 0, finite"),
        ("guards.logit_variance", "threshold", "-0.001", "value >= 0, finite"),
        ("guards.logit_variance", "threshold", "-inf", "value >= 0, finite"),
        ("guards.max_prob", "threshold", "1.5", "0 < value <= 1"),
        ("guards.max_prob", "threshold", "0", "0 < value <= 1"),
        ("guards.max_prob", "consecutive", "0", "integer 1 <= value <= 4096"),
        ("guards.max_prob", "consecutive", "4097", "integer 1 <= value <= 4096"),
        ("guards.loop", "max_period", "0", "integer 1 <= value <= 4096"),
        ("guards.loop", "max_period", "4097", "integer 1 <= value <= 4096"),
        ("guards.loop", "min_repeats", "1", "integer 2 <= value <= 1000"),
        ("guards.loop", "min_repeats", "1001", "integer 2 <= value <= 1000"),
        ("guards.loop", "min_span", "1", "integer 2 <= value <= 65536"),
        ("guards.loop", "min_span", "65537", "integer 2 <= value <= 65536"),
        ("health", "green_below", "0", "value > 0, finite"),
        ("health", "red_above", "-1", "value > 0, finite"),
        ("health", "red_above", "inf", "value > 0, finite"),
    ],
)
def test_out_of_range(table: str, key: str, value: str, accepted: str) -> None:
    msg = _error(_with(table, key, value))
    assert f"{table}.{key}: " in msg
    assert "is out of range" in msg
    assert f"accepted: {accepted}" in msg


def test_out_of_range_message_exact() -> None:
    msg = _error(_with("guards.max_prob", "threshold", "1.5"))
    assert (
        msg == "test.toml: guards.max_prob.threshold: 1.5 is out of range; accepted: 0 < value <= 1"
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(_with("guards.max_prob", "threshold", "1.5"))
    assert info.value.key == "guards.max_prob.threshold"


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("guards.perplexity", "threshold", "1.0000001"),
        ("guards.perplexity", "window", "0"),
        ("guards.perplexity", "window", "4096"),
        ("guards.perplexity", "min_tokens", "1"),
        ("guards.l2_norm", "threshold", "1e-9"),
        ("guards.logit_variance", "threshold", "0"),
        ("guards.max_prob", "threshold", "1"),
        ("guards.max_prob", "consecutive", "1"),
        ("guards.loop", "max_period", "1"),
        ("guards.loop", "min_repeats", "2"),
        ("guards.loop", "min_span", "65536"),
        ("health", "green_below", "400"),  # equal bands are allowed
    ],
)
def test_range_edges_accepted(table: str, key: str, value: str) -> None:
    parse_policy(_with(table, key, value))


def test_health_bands_ordered() -> None:
    msg = _error(_with("health", "green_below", "500.0"))
    assert "health.green_below: 500.0 is above health.red_above (400.0)" in msg
    assert "accepted: 0 < green_below <= red_above" in msg


@pytest.mark.parametrize("value", ['"stop"', '"HALT"', "1", "true"])
def test_bad_action(value: str) -> None:
    msg = _error(_with("guards.loop", "action", value))
    assert "guards.loop.action: " in msg
    assert 'accepted: "halt", "warn"' in msg


def test_malformed_toml() -> None:
    msg = _error('name = "x"\n[guards.loop\nmax_period = 3\n', "broken.toml")
    assert msg.startswith("broken.toml: invalid TOML: ")
    assert "line 2" in msg


def test_malformed_toml_from_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n\n\nthreshold == 3\n')
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert str(path) in str(info.value)
    assert "line 4" in str(info.value)


def test_missing_name() -> None:
    msg = _error(PRO_TEXT.replace('name = "pro"\n', ""))
    assert "name: missing" in msg


@pytest.mark.parametrize("value", ['""', '"has space"', '"a/b"', '"' + "x" * 65 + '"', "3"])
def test_bad_name(value: str) -> None:
    msg = _error(PRO_TEXT.replace('name = "pro"', f"name = {value}"))
    assert "name: " in msg
    assert "accepted: 1 to 64 characters of A-Z a-z 0-9 _ . -" in msg


def test_a_refused_string_is_shown_bounded() -> None:
    """A refused name or action was quoted whole; now as every refused value is (at most
    40 characters, fse.core.values)."""
    msg = _error(PRO_TEXT.replace('name = "pro"', f'name = "{"x" * 100_000}"'))
    assert msg == (
        f'test.toml: name: "{"x" * 36}... is not accepted; '
        "accepted: 1 to 64 characters of A-Z a-z 0-9 _ . -"
    )
    msg = _error(_with("guards.loop", "action", f'"{"h" * 100_000}"'))
    shown = f'"{"h" * 36}...'
    assert (
        msg == f'test.toml: guards.loop.action: {shown} is not accepted; accepted: "halt", "warn"'
    )


def test_bad_description() -> None:
    assert "description: expected a string" in _error('name = "x"\ndescription = 5\n')


@pytest.mark.parametrize("key", ["action", "enabled", "threshold"])
def test_non_finite_cannot_be_configured(key: str) -> None:
    value = '"warn"' if key == "action" else "false"
    msg = _error(PRO_TEXT + f"[guards.non_finite]\n{key} = {value}\n")
    assert f"guards.non_finite.{key}: the non_finite guard is always on" in msg
    assert "not configurable" in msg


def test_empty_non_finite_table_is_allowed_and_ignored() -> None:
    with_table = parse_policy(PRO_TEXT + "[guards.non_finite]\n")
    assert with_table.sha256 == parse_policy(PRO_TEXT).sha256


def test_policy_without_guards_is_valid() -> None:
    p = parse_policy('name = "only-non-finite"\n')
    assert p.guards() == {}
    assert parse_policy(p.to_toml()).sha256 == p.sha256


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
    path.write_text(_with("guards.loop", "min_span", "1"))
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert str(info.value).startswith(f"{path}: guards.loop.min_span: 1 is out of range")


def test_resolve_builtin() -> None:
    assert resolve_policy("pro") is builtin_policy("pro")
    assert resolve_policy("default", None).name == "default"


def test_resolve_from_policies_dir(tmp_path: Path) -> None:
    (tmp_path / "strict.toml").write_text(_with("guards.perplexity", "threshold", "100"))
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
