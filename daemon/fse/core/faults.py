"""Debug-only fault injection, to prove the fail-closed paths: off unless asked for.

`Faults` says at which token a stream's logits turn NaN, +Inf or scaled, its guard
chain raises, or the decode thread hangs; `Faults.parse` reads the `nan@K` specs of
`fse generate --debug-fault` and the daemon's `fse-debug-fault` metadata. The engine,
the guard chain and the scheduler each act on their own field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fse.core.errors import InputError

_FAULT_FIELDS = {
    "nan": "nan_at",
    "inf": "inf_at",
    "scale": "scale_at",
    "guard-error": "guard_error_at",
    "hang": "hang_at",
}


@dataclass(frozen=True, slots=True)
class Faults:
    """Debug-only fault injection, to prove the fail-closed paths. Off by default."""

    nan_at: int | None = None  # write a NaN into the logits at this step
    inf_at: int | None = None  # write +Inf into the logits at this step
    scale_at: int | None = None  # multiply the logits by `scale` at this step
    scale: float = 1.0
    guard_error_at: int | None = None  # a guard raises at this step (used by the guard chain)
    hang_at: int | None = None  # the decode thread blocks before this step (the watchdog test)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Faults:
        """Parse `nan@K`, `inf@K`, `scale@K:FACTOR`, `guard-error@K`, `hang@K` (K = token index)."""
        fields: dict[str, Any] = {}
        for spec in specs:
            kind, _, where = spec.partition("@")
            step_text, _, factor = where.partition(":")
            try:
                step = int(step_text)
                if step < 0:
                    raise ValueError
                if kind == "scale":
                    fields["scale"] = float(factor)
                elif factor:
                    raise ValueError
            except ValueError:
                raise InputError(
                    f"debug fault {spec!r} is invalid; accepted: nan@K, inf@K, "
                    "scale@K:FACTOR, guard-error@K, hang@K with K a token index >= 0"
                ) from None
            key = _FAULT_FIELDS.get(kind)
            if key is None:
                raise InputError(
                    f"debug fault {spec!r}: unknown kind {kind!r}; accepted: nan@K, inf@K, "
                    "scale@K:FACTOR, guard-error@K, hang@K with K a token index >= 0"
                )
            fields[key] = step
        return cls(**fields)

    @property
    def touches_logits(self) -> bool:
        return self.nan_at is not None or self.inf_at is not None or self.scale_at is not None


NO_FAULTS = Faults()
