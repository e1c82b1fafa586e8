"""Unit tests for fse.core.policy: built-ins, canonical hashing, TOML round-trip, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
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
    load_policy_file,
    parse_policy,
)
from support.policies import PRO_TEXT, policy_error, policy_with

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
    assert parse_policy(policy_with("guards.perplexity", "window", "0")).ppl_window == 0
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
[guards.near_loop]
max_period = 256
[guards.prompt_perplexity]
window_threshold = 5e3
threshold = 1000
skip = 4
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
    hashes = {parse_policy(policy_with(t, k, v)).sha256 for t, k, v in changes}
    assert base not in hashes
    assert len(hashes) == len(changes)
    assert parse_policy(PRO_TEXT.replace('"pro"', '"pro2"')).sha256 != base
    # Turning a guard off changes it too.
    no_loop = PRO_TEXT.split("[guards.loop]")[0]
    assert parse_policy(no_loop).sha256 != base


def test_negative_zero_hashes_like_zero() -> None:
    a = parse_policy(policy_with("guards.logit_variance", "threshold", "-0.0"))
    b = parse_policy(policy_with("guards.logit_variance", "threshold", "0"))
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
    msg = policy_error("colour = 1\n" + PRO_TEXT)
    assert "test.toml: colour: unknown key" in msg
    assert "accepted: description, guards, health, name" in msg


def test_unknown_key_in_guard_table() -> None:
    msg = policy_error(policy_with("guards.max_prob", "treshold", "0.5"))
    assert "guards.max_prob.treshold: unknown key" in msg
    assert "accepted: action, consecutive, threshold" in msg


def test_unknown_key_in_health() -> None:
    msg = policy_error(policy_with("health", "amber", "300"))
    assert "health.amber: unknown key; accepted: green_below, red_above" in msg


def test_unknown_guard() -> None:
    msg = policy_error(PRO_TEXT + "[guards.repetition]\nthreshold = 1\n")
    assert "guards.repetition: unknown key" in msg
    names = ["entropy", "l2_norm", "logit_variance", "loop", "max_prob", "non_finite"]
    names += ["perplexity", "prompt_perplexity"]
    for name in names:
        assert name in msg


def test_entropy_keys_name_what_they_accept() -> None:
    for key, value, words in (
        ("threshold", "0", "guards.entropy.threshold: 0 is out of range; accepted: 0 < nats <= 20"),
        ("threshold", "21", "guards.entropy.threshold: 21 is out of range"),
        ("window", "0", "guards.entropy.window: 0 is out of range; accepted: integer 1 <="),
        ("min_tokens", "5000", "guards.entropy.min_tokens: 5000 is out of range"),
        ("action", '"stop"', "guards.entropy.action:"),
    ):
        msg = policy_error(f'name = "x"\n[guards.entropy]\n{key} = {value}\n')
        assert words in msg, msg


def test_guard_table_must_be_table() -> None:
    msg = policy_error('name = "x"\nguards = { loop = 3 }\n')
    assert "guards.loop: expected a table" in msg
    assert "health: expected a table" in policy_error('name = "x"\nhealth = 5\n')


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
    msg = policy_error(policy_with(table, key, value))
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
    msg = policy_error(policy_with(table, key, value))
    assert f"{table}.{key}: " in msg
    assert "is out of range" in msg
    assert f"accepted: {accepted}" in msg


def test_out_of_range_message_exact() -> None:
    msg = policy_error(policy_with("guards.max_prob", "threshold", "1.5"))
    assert (
        msg == "test.toml: guards.max_prob.threshold: 1.5 is out of range; accepted: 0 < value <= 1"
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_with("guards.max_prob", "threshold", "1.5"))
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
    parse_policy(policy_with(table, key, value))


def test_health_bands_ordered() -> None:
    msg = policy_error(policy_with("health", "green_below", "500.0"))
    assert "health.green_below: 500.0 is above health.red_above (400.0)" in msg
    assert "accepted: 0 < green_below <= red_above" in msg


@pytest.mark.parametrize("value", ['"stop"', '"HALT"', "1", "true"])
def test_bad_action(value: str) -> None:
    msg = policy_error(policy_with("guards.loop", "action", value))
    assert "guards.loop.action: " in msg
    assert 'accepted: "halt", "warn"' in msg


def test_malformed_toml() -> None:
    msg = policy_error('name = "x"\n[guards.loop\nmax_period = 3\n', "broken.toml")
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
    msg = policy_error(PRO_TEXT.replace('name = "pro"\n', ""))
    assert "name: missing" in msg


@pytest.mark.parametrize("value", ['""', '"has space"', '"a/b"', '"' + "x" * 65 + '"', "3"])
def test_bad_name(value: str) -> None:
    msg = policy_error(PRO_TEXT.replace('name = "pro"', f"name = {value}"))
    assert "name: " in msg
    assert "accepted: 1 to 64 characters of A-Z a-z 0-9 _ . -" in msg


def test_a_refused_string_is_shown_bounded() -> None:
    """A refused name or action was quoted whole; now as every refused value is (at most
    40 characters, fse.core.values)."""
    msg = policy_error(PRO_TEXT.replace('name = "pro"', f'name = "{"x" * 100_000}"'))
    assert msg == (
        f'test.toml: name: "{"x" * 36}... is not accepted; '
        "accepted: 1 to 64 characters of A-Z a-z 0-9 _ . -"
    )
    msg = policy_error(policy_with("guards.loop", "action", f'"{"h" * 100_000}"'))
    shown = f'"{"h" * 36}...'
    assert (
        msg == f'test.toml: guards.loop.action: {shown} is not accepted; accepted: "halt", "warn"'
    )


def test_bad_description() -> None:
    assert "description: expected a string" in policy_error('name = "x"\ndescription = 5\n')


@pytest.mark.parametrize("key", ["action", "enabled", "threshold"])
def test_non_finite_cannot_be_configured(key: str) -> None:
    value = '"warn"' if key == "action" else "false"
    msg = policy_error(PRO_TEXT + f"[guards.non_finite]\n{key} = {value}\n")
    assert f"guards.non_finite.{key}: the non_finite guard is always on" in msg
    assert "not configurable" in msg


def test_empty_non_finite_table_is_allowed_and_ignored() -> None:
    with_table = parse_policy(PRO_TEXT + "[guards.non_finite]\n")
    assert with_table.sha256 == parse_policy(PRO_TEXT).sha256


def test_policy_without_guards_is_valid() -> None:
    p = parse_policy('name = "only-non-finite"\n')
    assert p.guards() == {}
    assert parse_policy(p.to_toml()).sha256 == p.sha256
