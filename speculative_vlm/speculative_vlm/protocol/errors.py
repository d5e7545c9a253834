"""The project's one table of errors: each code a verifier refuses or fails with, the gRPC status
that ends the refused stream, and the exception type the robot raises for it.

Every :class:`~speculative_vlm.decoding.verifier.VerifierError` carries its ``code`` and
``reason``; an error crosses a hop as that pair and :func:`exception_for` raises it again, as its
type, on the other side. Four places use this table and no other: the gRPC service (the status
of a refused stream), the gRPC client (an ``Error`` message or a status back to an exception),
the bridge node (an exception to the ``code`` of an ERROR verdict or of the ``OpenSession``
response) and the drafter's ROS adapter (that code back to the exception). So a
``PromptTooLong`` refused by the cloud is a ``PromptTooLong`` in the drafter's loop, over the
ROS hop as in process.

The server ends every refused stream twice over: an in-band ``Error(code, reason)`` message
(protocol v1 clients read it), then the gRPC status of the code's row, with the reason as
the status details and the code in the trailing metadata under :data:`CODE_KEY`, so that
proxies, load balancers and gRPC metrics see a refusal as one (UNAUTHENTICATED,
RESOURCE_EXHAUSTED, ...) rather than as an OK stream. The client maps either back to the
same typed exception through this table.

A code is *retryable* when its exception is a :class:`LinkLost` (``draining``, ``server_shutdown``,
``replica_lost``): the server went away, not the request, so the robot reopens the session (on
the same address or another) and decodes the step again; every other code ends the step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from speculative_vlm.decoding.verifier import (
    Draining,
    EmptyPrompt,
    ImageNotSupported,
    InvalidArgument,
    LinkLost,
    PromptTooLong,
    Refused,
    SessionNotFound,
    StreamingUnavailable,
    VerifierError,
    VerifierTimeout,
)

# Trailing-metadata key that carries the project's error code next to the gRPC status.
CODE_KEY = "svlm-error-code"

S = grpc.StatusCode


@dataclass(frozen=True)
class ErrorKind:
    code: str  # the project's machine-readable code (Error.code on the wire, Verdict.code on ROS)
    status: grpc.StatusCode  # the gRPC status a stream refused with it ends with
    exception: type[VerifierError]  # what the robot raises
    meaning: str

    @property
    def retryable(self) -> bool:
        """Whether the robot reopens the session and decodes again (the server, not the request, failed)."""
        return issubclass(self.exception, LinkLost)


ERRORS: dict[str, ErrorKind] = {kind.code: kind for kind in (
    # Who is asking.
    ErrorKind("unauthenticated", S.UNAUTHENTICATED, Refused, "no bearer token, or an unknown one"),
    ErrorKind("auth_throttled", S.RESOURCE_EXHAUSTED, Refused,
              "too many failed authentications from this address; locked out for a while"),
    # What is asked: fix the request.
    ErrorKind("invalid_argument", S.INVALID_ARGUMENT, InvalidArgument,
              "a field of Open or Draft is out of range"),
    ErrorKind("malformed", S.INVALID_ARGUMENT, Refused, "bytes that are not a ClientMessage"),
    ErrorKind("unsupported_version", S.INVALID_ARGUMENT, Refused,
              "a protocol version this server does not speak"),
    ErrorKind("unsupported_mode", S.INVALID_ARGUMENT, Refused, "a session mode this server does not serve"),
    ErrorKind("empty_prompt", S.INVALID_ARGUMENT, EmptyPrompt, "the prompt is empty"),
    ErrorKind("prompt_too_long", S.INVALID_ARGUMENT, PromptTooLong,
              "the prompt has more tokens than the server's limit or the model's context"),
    ErrorKind("image_too_large", S.INVALID_ARGUMENT, Refused, "the image is over the byte or pixel limit"),
    ErrorKind("bad_image", S.INVALID_ARGUMENT, ImageNotSupported, "the image does not decode as a JPEG"),
    ErrorKind("image_not_supported", S.INVALID_ARGUMENT, ImageNotSupported,
              "an image for a text-only target"),
    ErrorKind("unknown_grammar", S.INVALID_ARGUMENT, Refused, "a grammar name the server does not know"),
    ErrorKind("too_many_tokens", S.INVALID_ARGUMENT, Refused, "max_new_tokens over the server's limit"),
    ErrorKind("draft_too_long", S.INVALID_ARGUMENT, Refused, "more draft tokens in a block than the limit"),
    ErrorKind("bad_token", S.INVALID_ARGUMENT, Refused, "token ids outside the target's vocabulary"),
    ErrorKind("bad_draft", S.INVALID_ARGUMENT, Refused, "draft distributions that do not match the tokens"),
    # The order of things on the stream.
    ErrorKind("already_open", S.FAILED_PRECONDITION, Refused, "a second Open on one stream"),
    ErrorKind("session_done", S.FAILED_PRECONDITION, Refused, "a Draft after the output ended"),
    ErrorKind("no_session", S.NOT_FOUND, SessionNotFound,
              "no such session: a Draft before Open, or for a session that is closed"),
    ErrorKind("session_expired", S.NOT_FOUND, SessionNotFound, "the session was idle too long and was freed"),
    ErrorKind("open_timeout", S.DEADLINE_EXCEEDED, Refused, "no Open within the server's open timeout"),
    # How much is asked: retry later, or ask for less.
    ErrorKind("rate_limited", S.RESOURCE_EXHAUSTED, Refused, "over the client's request rate"),
    ErrorKind("too_many_sessions", S.RESOURCE_EXHAUSTED, Refused, "the client holds its share of sessions"),
    ErrorKind("server_full", S.RESOURCE_EXHAUSTED, Refused, "the server holds its limit of sessions"),
    ErrorKind("kv_budget_exceeded", S.RESOURCE_EXHAUSTED, Refused,
              "the session's KV cache would not fit in the server's memory budget"),
    ErrorKind("resource_exhausted", S.RESOURCE_EXHAUSTED, Refused,
              "gRPC's own limits (message size, concurrent streams), refused before the service saw it"),
    # The server's side.
    ErrorKind("draining", S.UNAVAILABLE, Draining,
              "the server is draining for a restart or rollout (SIGTERM): it answered the blocks in flight, "
              "refuses new sessions and ends the rest; reopen the session, here once it is back or elsewhere"),
    ErrorKind("server_shutdown", S.UNAVAILABLE, LinkLost, "the server is stopping; reconnect"),
    ErrorKind("replica_lost", S.UNAVAILABLE, LinkLost,
              "the verifier replica holding the session died (Ray Serve); reopen it, another replica takes it"),
    ErrorKind("open_failed", S.INTERNAL, Refused, "the target failed to prefill the prompt"),
    ErrorKind("verify_failed", S.INTERNAL, Refused, "the target failed to verify a block"),
    ErrorKind("generate_failed", S.INTERNAL, Refused, "the target failed while generating alone"),
    ErrorKind("streaming_unavailable", S.FAILED_PRECONDITION, StreamingUnavailable,
              "cloud autoregressive asked of a verifier that cannot stream the target's tokens"),
    ErrorKind("protocol_error", S.INTERNAL, Refused, "the verifier answered with a message out of turn"),
    # The robot's side of the link (the client and the bridge say these; no server sends them).
    ErrorKind("link_lost", S.UNAVAILABLE, LinkLost, "the link to the verifier is gone; reopen once it is back"),
    ErrorKind("timeout", S.DEADLINE_EXCEEDED, VerifierTimeout, "no verdict within the deadline"),
    ErrorKind("verifier_error", S.INTERNAL, VerifierError, "an error of the verifier with no code of its own"),
)}

# A refusal with a code not in the table is about the request it answers.
_UNLISTED = ErrorKind("", S.INVALID_ARGUMENT, Refused, "")


def kind_of(code: str) -> ErrorKind:
    return ERRORS.get(code, _UNLISTED)


def status_for(code: str) -> grpc.StatusCode:
    """The gRPC status a stream refused with ``code`` ends with."""
    return kind_of(code).status


def exception_for(code: str, reason: str) -> VerifierError:
    """The typed exception for an error ``code`` and its ``reason``; its ``code`` and ``reason`` are these."""
    cls = kind_of(code).exception
    if issubclass(cls, Refused):
        return cls(code, reason)
    return cls(f"{code}: {reason}", code=code, reason=reason)


def trailing_metadata(code: str) -> tuple[tuple[str, str], ...]:
    return ((CODE_KEY, code),)


def code_in(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The project's error code in a call's trailing metadata, if the server put one there."""
    for key, value in metadata or ():
        if key == CODE_KEY:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return None


def exception_for_status(status: grpc.StatusCode, details: str, code: str | None) -> VerifierError | None:
    """The typed exception for a stream that ended with a non-OK ``status``.

    ``code`` is the project's code from the trailing metadata (:func:`code_in`); without one,
    the status came from gRPC itself (message too large, every RPC slot taken, wrong
    credentials at a proxy), and the status decides. Returns None for statuses that mean
    the link itself failed (UNAVAILABLE, CANCELLED, ...): the caller reports those as a
    lost link.
    """
    if code:
        return exception_for(code, details)
    if status == S.RESOURCE_EXHAUSTED:
        return exception_for("resource_exhausted", details)
    if status in (S.UNAUTHENTICATED, S.PERMISSION_DENIED):
        return exception_for("unauthenticated", details)
    return None
