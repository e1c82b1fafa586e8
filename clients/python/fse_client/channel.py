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


def read_ca(tls_ca: bytes | str | Path | None) -> bytes | None:
    """PEM bytes, or a path to a PEM file."""
    if tls_ca is None or isinstance(tls_ca, bytes):
        return tls_ca
    return Path(tls_ca).read_bytes()


def open_channel(
    addr: str, tls_ca: bytes | str | Path | None, options: Sequence[tuple[str, Any]], aio: bool
) -> Any:
    """A channel to the daemon (TLS when a CA is given), sync or asyncio."""
    api = grpc.aio if aio else grpc
    target, ca = check_address(addr), read_ca(tls_ca)
    if ca is None:
        return api.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return api.secure_channel(target, creds, options=options)


def call_metadata(token: str | None) -> Metadata:
    return [("authorization", f"Bearer {token}")] if token else []
