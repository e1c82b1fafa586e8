"""Fuzz target: the daemon's config file (fse.serve.config.load, what `fse serve
--config` and `fse config check` run).

Invariants: any file is Settings or an InputError with a message (never another
exception: a KeyError, a TypeError from a value of the wrong type, an int() of a bad
octal string); loaded settings hold the resolved values (threads and max_tokens_limit
never 0, max_tokens_limit < ctx_per_stream, a socket_mode of 0..0o7777), and the
effective config `to_toml` prints loads back to the same settings.
"""

from __future__ import annotations

from fse.core.errors import InputError
from fse.serve.config import load, to_toml
from fuzzlib import main, refused, write


def one_input(data: bytes) -> None:
    path = write("fse.toml", data)
    settings, _error = refused(lambda: load(path, {}), InputError)
    if settings is None:
        return
    server = settings.server
    assert server.threads >= 1 and server.max_tokens_limit >= 1
    assert server.max_tokens_limit < server.ctx_per_stream
    assert 0 <= server.socket_mode <= 0o7777
    assert server.listen, "no listen address"
    again = load(write("again.toml", to_toml(settings).encode()), {})
    assert again == settings, f"to_toml does not round-trip:\n{settings}\n{again}"


if __name__ == "__main__":
    main(one_input)
