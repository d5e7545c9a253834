"""The loopback link emulator delays, paces and cuts TCP traffic as configured."""

import socket
import threading
import time

import pytest
from speculative_vlm.benchmark.netem import DelayProxy, LinkProfile


@pytest.fixture
def echo_server():
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def echo(c=conn):
                with c:
                    while data := c.recv(65536):
                        c.sendall(data)
            threading.Thread(target=echo, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()
    srv.close()


def _round_trip(port: int, payload: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(65536)
        assert got == payload
        return time.monotonic() - start


def test_round_trip_takes_twice_the_one_way_delay(echo_server):
    with DelayProxy(echo_server, LinkProfile(delay_s=0.05)) as proxy:
        rtt = _round_trip(proxy.port, b"ping")
    assert 0.095 <= rtt < 1.0


def test_bandwidth_limit_paces_a_large_transfer(echo_server):
    # 100 kB each way at 8 Mbit/s is 0.1 s per direction, pipelined: at least 0.1 s in all.
    with DelayProxy(echo_server, LinkProfile(bandwidth_bps=8e6)) as proxy:
        elapsed = _round_trip(proxy.port, b"x" * 100_000)
    assert 0.1 <= elapsed < 1.0


def test_a_downlink_limit_paces_only_what_the_server_sends():
    # The server takes 100 kB, notes when it had it all, and answers with 100 kB: at 1.6 Mbit/s
    # down the answer takes 0.5 s, while the request goes up unlimited.
    srv = socket.create_server(("127.0.0.1", 0))
    received_at: list[float] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            got = 0
            while got < 100_000:
                got += len(conn.recv(65536))
            received_at.append(time.monotonic())
            conn.sendall(b"y" * 100_000)

    threading.Thread(target=serve, daemon=True).start()
    try:
        with DelayProxy(srv.getsockname(), LinkProfile(downlink_bps=1.6e6)) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as s:
                start = time.monotonic()
                s.sendall(b"x" * 100_000)
                got = 0
                while got < 100_000:
                    got += len(s.recv(65536))
                done = time.monotonic()
    finally:
        srv.close()
    assert received_at[0] - start < 0.25
    assert 0.5 <= done - received_at[0] < 2.0


def test_jitter_never_reorders_bytes(echo_server):
    with DelayProxy(echo_server, LinkProfile(delay_s=0.005, jitter_s=0.005), seed=1) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            sent = b"".join(i.to_bytes(2, "big") for i in range(2000))
            for i in range(0, len(sent), 40):
                s.sendall(sent[i:i + 40])
            got = b""
            while len(got) < len(sent):
                got += s.recv(65536)
    assert got == sent


def test_drop_connections_resets_open_streams_and_new_ones_still_work(echo_server):
    with DelayProxy(echo_server) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(b"a")
        assert s.recv(1) == b"a"
        assert proxy.drop_connections() == 1
        s.settimeout(2.0)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            s.sendall(b"b")
            if s.recv(1) == b"":
                raise ConnectionResetError("closed")
        s.close()
        assert _round_trip(proxy.port, b"again") < 1.0
