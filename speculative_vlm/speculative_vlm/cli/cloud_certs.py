"""`speculative-vlm cloud-certs DIR`: a CA and the verifier's TLS pair signed by it; ``--client NAME``
mints a client pair from that CA for mutual TLS (``cloud/certs.py`` makes them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from speculative_vlm.cloud.certs import CertPair, make_ca, make_client_cert, make_server_cert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder for ca.crt/ca.key and server.crt/server.key (or a client pair)")
    parser.add_argument("--host", action="append", default=None, help="server DNS name or IP (repeatable)")
    parser.add_argument("--client", help="mint <CLIENT>.crt/.key from out_dir's CA instead (mutual TLS)")
    parser.add_argument("--days", type=int, default=365)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if args.client:
        ca = CertPair(out / "ca.crt", out / "ca.key")
        if not (ca.cert.exists() and ca.key.exists()):
            print(f"speculative-vlm cloud-certs: no ca.crt/ca.key in {out}; run `speculative-vlm cloud-certs {out}` "
                  "first, then mint client pairs from that CA")
            return 2
        pair = make_client_cert(ca, out, args.client, args.days)
        print(f"client certificate {pair.cert}\nclient key         {pair.key}\n"
              f"(the bridge's tls_cert/tls_key; the server needs --tls-client-ca {ca.cert})")
        return 0
    ca = make_ca(out)
    pair = make_server_cert(ca, out, tuple(args.host or ("localhost", "127.0.0.1")), args.days)
    print(f"CA certificate {ca.cert}  (robots: tls_ca; mutual TLS: --tls-client-ca)\nCA key         {ca.key}\n"
          f"certificate    {pair.cert}\nkey            {pair.key}")
    return 0
