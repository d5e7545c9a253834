"""Conversion between the wire messages (``verifier_pb2``) and the engine's dataclasses.

The gRPC boundary's one conversion, each way: the client turns its requests and blocks into
messages here and the server's messages back into the engine's types (``Verdict``, ``Opened``,
``StreamedToken``, the typed error through ``protocol.errors``); the service does the reverse.
Nothing past either end sees a protobuf message, and since both ends go through these
functions they cannot disagree on what a field means (for example ``token = -1`` meaning "no
token").
"""

from __future__ import annotations

from speculative_vlm.decoding.sessions import Event, Opened, StreamedToken
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    SessionRequest,
    Verdict,
    VerdictKind,
    VerifierError,
)
from speculative_vlm.protocol import verifier_pb2 as pb

PROTOCOL_VERSION = 1


def settings_to_pb(settings: GenerationSettings) -> pb.GenerationSettings:
    return pb.GenerationSettings(
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        grammar=settings.grammar,
        seed=settings.seed,
    )


def settings_from_pb(msg: pb.GenerationSettings) -> GenerationSettings:
    return GenerationSettings(
        temperature=float(msg.temperature),
        top_k=int(msg.top_k),
        # proto3 has no "unset": 0 would mean "keep nothing", which no caller means. Any other
        # value (negative, nan) is passed on as sent, for admission to refuse.
        top_p=float(msg.top_p) if msg.top_p != 0 else 1.0,
        max_new_tokens=int(msg.max_new_tokens) if msg.max_new_tokens != 0 else GenerationSettings.max_new_tokens,
        grammar=msg.grammar,
        seed=int(msg.seed),
    )


def open_to_pb(request: SessionRequest, autoregressive: bool = False) -> pb.ClientMessage:
    return pb.ClientMessage(open=pb.Open(
        protocol_version=PROTOCOL_VERSION,
        image_jpeg=request.image or b"",
        system=request.system,
        prompt=request.prompt,
        settings=settings_to_pb(request.settings),
        mode=pb.AUTOREGRESSIVE if autoregressive else pb.SPECULATIVE,
    ))


def open_from_pb(msg: pb.Open) -> SessionRequest:
    return SessionRequest(
        prompt=msg.prompt,
        system=msg.system,
        image=bytes(msg.image_jpeg) or None,
        settings=settings_from_pb(msg.settings),
    )


def draft_to_pb(block: DraftBlock) -> pb.ClientMessage:
    q = []
    for dist in block.q or ():
        ids = list(dist.keys())
        q.append(pb.SparseDistribution(token_ids=ids, probs=[dist[i] for i in ids]))
    return pb.ClientMessage(draft=pb.Draft(
        round=block.round,
        base_length=block.base_length,
        base_tail=list(block.base_tail),
        tokens=list(block.tokens),
        preemptive=block.preemptive,
        q=q,
    ))


def draft_from_pb(msg: pb.Draft) -> DraftBlock:
    """The engine's block; raises ValueError naming the field when a distribution is ragged."""
    for i, d in enumerate(msg.q):
        if len(d.token_ids) != len(d.probs):
            raise ValueError(f"draft.q[{i}] has {len(d.token_ids)} token_ids and {len(d.probs)} probs; "
                             "send one probability per token id")
    q = tuple(dict(zip((int(i) for i in d.token_ids), (float(p) for p in d.probs), strict=True))
              for d in msg.q) or None
    return DraftBlock(
        round=int(msg.round),
        base_length=int(msg.base_length),
        base_tail=tuple(int(t) for t in msg.base_tail),
        tokens=tuple(int(t) for t in msg.tokens),
        preemptive=bool(msg.preemptive),
        q=q,
    )


def verdict_to_pb(verdict: Verdict) -> pb.ServerMessage:
    if verdict.kind is VerdictKind.EARLY:
        return pb.ServerMessage(early=pb.Early(
            round=verdict.round, accepted=verdict.accepted, token=verdict.token,
            confidence=verdict.confidence, layer=verdict.exit_layer))
    if verdict.kind is VerdictKind.FINAL:
        return pb.ServerMessage(final=pb.Final(
            round=verdict.round, accepted=verdict.accepted, token=verdict.token,
            eos=verdict.eos, verify_time_s=verdict.verify_time_s))
    return pb.ServerMessage(dropped=pb.Dropped(round=verdict.round))


def verdict_from_pb(msg: pb.ServerMessage) -> Verdict | None:
    """The verdict a server message carries, or None for the kinds that are not verdicts."""
    kind = msg.WhichOneof("kind")
    if kind == "early":
        e = msg.early
        return Verdict(round=e.round, kind=VerdictKind.EARLY, accepted=e.accepted, token=e.token,
                       confidence=e.confidence, exit_layer=e.layer)
    if kind == "final":
        f = msg.final
        return Verdict(round=f.round, kind=VerdictKind.FINAL, accepted=f.accepted, token=f.token,
                       eos=f.eos, verify_time_s=f.verify_time_s)
    if kind == "dropped":
        return Verdict(round=msg.dropped.round, kind=VerdictKind.DROPPED)
    return None


def opened_to_pb(opened: Opened) -> pb.ServerMessage:
    return pb.ServerMessage(opened=pb.Opened(
        session_id=opened.session_id, protocol_version=PROTOCOL_VERSION, target_model=opened.target_model,
        exit_layers=list(opened.exit_layers), prefill_time_s=opened.prefill_time_s, vocab_size=opened.vocab_size,
        eos_token_ids=list(opened.eos_token_ids)))


def opened_from_pb(msg: pb.Opened) -> Opened:
    return Opened(session_id=msg.session_id, prefill_time_s=float(msg.prefill_time_s), target_model=msg.target_model,
                  exit_layers=tuple(int(i) for i in msg.exit_layers), vocab_size=int(msg.vocab_size),
                  eos_token_ids=tuple(int(i) for i in msg.eos_token_ids))


def token_to_pb(token: StreamedToken) -> pb.ServerMessage:
    return pb.ServerMessage(token=pb.Token(index=token.index, token=token.token, eos=token.eos))


def token_from_pb(msg: pb.Token) -> StreamedToken:
    return StreamedToken(index=int(msg.index), token=int(msg.token), eos=bool(msg.eos))


def error(code: str, reason: str) -> pb.ServerMessage:
    return pb.ServerMessage(error=pb.Error(code=code, reason=reason))


def event_to_pb(event: Event) -> pb.ServerMessage:
    """The server message for one event of a session's outbox (``decoding.sessions``)."""
    if isinstance(event, Verdict):
        return verdict_to_pb(event)
    if isinstance(event, StreamedToken):
        return token_to_pb(event)
    if isinstance(event, Opened):
        return opened_to_pb(event)
    if isinstance(event, VerifierError):
        return error(event.code, event.reason)
    raise TypeError(f"{event!r} is not an event a session sends; the service fails a session with a VerifierError")
