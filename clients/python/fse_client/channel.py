"""Addresses, credentials and metadata shared by the sync and the asyncio client."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

Metadata = Sequence[tuple[str, str]]

ADDRESS_FORMS = "unix:PATH or HOST:PORT"


def check_address(addr: str) -> str:
    """`unix:PATH` or `HOST:PORT` as gRPC spells them; ValueError naming the forms."""
    if addr.startswith("unix:"):
        if addr.removeprefix("unix:").removeprefix("//"):
            return addr
    else:
        host, sep, port = addr.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) <= 65535:
            return addr
    raise ValueError(f"address {addr!r} is invalid; accepted: {ADDRESS_FORMS}")


def read_pem(pem: bytes | str | Path | None) -> bytes | None:
    """PEM bytes, or a path to a PEM file."""
    if pem is None or isinstance(pem, bytes):
        return pem
    return Path(pem).read_bytes()


def open_channel(
    addr: str,
    tls_ca: bytes | str | Path | None,
    options: Sequence[tuple[str, Any]],
    aio: bool,
    tls_cert: bytes | str | Path | None = None,
    tls_key: bytes | str | Path | None = None,
) -> Any:
    """A channel to the daemon, sync or asyncio: TLS when a CA is given (without one, a
    client certificate still makes it TLS, the server checked against gRPC's default
    roots), presenting the client certificate `tls_cert` with its key `tls_key` (both or
    neither; ValueError otherwise) for mutual TLS."""
    if tls_cert is not None and tls_key is None:
        raise ValueError("tls_key: required with tls_cert (the client certificate's key)")
    if tls_key is not None and tls_cert is None:
        raise ValueError("tls_cert: required with tls_key (the client certificate)")
    api = grpc.aio if aio else grpc
    target, ca = check_address(addr), read_pem(tls_ca)
    cert, key = read_pem(tls_cert), read_pem(tls_key)
    if ca is None and cert is None:
        return api.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return api.secure_channel(target, creds, options=options)


def call_metadata(token: str | None) -> Metadata:
    return [("authorization", f"Bearer {token}")] if token else []
