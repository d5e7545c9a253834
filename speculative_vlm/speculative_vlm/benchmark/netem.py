"""A loopback TCP proxy that emulates a network link: delay, jitter and a bandwidth limit.

The kernel's netem needs privileges these machines do not give, so tests and benchmarks
put this proxy between the robot-side client and the server. Each direction is shaped
separately, like a real link: a chunk leaves ``delay +/- jitter`` after it arrived (never
before an earlier chunk: TCP does not reorder) and occupies the link for
``len / bandwidth``. ``drop_connections()`` resets every open connection, as a cut link
does. Also a ``speculative-vlm netem`` subcommand for manual runs.
"""

from __future__ import annotations

import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class LinkProfile:
    delay_s: float = 0.0  # one-way
    jitter_s: float = 0.0  # standard deviation of a normal jitter, clipped at 0 total delay
    bandwidth_bps: float | None = None  # bits per second; None = unlimited
    # Server -> client only, when set (an asymmetric link); e.g. a narrow downlink paces a stream's
    # messages while the requests still go out at bandwidth_bps.
    downlink_bps: float | None = None


class _Direction:
    """Moves bytes from ``src`` to ``dst`` through the link model."""

    def __init__(self, proxy: DelayProxy, src: socket.socket, dst: socket.socket, downlink: bool):
        self.proxy, self.src, self.dst, self.downlink = proxy, src, dst, downlink
        self.chunks: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
        self.last_due = 0.0
        self.link_free = 0.0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(65536)
                now = time.monotonic()
                p = self.proxy.profile
                delay = max(0.0, p.delay_s + (self.proxy.rng.gauss(0.0, p.jitter_s) if p.jitter_s > 0 else 0.0))
                self.last_due = max(self.last_due, now + delay)
                self.chunks.put((self.last_due, data or None))
                if not data:
                    return
        except OSError:
            self.chunks.put((0.0, None))

    def _write(self) -> None:
        try:
            while True:
                due, data = self.chunks.get()
                if data is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                p = self.proxy.profile
                bw = p.downlink_bps if self.downlink and p.downlink_bps else p.bandwidth_bps
                start = max(due, self.link_free)
                self.link_free = start + (len(data) * 8 / bw if bw else 0.0)
                wait = self.link_free - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            pass


class DelayProxy:
    """``DelayProxy(("127.0.0.1", server_port), LinkProfile(...)).start()``; clients use ``.port``."""

    def __init__(self, target: tuple[str, int], profile: LinkProfile | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0), seed: int = 0):
        self.target = target
        self.profile = profile or LinkProfile()
        self.rng = random.Random(seed)
        self._listen = listen
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.connections_accepted = 0

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() the proxy first"
        return self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self._listen[0]}:{self.port}"

    def start(self) -> DelayProxy:
        self._sock = socket.create_server(self._listen, reuse_port=False)
        threading.Thread(target=self._accept, daemon=True, name="netem-accept").start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees a closed connection
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
                self.connections_accepted += 1
            _Direction(self, client, upstream, downlink=False)
            _Direction(self, upstream, client, downlink=True)

    def drop_connections(self) -> int:
        """Reset every open connection (RST, like a cut link); new connections still work."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                # Linger 0 makes close() send RST instead of an orderly FIN.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns) // 2

    def stop(self) -> None:
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
        self.drop_connections()

    def __enter__(self) -> DelayProxy:
        return self.start() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
