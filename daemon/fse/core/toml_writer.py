"""Writing TOML: `fse policy show` (fse.core.policy) and `fse config check`
(fse.serve.config) print their documents here. The standard library reads TOML
(tomllib) but does not write it; these documents need only keys with a boolean, a
number, a string or an array of those, in tables, so this is all of the writer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["document", "string", "value"]

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def string(text: str) -> str:
    """A TOML basic string. Escapes what TOML forbids raw (controls, DEL, quote, backslash)."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def value(v: object) -> str:
    """A value as TOML spells it: true/false, a number's repr ("1e-05", "10000.0", "inf"
    are all TOML), an array of values, and anything else as a string of its str() (None
    as the empty string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return string("" if v is None else str(v))


def _keys(values: Mapping[str, object]) -> list[str]:
    return [f"{key} = {value(v)}" for key, v in values.items()]


def document(
    top: Mapping[str, object],
    tables: Mapping[str, Mapping[str, object]],
    footer: Iterable[str] = (),
) -> str:
    """`top`'s keys, then each table (`[name]` and its keys), then the `footer` lines (a
    comment), each part after an empty line; table names and keys must be bare keys."""
    lines = _keys(top)
    for name, keys in tables.items():
        lines += ["", f"[{name}]"] if lines else [f"[{name}]"]
        lines += _keys(keys)
    footer = list(footer)
    if footer:
        lines += ["", *footer]
    return "\n".join(lines) + "\n"
