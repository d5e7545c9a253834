"""Conversion between the engine's dataclasses (decoding.verifier) and the spec/* ROS messages.

The ROS hop's one conversion, each way: the drafter's adapter (``nodes.ros_verifier``) and the
bridge (``nodes.bridge``) build and read every spec/* message and the ``spec/open`` request
here, and nowhere else. A streamed (AUTOREGRESSIVE) session's tokens travel on spec/verdict
too, as TOKEN verdicts. An error travels as its code and reason (the ``code`` of an ERROR
verdict, or of the ``OpenSession`` response) and is raised again as its type through the one
table of ``protocol.errors``: a ``PromptTooLong`` at the bridge is a ``PromptTooLong`` in the
drafter.

Every message built here carries a header stamp from the clock of the node that sends it (the
drafter's for a DraftBlock, the bridge's for a Verdict), so a bag shows the exchange on one
timeline and a round's hop latency is its verdict's stamp minus its block's.
"""

from __future__ import annotations

from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from speculative_vlm.decoding.sessions import StreamedToken
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    SessionRequest,
    Verdict,
    VerdictKind,
    VerifierError,
)
from speculative_vlm.protocol.errors import exception_for
from speculative_vlm_msgs.msg import DraftBlock as DraftBlockMsg
from speculative_vlm_msgs.msg import Verdict as VerdictMsg
from speculative_vlm_msgs.srv import OpenSession

_KIND_TO_MSG = {VerdictKind.EARLY: VerdictMsg.EARLY, VerdictKind.FINAL: VerdictMsg.FINAL,
                VerdictKind.DROPPED: VerdictMsg.DROPPED}
_MSG_TO_KIND = {v: k for k, v in _KIND_TO_MSG.items()}


def block_to_msg(session_id: str, block: DraftBlock, *, stamp: Time) -> DraftBlockMsg:
    msg = DraftBlockMsg(
        header=Header(stamp=stamp), session_id=session_id, round=block.round, base_length=block.base_length,
        base_tail=list(block.base_tail), tokens=list(block.tokens), preemptive=block.preemptive,
    )
    if block.q is not None:
        offsets, ids, probs = [0], [], []
        for dist in block.q:
            ids.extend(dist.keys())
            probs.extend(dist.values())
            offsets.append(len(ids))
        msg.q_offsets, msg.q_ids, msg.q_probs = offsets, ids, probs
    return msg


def msg_to_block(msg: DraftBlockMsg) -> DraftBlock:
    q = None
    if len(msg.q_offsets):
        off = list(msg.q_offsets)
        ids, probs = list(msg.q_ids), list(msg.q_probs)
        q = tuple(dict(zip(ids[a:b], probs[a:b], strict=True)) for a, b in zip(off, off[1:], strict=False))
    return DraftBlock(
        round=msg.round, base_length=msg.base_length, base_tail=tuple(msg.base_tail),
        tokens=tuple(msg.tokens), preemptive=msg.preemptive, q=q,
    )


def verdict_to_msg(session_id: str, verdict: Verdict, *, stamp: Time) -> VerdictMsg:
    return VerdictMsg(
        header=Header(stamp=stamp), session_id=session_id, round=verdict.round, kind=_KIND_TO_MSG[verdict.kind],
        accepted=verdict.accepted, token=verdict.token, confidence=float(verdict.confidence),
        exit_layer=verdict.exit_layer, eos=verdict.eos, verify_time_s=float(verdict.verify_time_s),
    )


def error_msg(session_id: str, error: VerifierError, *, stamp: Time) -> VerdictMsg:
    """The ERROR verdict that ends a session with ``error`` (its code and reason)."""
    return VerdictMsg(header=Header(stamp=stamp), session_id=session_id, kind=VerdictMsg.ERROR, token=-1, exit_layer=-1,
                      code=error.code, reason=error.reason)


def msg_to_error(msg: VerdictMsg) -> VerifierError:
    """The typed exception an ERROR verdict carries."""
    return exception_for(msg.code, msg.reason)


def token_msg(session_id: str, token: StreamedToken, *, stamp: Time) -> VerdictMsg:
    """One streamed token of an AUTOREGRESSIVE session: a TOKEN verdict whose round is the token's index."""
    return VerdictMsg(header=Header(stamp=stamp), session_id=session_id, kind=VerdictMsg.TOKEN, round=token.index,
                      token=token.token, eos=token.eos, confidence=1.0, exit_layer=-1)


def msg_to_token(msg: VerdictMsg) -> StreamedToken:
    return StreamedToken(index=msg.round, token=msg.token, eos=msg.eos)


def request_to_msg(request: SessionRequest, mode: int) -> OpenSession.Request:
    """The spec/open request for ``request`` in ``mode`` (SPECULATIVE or AUTOREGRESSIVE)."""
    s = request.settings
    return OpenSession.Request(
        system=request.system, prompt=request.prompt, image=CompressedImage(format="jpeg", data=list(request.image or b"")),
        temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
        max_new_tokens=int(s.max_new_tokens), grammar=s.grammar, seed=int(s.seed), mode=mode,
    )


def msg_to_request(msg: OpenSession.Request) -> SessionRequest:
    # 0 means "unset" for top_p and max_new_tokens, as on the wire (protocol.convert.settings_from_pb).
    settings = GenerationSettings(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p or 1.0,
                                  max_new_tokens=msg.max_new_tokens or GenerationSettings.max_new_tokens,
                                  grammar=msg.grammar, seed=msg.seed)
    return SessionRequest(prompt=msg.prompt, system=msg.system, image=bytes(msg.image.data) or None, settings=settings)


def refuse_open(response: OpenSession.Response, error: VerifierError) -> OpenSession.Response:
    """``response`` as a refusal with ``error``'s code and reason."""
    response.success, response.code, response.reason = False, error.code, error.reason
    return response


def open_error(response: OpenSession.Response) -> VerifierError:
    """The typed exception a refused spec/open carries."""
    return exception_for(response.code, response.reason)


def msg_to_verdict(msg: VerdictMsg) -> Verdict:
    """A Verdict from a non-ERROR message (ERROR messages become exceptions in the caller)."""
    return Verdict(
        round=msg.round, kind=_MSG_TO_KIND[msg.kind], accepted=msg.accepted, token=msg.token,
        confidence=msg.confidence, exit_layer=msg.exit_layer, eos=msg.eos, verify_time_s=msg.verify_time_s,
    )
