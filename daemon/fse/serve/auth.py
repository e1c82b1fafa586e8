"""Who is calling: bearer tokens, client certificates, and the caller's name for the audit log.

The tokens file holds `NAME SHA256HEX` lines (the sha256 of each token, never the token
itself; `#` starts a comment). A client sends `authorization: Bearer TOKEN`; the daemon
hashes TOKEN and compares it with every entry in constant time, so neither timing nor
the answer tells a wrong token from a missing one or which entry came close.

Authentication is an interceptor: it wraps the fse.v1.Guard methods (health checks and
reflection stay open, as load balancers and tooling expect), and the servicer reads the
caller's name from the call's context (`caller_of`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fse.core.errors import InputError
from fse.core.files import FileRefused, read_trusted

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")
GUARD_SERVICE = "/fse.v1.Guard/"
# The caller's name, set by the interceptor in the task that then runs the servicer method.
_caller: ContextVar[str] = ContextVar("fse_caller")


@dataclass(frozen=True, slots=True)
class TokenTable:
    """NAME -> sha256 of the token (raw digest bytes)."""

    digests: Mapping[str, bytes]

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """The table in `path`: a regular file that only its owner may write (whoever can
        add a line can let themselves in; fse.core.files), of valid lines, at least one."""
        try:
            text = read_trusted(path).decode("utf-8")
        except FileRefused as exc:
            raise InputError(f"auth.tokens_file: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InputError(
                f"auth.tokens_file: {path}: not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        digests: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"auth.tokens_file: {path}:{number}"
            if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
                raise InputError(
                    f'{where}: expected "NAME SHA256HEX" with NAME of 1 to 64 characters '
                    "A-Z a-z 0-9 _ . @ -"
                )
            name, digest = parts[0], parts[1].lower()
            if not _HEX.fullmatch(digest):
                raise InputError(
                    f"{where}: the second field must be the token's sha256 as 64 hex digits "
                    "(e.g. printf %s TOKEN | sha256sum), never the token itself"
                )
            if name in digests:
                raise InputError(f"{where}: {name!r} appears twice")
            digests[name] = bytes.fromhex(digest)
        if not digests:
            raise InputError(f"auth.tokens_file: {path}: no tokens (every caller would be denied)")
        return cls(digests)

    def name_of(self, token: str) -> str | None:
        """The entry whose hash matches, comparing with every entry in constant time."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, expected in self.digests.items():
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


UnixUid = Callable[[str], "int | None"]  # gRPC peer name -> the uid the relay saw, if any


def _no_uid(peer: str) -> int | None:
    return None


def _peer_identity(context: grpc.aio.ServicerContext[Any, Any], unix_uid: UnixUid) -> str:
    """cert:SUBJECT for an mTLS peer, uid:N for a local socket (from the relay's
    SO_PEERCRED), tcp:ADDRESS otherwise; `unix` if a unix peer's uid is unknown.

    SUBJECT is the certificate's whole subject as an RFC 4514 string ("CN=alice,O=org",
    special characters escaped), never its CN alone: CN=alice from another O is another
    caller. A certificate with an empty subject is named by its fingerprint,
    cert:sha256:HEX (of its DER form)."""
    auth = context.auth_context() or {}
    subject = auth.get("x509_subject")
    if subject and subject[0]:
        return f"cert:{subject[0].decode('utf-8', 'replace')}"
    pem = auth.get("x509_pem_cert")
    if pem and pem[0]:
        return cert_caller("", ssl.PEM_cert_to_DER_cert(pem[0].decode("ascii", "replace")))
    peer = context.peer() or ""
    if not peer.startswith("unix:"):
        return f"tcp:{peer.removeprefix('ipv4:')}"
    uid = unix_uid(peer)
    return "unix" if uid is None else f"uid:{uid}"


def cert_caller(subject: str, der: bytes) -> str:
    """A client certificate's caller name: cert:SUBJECT (RFC 4514), or cert:sha256:HEX
    of the certificate (DER) when its subject is empty."""
    if subject:
        return f"cert:{subject}"
    return f"cert:sha256:{hashlib.sha256(der).hexdigest()}"


def _is_unix(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    return (context.peer() or "").startswith("unix:")


Deny = Callable[[str, str], None]  # (caller, reason): audit an `auth.denied`


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token of every fse.v1.Guard call (on unix sockets only when
    `require_on_unix`); a missing or wrong token gets UNAUTHENTICATED, the same words."""

    def __init__(
        self,
        tokens: TokenTable | None,
        require_on_unix: bool,
        on_deny: Deny,
        unix_uid: UnixUid = _no_uid,
    ) -> None:
        self.tokens = tokens
        self.require_on_unix = require_on_unix
        self.on_deny = on_deny
        self.unix_uid = unix_uid

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARD_SERVICE):
            return handler
        return _wrapped(handler, self._admit)

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Whether the call may go on; if not, its status is set (UNAUTHENTICATED).

        The status is set rather than raised with context.abort(), whose exception
        grpcio keeps, with the handler's frame, in a cycle the garbage collector cannot
        see: a stream of denied calls would leak memory (see GuardServicer._refuse)."""
        peer = _peer_identity(context, self.unix_uid)
        needs_token = self.tokens is not None and (self.require_on_unix or not _is_unix(context))
        if not needs_token:
            _set_caller(context, peer)
            return True
        assert self.tokens is not None
        token = bearer_token(context.invocation_metadata())
        name = None if token is None else self.tokens.name_of(token)
        if name is None:
            self.on_deny(peer, "missing token" if token is None else "wrong token")
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(
                "a valid bearer token is required (metadata authorization: Bearer TOKEN)"
            )
            return False
        _set_caller(context, f"token:{name}")
        return True


def _set_caller(context: grpc.aio.ServicerContext[Any, Any], caller: str) -> None:
    _caller.set(caller)


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's name as the interceptor established it (audit field `client`)."""
    return _caller.get(None) or _peer_identity(context, _no_uid)


def _wrapped(
    handler: grpc.RpcMethodHandler,
    admit: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[bool]],
) -> grpc.RpcMethodHandler:
    if handler.stream_stream is not None:
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> Any:
            if not await admit(context):
                return
            async for reply in inner_ss(requests, context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            if not await admit(context):
                return None
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    return handler
