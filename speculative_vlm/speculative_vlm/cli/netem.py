"""`speculative-vlm netem`: a loopback proxy adding delay, jitter and a bandwidth limit in front of a
server, for manual runs (``benchmark/netem.py``'s ``DelayProxy``); Ctrl-C stops it."""

from __future__ import annotations

import argparse
import time

from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:50052", help="host:port to accept on")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="one-way jitter (std dev)")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="0 = unlimited")


def run(args: argparse.Namespace) -> int:
    host, port = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    profile = LinkProfile(args.delay_ms / 1000, args.jitter_ms / 1000,
                          args.bandwidth_mbps * 1e6 if args.bandwidth_mbps > 0 else None)
    proxy = DelayProxy((thost, int(tport)), profile, listen=(host, int(port))).start()
    print(f"netem proxy {proxy.address} -> {args.target}: {profile}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
    return 0
