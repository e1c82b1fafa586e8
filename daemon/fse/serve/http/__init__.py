"""The OpenAI-compatible HTTP API (`fse serve --http-listen HOST:PORT`): a second door
onto the daemon's GuardService, beside gRPC (docs/http.md).

- `app`: the routes, server-sent events, errors, start and stop (`HttpDoor`);
- `openai_wire`: OpenAI's JSON <-> the domain's Request, events and verdicts;
- `auth`: bearer tokens and caller names, as fse.serve.auth names them for gRPC.
"""

from fse.serve.http.app import HttpDoor

__all__ = ["HttpDoor"]
