"""Guard policies: TOML files that say which guards run, with what thresholds.

A policy file looks like this (every table and key other than ``name`` is optional)::

    name = "pro"                  # [A-Za-z0-9_.-]{1,64}
    description = "free text"     # optional; not part of the sha256 (see below)
    [health]                      # perplexity bands shown to users
    green_below = 200.0
    red_above = 400.0
    [guards.perplexity]
    threshold = 400.0
    window = 16                   # 0 = cumulative
    min_tokens = 4
    action = "halt"               # or "warn"; every guard table accepts it
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

Decisions the rest of the code relies on:

- A guard whose table is absent is off. A guard table that is present but omits a
  key takes the default shown above (the thresholds of the original status report),
  so ``[guards.loop]`` alone turns the loop guard on with 1024/3/12.
- The guards, their keys, defaults and ranges are declared in fse.core.registry
  (one entry per guard; docs/guards.md lists them).
- ``non_finite`` is always on, halts, and is not configurable. An empty
  ``[guards.non_finite]`` table is accepted (it documents intent); any key in it is
  rejected with a message saying so.
- Validation is strict: an unknown key at any level, a wrong type (a bool is not a
  number; an int is accepted where a float is expected, a float is not accepted
  for an integer field), a non-finite or out-of-range value all raise
  :class:`PolicyError`, whose message names the dotted key and what is accepted.
  The dataclasses validate themselves, so a policy built in code (``fse calibrate``)
  is checked by the same rules as one read from a file.
- ``sha256`` is the hex digest of :meth:`Policy.canonical`: compact JSON with sorted
  keys, every default filled in and every float normalised (``1e4`` and
  ``10000.0`` hash alike). It covers the name and everything that changes a
  decision; ``description`` is documentation and is left out, so rewording it does
  not change the identity reported in verdicts and the audit log.
- :func:`resolve_policy` looks a name up among the built-ins, then in the policies
  directory as ``<name>.toml``; anything containing a path separator or ending in
  ``.toml`` is a file path. A file in the policies directory may not shadow a
  built-in name, and its ``name`` must match its file stem (the name is the lookup key).
- Files are read through :mod:`fse.core.files`: a regular file only (a FIFO is refused,
  never waited on). The policies directory and every file in it must not be writable
  by group or others, since whoever writes them decides what halts. The built-ins are
  package data and are not checked. A TOML document nested too deeply for the parser
  is a PolicyError like any other invalid TOML.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fse.core import toml_writer
from fse.core.files import FileRefused, check_trusted_dir, read_trusted
from fse.core.registry import (
    ALWAYS_ON,
    GUARDS,
    EntropyGuard,
    GuardConfig,
    L2NormGuard,
    LogitVarianceGuard,
    LoopGuard,
    MaxProbGuard,
    NearLoopGuard,
    PerplexityGuard,
    PolicyError,
    PromptPerplexityGuard,
    spec,
)
from fse.core.registry.spec import check_float, positive, set_field
from fse.core.types import Health
from fse.core.values import describe, not_accepted, wrong_type

__all__ = [
    "DEFAULT_PPL_WINDOW",
    "EntropyGuard",
    "GuardConfig",
    "HealthBands",
    "L2NormGuard",
    "LogitVarianceGuard",
    "LoopGuard",
    "MaxProbGuard",
    "NearLoopGuard",
    "PerplexityGuard",
    "Policy",
    "PolicyError",
    "PromptPerplexityGuard",
    "builtin_names",
    "builtin_policy",
    "load_policies",
    "load_policy_file",
    "parse_policy",
    "resolve_policy",
]

# Window of the perplexity reported to clients when the perplexity guard is off.
DEFAULT_PPL_WINDOW = 16

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DESCRIPTION_MAX = 4096


# ---------------------------------------------------------------------------
# The policy model


@dataclass(frozen=True, slots=True)
class HealthBands:
    """Perplexity bands shown to users: below green_below green, above red_above red."""

    green_below: float = 200.0
    red_above: float = 400.0

    def __post_init__(self) -> None:
        ok = "value > 0, finite"
        set_field(
            self, "green_below", check_float("health.green_below", self.green_below, positive, ok)
        )
        set_field(self, "red_above", check_float("health.red_above", self.red_above, positive, ok))
        if self.green_below > self.red_above:
            raise PolicyError(
                f"health.green_below: {self.green_below!r} is above health.red_above "
                f"({self.red_above!r}); accepted: 0 < green_below <= red_above, finite",
                "health.green_below",
            )

    def classify(self, ppl: float) -> Health:
        """Band of a perplexity value; NaN is red (fail closed)."""
        if ppl < self.green_below:
            return "green"
        if ppl <= self.red_above:
            return "yellow"
        return "red"  # above red_above, or NaN (every comparison above was False)


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. Absent guards are None; ``non_finite`` is implicit and always on.

    There is one guard field per entry of :data:`fse.core.registry.GUARDS`, with the
    entry's name, in its order, typed ``<its config> | None`` (checked when this module
    is imported): a new guard adds its entry there and one line here.
    """

    name: str
    health: HealthBands = field(default_factory=HealthBands)
    # The guards (fse.core.registry.GUARDS):
    perplexity: PerplexityGuard | None = None
    l2_norm: L2NormGuard | None = None
    logit_variance: LogitVarianceGuard | None = None
    max_prob: MaxProbGuard | None = None
    entropy: EntropyGuard | None = None
    loop: LoopGuard | None = None
    near_loop: NearLoopGuard | None = None
    prompt_perplexity: PromptPerplexityGuard | None = None
    description: str = ""
    sha256: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            accepted = "1 to 64 characters of A-Z a-z 0-9 _ . -"
            raise not_accepted("name", self.name, accepted, error=PolicyError)
        if not isinstance(self.description, str) or len(self.description) > _DESCRIPTION_MAX:
            raise PolicyError(
                f"description: expected a string of at most {_DESCRIPTION_MAX} characters, "
                f"got {describe(self.description)}",
                "description",
            )
        set_field(self, "sha256", hashlib.sha256(self.canonical().encode()).hexdigest())

    def guards(self) -> dict[str, GuardConfig]:
        """The configurable guards that are on, by table name, in canonical order."""
        out: dict[str, GuardConfig] = {}
        for guard in GUARDS:
            cfg: GuardConfig | None = getattr(self, guard.name)
            if cfg is not None:
                out[guard.name] = cfg
        return out

    @property
    def ppl_window(self) -> int:
        """Window of the reported perplexity: the guard's window, or 16 when it is off."""
        return self.perplexity.window if self.perplexity is not None else DEFAULT_PPL_WINDOW

    def canonical(self) -> str:
        """Deterministic JSON of the name and every setting that affects a decision."""
        doc = {
            "name": self.name,
            "health": dataclasses.asdict(self.health),
            "guards": {n: dataclasses.asdict(c) for n, c in self.guards().items()},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def to_toml(self) -> str:
        """A policy file that parses back to an equal policy (same sha256)."""
        # No sha256 comment: it would go stale when someone edits the file.
        top = {"name": self.name}
        if self.description:
            top["description"] = self.description
        tables = {"health": dataclasses.asdict(self.health)}
        for name, cfg in self.guards().items():
            tables[f"guards.{name}"] = dataclasses.asdict(cfg)
        footer = f"# guards.{ALWAYS_ON}: always on, not configurable"
        return toml_writer.document(top, tables, [footer])


def _check_guard_fields() -> None:
    """Policy's guard fields must be the registry's entries: a guard missing on either side
    would be silently unconfigurable (or unparsed), so the import fails instead."""
    fixed = {"name", "health", "description", "sha256"}
    fields = [(f.name, f.type) for f in dataclasses.fields(Policy) if f.name not in fixed]
    wanted = [(g.name.value, f"{g.config.__name__} | None") for g in GUARDS]
    if fields != wanted:
        raise RuntimeError(
            f"fse.core.policy.Policy's guard fields {fields} do not match "
            f"fse.core.registry.GUARDS {wanted}"
        )


_check_guard_fields()


# ---------------------------------------------------------------------------
# Parsing


def _table(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong_type(key, value, dict, error=PolicyError)
    return value


def _reject_unknown(prefix: str, table: Mapping[str, object], accepted: list[str]) -> None:
    for key in table:
        if key not in accepted:
            dotted = f"{prefix}.{key}" if prefix else key
            raise PolicyError(
                f"{dotted}: unknown key; accepted: {', '.join(sorted(accepted))}", dotted
            )


def _init_fields(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _from_document(doc: dict[str, Any]) -> Policy:
    _reject_unknown("", doc, ["description", "guards", "health", "name"])
    if "name" not in doc:
        raise PolicyError('name: missing; every policy needs a name, e.g. name = "strict"', "name")
    health = _table("health", doc.get("health", {}))
    _reject_unknown("health", health, _init_fields(HealthBands))
    guards = _table("guards", doc.get("guards", {}))
    _reject_unknown("guards", guards, [*(g.name for g in GUARDS), ALWAYS_ON])

    configs: dict[str, GuardConfig] = {}
    for name, raw in guards.items():
        key = f"guards.{name}"
        table = _table(key, raw)
        if name == ALWAYS_ON:
            if table:
                first = next(iter(table))
                raise PolicyError(
                    f"{key}.{first}: the non_finite guard is always on and halts; it is not "
                    f"configurable (remove the key; an empty [{key}] table is allowed)",
                    f"{key}.{first}",
                )
            continue
        cls = spec(name).config
        _reject_unknown(key, table, _init_fields(cls))
        configs[name] = cls(**table)

    return Policy(
        name=doc["name"],
        health=HealthBands(**health),
        description=doc.get("description", ""),
        **configs,  # type: ignore[arg-type]  # keys are guard names, checked above
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate policy TOML. Errors are prefixed with ``source`` (a file name)."""
    try:
        doc = tomllib.loads(text)
        return _from_document(doc)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: invalid TOML: {exc}") from None
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}", exc.key) from None
    except RecursionError:  # tomllib recurses once per level: [[[[...]]]] exhausts the stack
        raise PolicyError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None


def load_policy_file(path: str | os.PathLike[str], *, private: bool = False) -> Policy:
    """Read and validate one policy file; an unreadable file is a PolicyError naming it.

    Only a regular file is read (a FIFO is refused, never waited on). `private` also
    refuses a file its group or others may write (fse.core.files), as for every file in
    the policies directory the daemon serves.
    """
    try:
        data = read_trusted(path, private=private)
    except FileRefused as exc:
        raise PolicyError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return parse_policy(text, str(path))


@cache
def builtin_names() -> tuple[str, ...]:
    """Names of the built-in policies shipped in the package (``default``, ``pro``)."""
    folder = resources.files("fse") / "policies"
    return tuple(
        sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))
    )


@cache
def builtin_policy(name: str) -> Policy:
    """A built-in policy by name; unknown names raise PolicyError listing the built-ins."""
    if name not in builtin_names():
        raise PolicyError(
            f"unknown built-in policy {name!r}; built-ins: {', '.join(builtin_names())}"
        )
    resource = resources.files("fse") / "policies" / f"{name}.toml"
    policy = parse_policy(resource.read_text(encoding="utf-8"), f"<built-in {name}.toml>")
    if policy.name != name:  # a packaging mistake, not a user error
        raise PolicyError(f"built-in {name}.toml declares name {policy.name!r}")
    return policy


def _dir_policy(path: Path) -> Policy:
    _check_dir(path.parent)
    policy = load_policy_file(path, private=True)
    if policy.name != path.stem:
        raise PolicyError(
            f"{path}: name {policy.name!r} does not match the file name; "
            f"a file in the policies directory must be <name>.toml",
            "name",
        )
    if path.stem in builtin_names():
        raise PolicyError(
            f"{path}: {path.stem!r} is a built-in policy name; choose another name",
            "name",
        )
    return policy


def _check_dir(policies_dir: Path) -> None:
    try:
        check_trusted_dir(policies_dir)
    except FileRefused as exc:
        raise PolicyError(str(exc)) from None


def load_policies(policies_dir: Path | None = None) -> dict[str, Policy]:
    """Every policy a daemon serves: the built-ins plus each ``*.toml`` in policies_dir.

    Any invalid file fails the whole load (the caller keeps its last good set), and so
    does a directory or file its group or others may write. Reads files: call it off the
    event loop.
    """
    out = {name: builtin_policy(name) for name in builtin_names()}
    if policies_dir is not None:
        _check_dir(Path(policies_dir))
        try:
            files = sorted(Path(policies_dir).glob("*.toml"))
        except OSError as exc:
            raise PolicyError(f"{policies_dir}: cannot list policies: {exc}") from None
        for path in files:
            out[path.stem] = _dir_policy(path)
    return out


def _known_names(policies_dir: Path | None) -> list[str]:
    names = list(builtin_names())
    if policies_dir is not None:
        with contextlib.suppress(OSError):  # the error message must not fail in turn
            names += sorted(p.stem for p in Path(policies_dir).glob("*.toml"))
    return names


def resolve_policy(name_or_path: str, policies_dir: Path | None = None) -> Policy:
    """A built-in name, a ``<policies_dir>/<name>.toml``, or a path to a ``.toml`` file."""
    looks_like_path = (
        "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith(".toml")
    )
    if not looks_like_path:
        in_dir = Path(policies_dir) / f"{name_or_path}.toml" if policies_dir else None
        if name_or_path in builtin_names():
            if in_dir is not None and in_dir.exists():
                _dir_policy(in_dir)  # raises: a directory file may not shadow a built-in
            return builtin_policy(name_or_path)
        if in_dir is not None and _NAME_RE.fullmatch(name_or_path) and in_dir.is_file():
            return _dir_policy(in_dir)
    elif Path(name_or_path).is_file():
        return load_policy_file(name_or_path)
    what = "no policy file" if looks_like_path else "unknown policy"
    raise PolicyError(
        f"{what} {name_or_path!r}; known policies: {', '.join(_known_names(policies_dir))} "
        f"(or give a path to a .toml file)"
    )
