"""Fuzz target: the bearer tokens file (fse.serve.auth.TokenTable.load, auth.tokens_file).

Invariants: any file is a TokenTable or an InputError with a message that starts with
`auth.tokens_file:` (never another exception); a table that loads is not empty, every
name matches the documented NAME pattern and every digest is 32 bytes; a token is found
under the name whose line holds its sha256, and no other token is found at all.
"""

from __future__ import annotations

import hashlib
import re

from fse.core.errors import InputError
from fse.serve.auth import TokenTable
from fuzzlib import Reader, main, refused, write

NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def one_input(data: bytes) -> None:
    reader = Reader(data)
    token = reader.blob(32).decode("utf-8", "replace")
    text = reader.rest()
    if reader.chance():  # a line that holds a real token's digest, so lookups can succeed
        text += f"\nfuzz {hashlib.sha256(token.encode()).hexdigest()}\n".encode()
    path = write("tokens", text)
    table, error = refused(lambda: TokenTable.load(path), InputError)
    if table is None:
        assert str(error).startswith("auth.tokens_file:"), str(error)
        return
    assert table.digests, "an empty table loaded"
    for name, digest in table.digests.items():
        assert NAME.fullmatch(name), f"name {name!r} loaded"
        assert isinstance(digest, bytes) and len(digest) == 32
    found = table.name_of(token)
    want = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    owners = [name for name, digest in table.digests.items() if digest == want]
    assert (found is None) == (not owners), f"name_of({token!r}) is {found!r}, lines {owners}"
    assert found is None or found in owners


if __name__ == "__main__":
    main(one_input)
