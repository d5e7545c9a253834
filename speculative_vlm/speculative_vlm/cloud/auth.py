"""Bearer-token authentication: tokens come from a file or an environment variable, never code.

Each token names a client; the name is what per-client limits (sessions, request rate)
count against and what the logs show. Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path


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


class TokenAuthenticator:
    def __init__(self, tokens: dict[str, str]):
        self._tokens = [(t.encode(), name) for t, name in tokens.items()]

    def client_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The client name for the request's ``authorization: Bearer <token>``; raises Unauthenticated."""
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
