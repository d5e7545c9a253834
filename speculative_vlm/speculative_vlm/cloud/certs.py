"""TLS material for a verifier server and its robots, made with the ``openssl`` command.

For a lab or a small fleet: ``speculative-vlm cloud-certs DIR`` makes a private certificate
authority (``ca.crt``, ``ca.key``, reused when already there) and the server's pair signed by it
(``server.crt``, ``server.key``); robots trust ``ca.crt`` (the bridge's ``tls_ca``).
``speculative-vlm cloud-certs DIR --client robot1`` mints a client pair (``robot1.crt``,
``robot1.key``) from the same authority for mutual TLS: the server, started with
``--tls-client-ca DIR/ca.crt``, then accepts only clients holding a certificate it signed.
Production servers may use certificates from their own CA instead. :func:`make_self_signed`
makes a lone self-signed server pair, which a robot pins as its root.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class OpensslMissing(RuntimeError):
    """The openssl command is not installed; install it (apt-get install openssl) or bring a certificate."""


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise OpensslMissing("openssl is not on PATH; install it or pass an existing cert/key pair")
    return openssl


def _alt_names(hosts: tuple[str, ...]) -> str:
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            names.append(f"IP:{host}")
        except ValueError:
            names.append(f"DNS:{host}")
    return "subjectAltName=" + ",".join(names)


def _run(args: list[str], key: Path) -> None:
    subprocess.run(args, check=True, capture_output=True)
    key.chmod(0o600)


def make_self_signed(out_dir: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     days: int = 365) -> CertPair:
    """Write ``server.crt`` and ``server.key`` (EC P-256) valid for ``hosts`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out / "server.crt", out / "server.key")
    _run([_openssl(), "req", "-x509", *EC_KEY, "-keyout", str(pair.key), "-out", str(pair.cert), "-days",
          str(days), "-subj", f"/CN={hosts[0]}", "-addext", _alt_names(hosts)], pair.key)
    return pair


def make_ca(out_dir: str | Path, days: int = 3650, name: str = "speculative-vlm verifier CA") -> CertPair:
    """``ca.crt``/``ca.key`` in ``out_dir``: an existing pair is kept (the certificates it signed stay valid)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out / "ca.crt", out / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    _run([_openssl(), "req", "-x509", *EC_KEY, "-keyout", str(pair.key), "-out", str(pair.cert), "-days",
          str(days), "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"], pair.key)
    return pair


def _signed(ca: CertPair, pair: CertPair, common_name: str, usage: str, extra: list[str], days: int) -> CertPair:
    _run([_openssl(), "req", "-x509", "-CA", str(ca.cert), "-CAkey", str(ca.key), *EC_KEY,
          "-keyout", str(pair.key), "-out", str(pair.cert), "-days", str(days), "-subj", f"/CN={common_name}",
          "-addext", "basicConstraints=critical,CA:FALSE", "-addext", f"extendedKeyUsage={usage}", *extra],
         pair.key)
    return pair


def make_server_cert(ca: CertPair, out_dir: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     days: int = 365) -> CertPair:
    """``server.crt``/``server.key`` signed by ``ca``, valid for ``hosts``."""
    out = Path(out_dir)
    return _signed(ca, CertPair(out / "server.crt", out / "server.key"), hosts[0], "serverAuth",
                   ["-addext", _alt_names(hosts)], days)


def make_client_cert(ca: CertPair, out_dir: str | Path, name: str, days: int = 365) -> CertPair:
    """``<name>.crt``/``<name>.key``: a client certificate (CN = ``name``) signed by ``ca``, for mutual TLS."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_' and '-' (it names the files)")
    out = Path(out_dir)
    return _signed(ca, CertPair(out / f"{name}.crt", out / f"{name}.key"), name, "clientAuth", [], days)
