"""Self-signed TLS material for a verifier server, made with the ``openssl`` command.

For a lab or a test: the robot pins the certificate (passes it as ``root_cert``), so no
certificate authority is involved. Production servers use a certificate from their CA.
Also the ``speculative-vlm cloud-certs`` subcommand.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class OpensslMissing(RuntimeError):
    """The openssl command is not installed; install it (apt-get install openssl) or bring a certificate."""


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def make_self_signed(out_dir: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     days: int = 365) -> CertPair:
    """Write ``server.crt`` and ``server.key`` (EC P-256) valid for ``hosts`` into ``out_dir``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise OpensslMissing("openssl is not on PATH; install it or pass an existing cert/key pair")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = CertPair(out / "server.crt", out / "server.key")
    names = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            names.append(f"IP:{host}")
        except ValueError:
            names.append(f"DNS:{host}")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert), "-days", str(days),
                    "-subj", f"/CN={hosts[0]}", "-addext", "subjectAltName=" + ",".join(names)],
                   check=True, capture_output=True)
    pair.key.chmod(0o600)
    return pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder for server.crt and server.key")
    parser.add_argument("--host", action="append", default=None, help="DNS name or IP (repeatable)")
    parser.add_argument("--days", type=int, default=365)


def run(args: argparse.Namespace) -> int:
    pair = make_self_signed(args.out_dir, tuple(args.host or ("localhost", "127.0.0.1")), args.days)
    print(f"certificate {pair.cert}\nkey         {pair.key}")
    return 0
