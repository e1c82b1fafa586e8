"""Fuzz target: the policy loader (fse.core.policy.load_policy_file / parse_policy).

Invariants: any file is a Policy or a PolicyError with a message (never another
exception); a policy that loads has a 64-hex sha256, canonical JSON that parses, every
number finite, and writes back (to_toml) to TOML that parses to an equal policy with the
same sha256.
"""

from __future__ import annotations

import json
import math
import re

from fse.core.policy import PolicyError, load_policy_file, parse_policy
from fuzzlib import main, refused, write


def one_input(data: bytes) -> None:
    path = write("policy.toml", data)
    policy, error = refused(lambda: load_policy_file(path, private=True), PolicyError)
    if policy is None:
        assert str(error).startswith(str(path)), f"the error does not name the file: {error}"
        return
    assert re.fullmatch(r"[0-9a-f]{64}", policy.sha256)
    doc = json.loads(policy.canonical())
    for table in [doc["health"], *doc["guards"].values()]:
        for key, value in table.items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{key} = {value!r} was accepted"
    again = parse_policy(policy.to_toml(), "<to_toml>")
    assert again == policy, f"to_toml does not round-trip:\n{policy}\n{again}"
    assert again.sha256 == policy.sha256
    assert again.description == policy.description


if __name__ == "__main__":
    main(one_input)
