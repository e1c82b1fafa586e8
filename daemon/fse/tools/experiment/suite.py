"""The prompt suite of `fse experiment`: parsing and checking a suite file, and what a
category changes (its sampling, its policy override). See fse.tools.experiment for the
file's format."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fse.core.errors import InputError
from fse.core.registry import GUARDS

if TYPE_CHECKING:
    from fse.core.policy import Policy
    from fse.core.types import Sampling
    from fse.tools.runner import Run

DEFAULT_MAX_TOKENS = 96
DEFAULT_SEEDS = 3

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EXPECT = ("halt", "pass")
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")


def _guard_types() -> dict[str, type[Any]]:
    """The guards a policy_override may name, and their config types (the registry's)."""
    return {g.name: g.config for g in GUARDS}


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    title: str
    expect: str  # "halt" | "pass"
    prompts: tuple[str, ...]
    description: str = ""
    sampling: dict[str, float] = field(default_factory=dict)  # overrides of Sampling()
    max_tokens: int | None = None
    policy_override: dict[str, dict[str, Any]] = field(default_factory=dict)
    input: bool = False  # about the prompt: listed in the input-guard table


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    categories: tuple[Category, ...]
    description: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    seeds: int = DEFAULT_SEEDS
    source: str = ""


class SuiteError(InputError):
    """An invalid suite file; the message names the file and the key."""


def builtin_suite() -> Suite:
    resource = resources.files("fse") / "data" / "suite.toml"
    return parse_suite(resource.read_text(encoding="utf-8"), "<built-in suite.toml>")


def load_suite(path: Path) -> Suite:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SuiteError(f"--suite: {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"--suite: {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_suite(text, str(path))


def parse_suite(text: str, source: str) -> Suite:
    """Parse and validate a suite; errors read '--suite: SOURCE: key: what is accepted'."""
    where = f"--suite: {source}"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{where}: invalid TOML: {exc}") from None

    def fail(key: str, message: str) -> SuiteError:
        return SuiteError(f"{where}: {key}: {message}")

    _unknown(doc, ("name", "description", "max_tokens", "seeds", "category"), "", fail)
    name = _str(doc.get("name", Path(source).stem), "name", fail)
    description = _str(doc.get("description", ""), "description", fail, empty=True)
    max_tokens = _int(doc.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", 1, 8192, fail)
    seeds = _int(doc.get("seeds", DEFAULT_SEEDS), "seeds", 1, 1000, fail)
    raw = doc.get("category")
    if not isinstance(raw, list) or not raw:
        raise fail("category", "expected at least one [[category]] table")
    categories: list[Category] = []
    for i, cat in enumerate(raw):
        key = f"category[{i}]"
        if not isinstance(cat, dict):
            raise fail(key, "expected a table")
        _unknown(
            cat,
            (
                "name",
                "title",
                "expect",
                "description",
                "prompts",
                "sampling",
                "max_tokens",
                "policy_override",
                "input",
            ),
            key,
            fail,
        )
        if "name" not in cat:
            raise fail(f"{key}.name", "missing")
        cname = _str(cat["name"], f"{key}.name", fail)
        if not _ID_RE.fullmatch(cname):
            raise fail(
                f"{key}.name", f"{cname!r} is not accepted; accepted: [A-Za-z0-9_.-]{{1,64}}"
            )
        if any(c.name == cname for c in categories):
            raise fail(f"{key}.name", f"{cname!r} is used twice; names must be unique")
        expect = cat.get("expect")
        if expect not in _EXPECT:
            raise fail(f"{key}.expect", f'{expect!r} is not accepted; accepted: "halt", "pass"')
        prompts = cat.get("prompts")
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise fail(f"{key}.prompts", "expected a non-empty list of non-empty strings")
        sampling = _sampling(cat.get("sampling", {}), f"{key}.sampling", fail)
        cmax = cat.get("max_tokens")
        if cmax is not None:
            cmax = _int(cmax, f"{key}.max_tokens", 1, 8192, fail)
        override = _override(cat.get("policy_override", {}), f"{key}.policy_override", fail)
        is_input = cat.get("input", False)
        if not isinstance(is_input, bool):
            raise fail(f"{key}.input", f"{is_input!r} is not accepted; accepted: true, false")
        categories.append(
            Category(
                name=cname,
                title=_str(cat.get("title", cname), f"{key}.title", fail),
                expect=str(expect),
                prompts=tuple(prompts),
                description=_str(cat.get("description", ""), f"{key}.description", fail, True),
                sampling=sampling,
                max_tokens=cmax,
                policy_override=override,
                input=is_input,
            )
        )
    return Suite(name, tuple(categories), description, max_tokens, seeds, source)


def _unknown(doc: dict[str, Any], accepted: Sequence[str], prefix: str, fail: Any) -> None:
    for key in doc:
        if key not in accepted:
            dotted = f"{prefix}.{key}" if prefix else key
            raise fail(dotted, f"unknown key; accepted: {', '.join(sorted(accepted))}")


def _str(value: object, key: str, fail: Any, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise fail(key, "expected a non-empty string" if not empty else "expected a string")
    return value


def _int(value: object, key: str, low: int, high: int, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fail(key, f"{value!r} is not accepted; accepted: integer {low}..{high}")
    return value


def _sampling(value: object, key: str, fail: Any) -> dict[str, float]:
    from fse.core.types import Sampling

    if not isinstance(value, dict):
        raise fail(key, "expected a table")
    _unknown(value, _SAMPLING_KEYS, key, fail)
    out: dict[str, float] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise fail(f"{key}.{k}", f"expected a number, got {v!r}")
        if k == "top_k" and not isinstance(v, int):
            raise fail(f"{key}.{k}", f"expected an integer, got {v!r}")
        out[k] = v
    try:
        Sampling(**out).validate()  # type: ignore[arg-type]
    except ValueError as exc:
        raise fail(f"{key}.{exc}".split(":")[0], str(exc).partition(": ")[2]) from None
    return out


def _override(value: object, key: str, fail: Any) -> dict[str, dict[str, Any]]:
    types = _guard_types()
    if not isinstance(value, dict):
        raise fail(key, "expected a table of guard tables")
    _unknown(value, tuple(types), key, fail)
    for guard, table in value.items():
        if not isinstance(table, dict):
            raise fail(f"{key}.{guard}", "expected a table")
        accepted = [f.name for f in dataclasses.fields(types[guard])]
        _unknown(table, accepted, f"{key}.{guard}", fail)
        try:
            types[guard](**table)
        except InputError as exc:  # a PolicyError naming guards.<guard>.<key>
            raise fail(key, str(exc)) from None
    return value


def apply_override(policy: Policy, override: dict[str, dict[str, Any]]) -> Policy:
    """`policy` with the override's guard tables merged in (a guard that is off is turned
    on with its defaults first). Same name; the sha256 follows the content."""
    if not override:
        return policy
    types = _guard_types()
    changes: dict[str, Any] = {}
    for guard, table in override.items():
        current = getattr(policy, guard) or types[guard]()
        changes[guard] = dataclasses.replace(current, **table)
    return dataclasses.replace(policy, **changes)


def sampling_for(category: Category, seed: int) -> Sampling:
    from fse.core.types import Sampling

    return dataclasses.replace(Sampling(**category.sampling), seed=seed)  # type: ignore[arg-type]


@dataclass(slots=True)
class CellRun:
    """One generation of the suite: a category's prompt and seed under one policy."""

    category: Category
    policy: Policy  # the policy as compared (the row's label); the observe-only one for references
    effective: Policy  # with the category's override applied
    run: Run
    reference: bool = False  # an unguarded run (plots only)
