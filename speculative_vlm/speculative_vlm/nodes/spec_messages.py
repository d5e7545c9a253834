"""Conversion between the engine's dataclasses (decoding.verifier) and the spec/* ROS messages.

A streamed (AUTOREGRESSIVE) session's tokens travel on spec/verdict too, as TOKEN verdicts.

Every message built here carries a header stamp from the clock of the node that sends it (the
drafter's for a DraftBlock, the bridge's for a Verdict), so a bag shows the exchange on one
timeline and a round's hop latency is its verdict's stamp minus its block's.
"""

from __future__ import annotations

from builtin_interfaces.msg import Time
from std_msgs.msg import Header

from speculative_vlm.decoding.verifier import DraftBlock, Verdict, VerdictKind
from speculative_vlm_msgs.msg import DraftBlock as DraftBlockMsg
from speculative_vlm_msgs.msg import Verdict as VerdictMsg

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


def error_msg(session_id: str, code: str, reason: str, *, stamp: Time) -> VerdictMsg:
    return VerdictMsg(header=Header(stamp=stamp), session_id=session_id, kind=VerdictMsg.ERROR, token=-1, exit_layer=-1,
                      code=code, reason=reason)


def token_msg(session_id: str, index: int, token: int, eos: bool, *, stamp: Time) -> VerdictMsg:
    """One streamed token of an AUTOREGRESSIVE session: a TOKEN verdict whose round is the token's index."""
    return VerdictMsg(header=Header(stamp=stamp), session_id=session_id, kind=VerdictMsg.TOKEN, round=index,
                      token=token, eos=eos, confidence=1.0, exit_layer=-1)


def msg_to_verdict(msg: VerdictMsg) -> Verdict:
    """A Verdict from a non-ERROR message (ERROR messages become exceptions in the caller)."""
    return Verdict(
        round=msg.round, kind=_MSG_TO_KIND[msg.kind], accepted=msg.accepted, token=msg.token,
        confidence=msg.confidence, exit_layer=msg.exit_layer, eos=msg.eos, verify_time_s=msg.verify_time_s,
    )
