"""Who is calling over HTTP: the bearer token (the same TokenTable and the same names as
gRPC's fse.serve.auth), else the client certificate, else the TCP peer.

Caller names are those of gRPC: `token:NAME`, `cert:SUBJECT` (the whole subject as
RFC 4514 writes it, as OpenSSL's XN_FLAG_RFC2253 prints it for gRPC: the last RDN
first, short attribute names, special characters and non-ASCII bytes escaped), or
`tcp:ADDRESS:PORT`.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from fse.serve.auth import TokenTable, cert_caller

# X.509 attribute names as Python's ssl gives them -> the short names OpenSSL prints.
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "street",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
}
_SPECIAL = set(',+"\\<>;')


def _escape(value: str) -> str:
    """A value as RFC 2253 escapes it (OpenSSL's ASN1_STRFLGS_RFC2253): specials with a
    backslash, control and non-ASCII bytes as \\XX (of UTF-8), a leading # or space and
    a trailing space with a backslash."""
    out = []
    data = value.encode("utf-8", "surrogatepass")
    for i, byte in enumerate(data):
        ch = chr(byte)
        if byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:02X}")
        elif ch in _SPECIAL or (i == 0 and ch in "# ") or (i == len(data) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def subject_rfc4514(subject: Any) -> str:
    """The subject of ssl's getpeercert() (RDNs in certificate order) as RFC 4514: the
    last RDN first, attributes of one RDN joined by +."""
    rdns = []
    for rdn in reversed(subject or ()):
        rdns.append("+".join(f"{_SHORT.get(name, name)}={_escape(value)}" for name, value in rdn))
    return ",".join(rdns)


def peer_caller(request: web.BaseRequest) -> str:
    """cert:SUBJECT for a client certificate (mutual TLS), else tcp:ADDRESS:PORT."""
    transport = request.transport
    if transport is None:
        return "tcp:unknown"
    tls = transport.get_extra_info("ssl_object")
    if isinstance(tls, ssl.SSLObject):
        der = tls.getpeercert(binary_form=True)
        if der:
            return cert_caller(subject_rfc4514((tls.getpeercert() or {}).get("subject")), der)
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"tcp:[{host}]:{port}" if ":" in str(host) else f"tcp:{host}:{port}"
    return "tcp:unknown"


def bearer(request: web.BaseRequest) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, if any."""
    value = request.headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def token_caller(tokens: TokenTable, request: web.BaseRequest) -> tuple[str | None, str]:
    """(token:NAME, "") for a valid token, else (None, why): missing or wrong token."""
    token = bearer(request)
    name = None if token is None else tokens.name_of(token)
    if name is None:
        return None, "missing token" if token is None else "wrong token"
    return f"token:{name}", ""
