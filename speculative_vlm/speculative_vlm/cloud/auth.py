"""Bearer-token authentication: tokens come from a file or an environment variable, never code.

Each token names a client; the name is what per-client limits (sessions, request rate)
count against and what the logs show. Tokens are compared in constant time, and failed
attempts are throttled per peer address (:class:`AuthThrottle`).

Tokens rotate without a restart: the tokens file is read again when it changes (its
modification time, size or inode, checked as each stream authenticates) and on SIGHUP
(``speculative-vlm-cloud``). A new token works from the next stream on, a removed one is
refused from the next stream on; sessions already open keep running until they close. A
file that cannot be read, holds a bad token or no token at all is not taken: the tokens in
force stay, and the error is logged (write the new file beside the old and rename it over,
so a half-written file is never read).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("speculative_vlm.cloud.auth")

class AuthConfigError(ValueError):
    """No usable tokens were configured although authentication is required."""


class Unauthenticated(Exception):
    """A request carried no token or an unknown one."""


def _parse(entries: Iterable[str], sep: str | None) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for raw in entries:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(sep, 1) if sep else line.split(None, 1)
        if len(parts) == 2:
            name, token = parts[0].strip(), parts[1].strip()
        else:
            token = parts[0].strip()
            # An anonymous token still needs a stable name for limits and logs.
            name = "client-" + hashlib.sha256(token.encode()).hexdigest()[:8]
        if len(token) < 16:
            raise AuthConfigError(f"token for {name!r} is shorter than 16 characters; use a random one "
                                  "(e.g. `openssl rand -hex 24`)")
        tokens[token] = name
    return tokens


def load_tokens(tokens_file: str | None, tokens_env: str) -> dict[str, str]:
    """{token: client name} from the file (lines "name token") and the env var ("name:token,...")."""
    tokens: dict[str, str] = {}
    if tokens_file:
        try:
            tokens.update(_parse(Path(tokens_file).read_text().splitlines(), None))
        except OSError as exc:
            raise AuthConfigError(f"cannot read tokens file {tokens_file}: {exc}") from exc
    env = os.environ.get(tokens_env, "")
    if env:
        tokens.update(_parse(env.split(","), ":"))
    return tokens


def _file_state(path: str | None) -> tuple[int, ...] | None:
    """What tells a changed file: modification time, size, inode (a file renamed over the old one)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class TokenAuthenticator:
    """Bearer tokens to client names; with ``tokens_file``, the file is re-read when it changes
    and on :meth:`reload` (the server's SIGHUP)."""

    def __init__(self, tokens: dict[str, str], tokens_file: str | None = None,
                 tokens_env: str = "SPECULATIVE_VLM_TOKENS"):
        self._tokens = [(t.encode(), name) for t, name in tokens.items()]
        self._file, self._env = tokens_file, tokens_env
        self._file_state = _file_state(tokens_file)
        self._reload_lock = threading.Lock()
        self.reloads = 0  # tables taken since start

    @property
    def clients(self) -> list[str]:
        return sorted({name for _, name in self._tokens})

    def reload(self) -> bool:
        """Read the tokens again (file and environment); False, keeping the tokens in force, if unusable."""
        with self._reload_lock:
            state = _file_state(self._file)  # before reading: a change during the read is seen next time
            try:
                tokens = load_tokens(self._file, self._env)
                if not tokens:
                    raise AuthConfigError(f"no tokens in {self._file} nor in {self._env}")
            except AuthConfigError as exc:
                self._file_state = state  # not read again until it changes again
                log.error(f"tokens not reloaded, the previous ones stay in force: {exc}",
                          extra={"event": "tokens_reload_failed", "tokens_file": self._file})
                return False
            self._tokens = [(t.encode(), name) for t, name in tokens.items()]
            self._file_state = state
            self.reloads += 1
        log.info("tokens reloaded", extra={"event": "tokens_reloaded", "tokens_file": self._file,
                                           "clients": len(self.clients)})
        return True

    def _reload_if_changed(self) -> None:
        if self._file and _file_state(self._file) != self._file_state:
            self.reload()  # two streams may both reload: the same table twice, harmless

    def client_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The client name for the request's ``authorization: Bearer <token>``; raises Unauthenticated."""
        self._reload_if_changed()
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("no authorization metadata; send 'authorization: Bearer <token>'")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        given = presented.strip().encode()
        name = None
        for token, client in self._tokens:  # no early exit: timing says nothing about which token
            if hmac.compare_digest(token, given):
                name = client
        if name is None:
            raise Unauthenticated("unknown token; ask the operator for one")
        return name


class AuthThrottled(Exception):
    """The peer address failed authentication too often; it is locked out for a while."""


@dataclass
class _Peer:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    lockouts: int = 0
    last: float = 0.0


class AuthThrottle:
    """Failed authentications per peer address, with lockouts that double.

    After ``max_failures`` failures within ``window_s`` the address is locked out for
    ``lockout_s``; each further lockout doubles it, up to ``max_lockout_s``. While locked
    out, every stream from the address is refused before its token is looked at, so
    the answer says nothing about whether a guess was right (and costs no comparison).
    The price: a robot behind the same address as an attacker is locked out with it, as
    with any per-address lockout. A successful authentication does not reset the count.
    At most ``max_peers`` addresses are remembered (the least recently failing are
    forgotten first), so a flood from many addresses cannot grow the table without bound.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, lockout_s: float = 10.0,
                 max_lockout_s: float = 600.0, max_peers: int = 10000,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_lockout_s = max_lockout_s
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, peer: str) -> None:
        """Raise AuthThrottled while ``peer`` is locked out."""
        now = self._clock()
        with self._lock:
            state = self._peers.get(peer)
            if state is not None and now < state.locked_until:
                raise AuthThrottled(
                    f"{self.max_failures} failed authentications from {peer} within {self.window_s:g} s; "
                    f"locked out for another {state.locked_until - now:.1f} s (lockout {state.lockouts}, "
                    "each twice as long as the last); check the robot's token before retrying")

    def failed(self, peer: str) -> None:
        """Count one failed authentication from ``peer`` (and lock it out on the last one allowed)."""
        now = self._clock()
        with self._lock:
            state = self._peers.pop(peer, None) or _Peer()
            self._peers[peer] = state  # most recent last
            # Lockouts are forgotten once the address has been quiet for the longest lockout.
            if state.lockouts and now - state.last > self.max_lockout_s:
                state.lockouts = 0
            state.last = now
            while state.failures and now - state.failures[0] > self.window_s:
                state.failures.popleft()
            state.failures.append(now)
            if len(state.failures) >= self.max_failures:
                state.failures.clear()
                state.lockouts += 1
                state.locked_until = now + min(self.max_lockout_s, self.lockout_s * 2 ** (state.lockouts - 1))
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)

    def locked_out(self, peer: str) -> bool:
        with self._lock:
            state = self._peers.get(peer)
            return state is not None and self._clock() < state.locked_until
