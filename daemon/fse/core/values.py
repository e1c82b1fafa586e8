"""Checking one value of a policy or of the daemon's configuration, and the words of its
error. The guard configs (fse.core.registry), the policy (fse.core.policy) and the
settings (fse.serve.config) all check their keys here, so every refusal reads alike:

    FIELD: expected KIND, got DESCRIPTION; accepted: WORDS     (the wrong type)
    FIELD: VALUE is out of range; accepted: WORDS              (the right type, refused)
    FIELD: VALUE is not accepted; accepted: WORDS              (not one of a set, a pattern)

FIELD is how the caller names the value (a dotted key, a file and key, a flag). The
types are TOML's: a bool is not a number; an integer is accepted where a float is
expected (and converted), a float is not accepted for an integer; every float must be
finite. Whatever the value was (a 1 MB string, an array nested hundreds deep), the
error shows it bounded.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Iterable
from typing import Any

from fse.core.errors import InputError

__all__ = ["ValueRefused", "check", "choice", "describe", "not_accepted", "show", "wrong_type"]


class ValueRefused(InputError):
    """A refused value. ``key`` is the field the message names, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# The words of "expected ...", by the type a key declares.
_KINDS: dict[Any, str] = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
          list: "an array", dict: "a table", int | str: "an integer or a string"}  # fmt: skip

# A refused value as errors show it, bounded.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxstring, _SHOWN.maxother = 3, 8, 80, 80


def show(value: object) -> str:
    """The value as "VALUE is out of range" shows it: its repr, bounded."""
    return _SHOWN.repr(value)


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def describe(value: object) -> str:
    """'a string ("x")', 'a boolean (true)', 'an integer (3)', 'a date (...)': what a
    refused value was, in TOML's words (a string and a boolean as TOML spells them)."""
    kinds = {bool: "a boolean", str: "a string", int: "an integer", float: "a float"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    if isinstance(value, dict):
        kind = "a table"
    elif isinstance(value, list):
        kind = "an array"
    if isinstance(value, str):
        shown = json.dumps(value[:40])  # no more than _short keeps
    elif isinstance(value, bool):
        shown = json.dumps(value)
    else:
        shown = show(value)
    return f"{kind} ({_short(shown)})"


def wrong_type(
    field: str,
    value: object,
    kind: type,
    accepted: str = "",
    *,
    error: type[ValueRefused] = ValueRefused,
) -> ValueRefused:
    """The error for a value that is not of `kind` (bool, int, float, str, list, dict)."""
    tail = f"; accepted: {accepted}" if accepted else ""
    return error(f"{field}: expected {_KINDS[kind]}, got {describe(value)}{tail}", field)


def not_accepted(
    field: str, value: object, accepted: str, *, error: type[ValueRefused] = ValueRefused
) -> ValueRefused:
    """The error for a value outside a set or a pattern: a string is shown as TOML spells
    it, anything else described."""
    shown = _short(json.dumps(value[:40])) if isinstance(value, str) else describe(value)
    return error(f"{field}: {shown} is not accepted; accepted: {accepted}", field)


def check(
    field: str,
    value: object,
    kind: type,
    ok: Callable[[Any], bool],
    accepted: str,
    *,
    error: type[ValueRefused] = ValueRefused,
) -> Any:
    """The value if it is of `kind` and ok(value) holds (`ok` sees a float as a float),
    else `error` naming `field` and the `accepted` words. A float comes back as a float,
    -0.0 as 0.0 (so both hash alike), an integer too large for a float as out of range."""
    if kind is bool:
        ok_type = isinstance(value, bool)
    elif kind is float:
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if not ok_type:
        raise wrong_type(field, value, kind, accepted, error=error)
    checked: Any = value
    if kind is float:
        try:
            checked = float(value) + 0.0  # type: ignore[arg-type]
        except OverflowError:  # an integer too large for a float
            checked = math.inf
    # Every float must also be finite; NaN fails every comparison.
    if (kind is float and not math.isfinite(checked)) or not ok(checked):
        raise error(f"{field}: {show(value)} is out of range; accepted: {accepted}", field)
    return checked


def choice(
    field: str, value: object, choices: Iterable[str], *, error: type[ValueRefused] = ValueRefused
) -> str:
    """One of `choices` (strings), else the error listing them as TOML spells them."""
    options = list(choices)
    if isinstance(value, str) and value in options:
        return value
    raise not_accepted(field, value, ", ".join(json.dumps(c) for c in options), error=error)
