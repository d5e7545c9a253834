"""The committed protobuf stubs match the .proto, and messages convert losslessly."""

from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    SessionRequest,
    Verdict,
    VerdictKind,
)
from speculative_vlm.protocol import codegen, convert
from speculative_vlm.protocol import verifier_pb2 as pb


def test_committed_stubs_are_generated_from_the_current_proto():
    assert codegen.stale_files() == [], "run `speculative-vlm gen-protocol` and commit the stubs"


def test_proto_package_is_versioned():
    assert pb.DESCRIPTOR.package == "speculative_vlm.v1"


def test_open_round_trips_through_the_wire_format():
    request = SessionRequest(prompt="walk to the red ball", system="you drive a robot", image=b"\xff\xd8jpeg",
                             settings=GenerationSettings(temperature=0.7, top_k=20, top_p=0.9,
                                                         max_new_tokens=33, grammar="command", seed=5))
    wire = convert.open_to_pb(request).SerializeToString()
    back = convert.open_from_pb(pb.ClientMessage.FromString(wire).open)
    assert back.prompt == request.prompt and back.system == request.system and back.image == request.image
    assert back.settings.top_k == 20 and back.settings.max_new_tokens == 33 and back.settings.grammar == "command"
    assert abs(back.settings.temperature - 0.7) < 1e-6


def test_draft_with_sparse_q_round_trips():
    block = DraftBlock(round=3, base_length=12, base_tail=(5, 6), tokens=(7, 8), preemptive=True,
                       q=({7: 0.5, 9: 0.25}, {8: 1.0}))
    back = convert.draft_from_pb(pb.ClientMessage.FromString(convert.draft_to_pb(block).SerializeToString()).draft)
    assert back == block


def test_every_verdict_kind_round_trips():
    for verdict in (Verdict(round=1, kind=VerdictKind.EARLY, accepted=2, token=9, confidence=0.5, exit_layer=3),
                    Verdict(round=1, kind=VerdictKind.FINAL, accepted=4, token=-1, eos=True, verify_time_s=0.25),
                    Verdict(round=2, kind=VerdictKind.DROPPED)):
        back = convert.verdict_from_pb(pb.ServerMessage.FromString(convert.verdict_to_pb(verdict).SerializeToString()))
        assert back == verdict
