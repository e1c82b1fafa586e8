"""Throwaway certificates for TLS tests, made with openssl: a CA, a server certificate for
127.0.0.1 and localhost, and client certificates for mTLS."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def make_ca(folder: Path, name: str) -> Pair:
    ca = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl("req", "-x509", *_EC, "-keyout", ca.key, "-out", ca.cert, "-subj", f"/CN={name}",
             "-days", "2")  # fmt: skip
    return ca


def issue(
    ca: Pair, folder: Path, name: str, san: str | None = None, org: str | None = None
) -> Pair:
    """A certificate for CN=name (and O=org, if given) signed by ca (with subjectAltName
    san, for servers). Its files are named after the org and the name."""
    stem = f"{org}-{name}" if org else name
    pair, csr = Pair(folder / f"{stem}.pem", folder / f"{stem}.key"), folder / f"{stem}.csr"
    subject = f"/O={org}/CN={name}" if org else f"/CN={name}"
    _openssl("req", *_EC, "-keyout", pair.key, "-out", csr, "-subj", subject)
    ext = folder / f"{stem}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
             "-out", pair.cert, "-days", "2", "-extfile", ext)  # fmt: skip
    return pair


def server_pair(ca: Pair, folder: Path) -> Pair:
    return issue(ca, folder, "localhost", "IP:127.0.0.1,DNS:localhost")
