"""Admission fails closed: every field of Open and Draft is checked before anything touches a
batch or a cache, and a refusal (``invalid_argument``) names the field, in the engine, the
in-process verifier and the gRPC service alike."""

from __future__ import annotations

import dataclasses
import math

import pytest
from cloud_harness import serving
from speculative_vlm.cloud.config import ServerConfig
from speculative_vlm.decoding import admission
from speculative_vlm.decoding.inprocess import InProcessVerifier
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    InvalidArgument,
    SessionRequest,
    VerdictKind,
)
from speculative_vlm.protocol import convert
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import tiny_causal_lm

TOKEN = "admission-test-token-0123456789ab"
VOCAB = 100
SETTINGS = GenerationSettings(temperature=0.8, max_new_tokens=16)
NAN, INF = math.nan, math.inf

BAD_SETTINGS = {
    "nan temperature": (dict(temperature=NAN), "open.settings.temperature"),
    "infinite temperature": (dict(temperature=INF), "open.settings.temperature"),
    "negative temperature": (dict(temperature=-1.0), "open.settings.temperature"),
    "huge temperature": (dict(temperature=1e9), "open.settings.temperature"),
    "negative top_k": (dict(top_k=-1), "open.settings.top_k"),
    "top_k beyond int32": (dict(top_k=2**40), "open.settings.top_k"),
    "nan top_p": (dict(top_p=NAN), "open.settings.top_p"),
    "zero top_p": (dict(top_p=0.0), "open.settings.top_p"),
    "negative top_p": (dict(top_p=-0.5), "open.settings.top_p"),
    "top_p above one": (dict(top_p=1.5), "open.settings.top_p"),
    "zero max_new_tokens": (dict(max_new_tokens=0), "open.settings.max_new_tokens"),
    "negative max_new_tokens": (dict(max_new_tokens=-5), "open.settings.max_new_tokens"),
    "float max_new_tokens": (dict(max_new_tokens=8.5), "open.settings.max_new_tokens"),
    "negative seed": (dict(seed=-1), "open.settings.seed"),
    "seed beyond uint64": (dict(seed=2**64), "open.settings.seed"),
    "grammar not text": (dict(grammar=7), "open.settings.grammar"),
}

GOOD = DraftBlock(round=2, base_length=3, base_tail=(5, 6), tokens=(7, 8), q=({7: 0.5, 9: 0.25}, {8: 1.0}))
BAD_BLOCKS = {
    "negative round": (dict(round=-1), "draft.round"),
    "round beyond uint32": (dict(round=2**32), "draft.round"),
    "negative base_length": (dict(base_length=-1), "draft.base_length"),
    "base_length past the budget": (dict(base_length=17), "draft.base_length"),
    "base_tail longer than base_length": (dict(base_length=1), "draft.base_tail"),
    "base_tail id outside the vocabulary": (dict(base_tail=(5, VOCAB)), "draft.base_tail[1]"),
    "token id outside the vocabulary": (dict(tokens=(7, VOCAB)), "draft.tokens[1]"),
    "negative token id": (dict(tokens=(-1, 8)), "draft.tokens[0]"),
    "fewer distributions than tokens": (dict(q=({7: 0.5},)), "draft.q has 1 distributions for 2 tokens"),
    "distribution id outside the vocabulary": (dict(q=({7: 0.5, VOCAB: 0.1}, {8: 1.0})), "draft.q[0].token_ids[1]"),
    "nan probability": (dict(q=({7: 0.5}, {8: NAN})), "draft.q[1].probs[0] is nan"),
    "infinite probability": (dict(q=({7: INF}, {8: 1.0})), "draft.q[0].probs[0] is inf"),
    "negative probability": (dict(q=({7: -0.1}, {8: 1.0})), "draft.q[0].probs[0]"),
    "probability above one": (dict(q=({7: 1.5}, {8: 1.0})), "draft.q[0].probs[0]"),
    "probabilities summing above one": (dict(q=({7: 0.7, 9: 0.7}, {8: 1.0})), "draft.q[0].probs sum"),
    "preemptive not a bool": (dict(preemptive=3), "draft.preemptive"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=list(BAD_SETTINGS))
def test_an_open_with_a_setting_out_of_range_is_refused_naming_the_field(case):
    changes, field = BAD_SETTINGS[case]
    with pytest.raises(InvalidArgument) as refused:
        admission.check_request(SessionRequest("go", settings=dataclasses.replace(SETTINGS, **changes)))
    assert refused.value.code == "invalid_argument" and field in refused.value.reason


def test_the_edges_of_every_setting_range_are_admitted():
    for changes in (dict(temperature=0.0), dict(temperature=admission.MAX_TEMPERATURE), dict(top_k=0),
                    dict(top_p=1.0), dict(top_p=1e-6), dict(max_new_tokens=1), dict(seed=2**64 - 1)):
        admission.check_request(SessionRequest("go", settings=dataclasses.replace(SETTINGS, **changes)))


def test_a_max_new_tokens_beyond_the_models_context_is_refused():
    with pytest.raises(InvalidArgument, match="open.settings.max_new_tokens"):
        admission.check_request(SessionRequest("go", settings=SETTINGS), max_new_tokens=8)


@pytest.mark.parametrize("case", BAD_BLOCKS, ids=list(BAD_BLOCKS))
def test_a_draft_with_a_field_out_of_range_is_refused_naming_the_field(case):
    admission.check_block(GOOD, VOCAB, SETTINGS)
    changes, field = BAD_BLOCKS[case]
    with pytest.raises(InvalidArgument) as refused:
        admission.check_block(dataclasses.replace(GOOD, **changes), VOCAB, SETTINGS)
    assert refused.value.code == "invalid_argument" and field in refused.value.reason


def test_a_draft_with_more_tokens_than_the_limit_is_refused():
    with pytest.raises(InvalidArgument, match="draft.tokens has 2 tokens, the limit is 1"):
        admission.check_block(GOOD, VOCAB, SETTINGS, max_tokens=1)


# ---- the engine and the in-process verifier -------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return tiny_causal_lm(layers=2)


def test_the_engine_refuses_a_nan_temperature_before_any_prefill(target, monkeypatch):
    engine = TargetEngine(target)

    def no_prefill(prompt):
        raise AssertionError("prefilled a refused request")

    monkeypatch.setattr(target, "start", no_prefill)
    with pytest.raises(InvalidArgument, match="open.settings.temperature is nan"):
        engine.open_session(SessionRequest("go", settings=GenerationSettings(temperature=NAN)))
    assert not engine.sessions


def test_the_in_process_verifier_refuses_a_nan_probability_and_serves_the_other_session(target):
    engine = TargetEngine(target, max_batch=4)
    sampling = GenerationSettings(temperature=1.0, max_new_tokens=8)
    with InProcessVerifier(engine) as verifier:
        good, bad = verifier.open(SessionRequest("sit down", settings=sampling)), verifier.open(
            SessionRequest("stand up", settings=sampling))
        bad.submit(DraftBlock(0, 0, (), (5, 6), q=({5: 0.5}, {6: NAN})))
        good.submit(DraftBlock(0, 0, (), (5, 6), q=({5: 0.5}, {6: 0.5})))
        assert good.next_verdict(timeout=30).kind is VerdictKind.FINAL
        with pytest.raises(InvalidArgument, match=r"draft.q\[1\].probs\[0\] is nan"):
            bad.next_verdict(timeout=30)
    assert bad.target.output == []  # nothing of the refused block was committed


# ---- the gRPC service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(target):
    engine = TargetEngine(target, exit_layers=[0])
    with serving(ServerConfig(bind="127.0.0.1:0"), engine, tokens=f"robot:{TOKEN}") as handle:
        yield handle


@pytest.fixture
def verifier(server):
    client = GrpcVerifier(f"127.0.0.1:{server.port}", token=TOKEN)
    yield client
    client.close()


def _count_prefills(server, monkeypatch) -> list[int]:
    calls: list[int] = []
    model = server.service.engine.model
    original = model.start
    monkeypatch.setattr(model, "start", lambda prompt: calls.append(1) or original(prompt))
    return calls


WIRE_SETTINGS = {
    "nan temperature": (dict(temperature=NAN), "open.settings.temperature is nan"),
    "negative top_k": (dict(top_k=-3), "open.settings.top_k is -3"),
    "negative top_p": (dict(top_p=-0.5), "open.settings.top_p is -0.5"),
    "nan top_p": (dict(top_p=NAN), "open.settings.top_p is nan"),
    "top_p above one": (dict(top_p=2.0), "open.settings.top_p is 2.0"),
    "negative max_new_tokens": (dict(max_new_tokens=-4), "open.settings.max_new_tokens is -4"),
}


@pytest.mark.parametrize("case", WIRE_SETTINGS, ids=list(WIRE_SETTINGS))
def test_the_service_refuses_a_bad_open_naming_the_field_before_any_prefill(server, verifier, case, monkeypatch):
    prefills = _count_prefills(server, monkeypatch)
    changes, reason = WIRE_SETTINGS[case]
    request = SessionRequest("walk to the red ball", settings=dataclasses.replace(SETTINGS, **changes))
    with pytest.raises(InvalidArgument) as refused:
        verifier.open(request)
    assert refused.value.code == "invalid_argument" and reason in refused.value.reason
    assert prefills == []


WIRE_BLOCKS = {
    "token id at the vocabulary size": (DraftBlock(0, 0, (), (1, -1)), "draft.tokens[1]"),
    "distribution id at the vocabulary size": (
        DraftBlock(0, 0, (), (1,), q=({1: 0.5, -1: 0.1},)), "draft.q[0].token_ids[1]"),
    "nan probability": (DraftBlock(0, 0, (), (1, 2), q=({1: 0.5}, {2: NAN})), "draft.q[1].probs[0] is nan"),
    "probability above one": (DraftBlock(0, 0, (), (1,), q=({1: 3.0},)), "draft.q[0].probs[0] is 3.0"),
    "one distribution for two tokens": (DraftBlock(0, 0, (), (1, 2), q=({1: 0.5},)), "draft.q has 1"),
    "base_tail longer than base_length": (DraftBlock(0, 0, (4, 5), (1,)), "draft.base_tail has 2 tokens"),
    "base_length past the budget": (DraftBlock(0, 10_000, (), (1,)), "draft.base_length is 10000"),
}


@pytest.mark.parametrize("case", WIRE_BLOCKS, ids=list(WIRE_BLOCKS))
def test_the_service_refuses_a_bad_draft_naming_the_field(server, verifier, case):
    block, reason = WIRE_BLOCKS[case]
    vocab = server.service.engine.model.vocab_size
    block = dataclasses.replace(
        block, tokens=tuple(vocab if t < 0 else t for t in block.tokens),
        q=None if block.q is None else tuple({(vocab if t < 0 else t): p for t, p in d.items()} for d in block.q))
    session = verifier.open(SessionRequest("walk to the red ball", settings=SETTINGS))
    session.submit(block)
    with pytest.raises(InvalidArgument) as refused:
        session.next_verdict(timeout=10)
    assert refused.value.code == "invalid_argument" and reason in refused.value.reason


def test_the_service_refuses_a_ragged_distribution_naming_the_field(server, verifier):
    session = verifier.open(SessionRequest("walk to the red ball", settings=SETTINGS))
    ragged = pb.ClientMessage(draft=pb.Draft(round=0, tokens=[1, 2], q=[
        pb.SparseDistribution(token_ids=[1], probs=[0.5]), pb.SparseDistribution(token_ids=[2, 3], probs=[0.5])]))
    session._requests.put(ragged)  # the client library cannot build a ragged message; a hostile one can
    with pytest.raises(InvalidArgument, match=r"draft.q\[1\] has 2 token_ids and 1 probs"):
        session.next_verdict(timeout=10)


def test_a_valid_sampling_session_is_still_served(server, verifier):
    session = verifier.open(SessionRequest("walk to the red ball", settings=SETTINGS))
    session.submit(DraftBlock(0, 0, (), (1, 2), q=({1: 0.5, 3: 0.5}, {2: 1.0})))
    while (verdict := session.next_verdict(timeout=10)).kind is VerdictKind.EARLY:
        pass
    assert verdict.kind is VerdictKind.FINAL and verdict.round == 0
    session.close()


def test_the_wire_passes_negative_and_nan_settings_on_for_admission_to_refuse():
    # proto3 cannot say "unset", so 0 means "off"; anything else must reach the checks as sent.
    settings = convert.settings_from_pb(pb.GenerationSettings(top_p=-0.5, max_new_tokens=-4, temperature=NAN))
    assert settings.top_p == -0.5 and settings.max_new_tokens == -4 and math.isnan(settings.temperature)
    unset = convert.settings_from_pb(pb.GenerationSettings())
    assert unset.top_p == 1.0 and unset.max_new_tokens == GenerationSettings.max_new_tokens


def test_a_draft_on_an_autoregressive_session_is_refused_not_left_waiting(server, verifier):
    # Queued, it would never be verified, and a session with a queued block never expires.
    session = verifier.open_autoregressive(SessionRequest("walk to the red ball", settings=SETTINGS))
    session.submit(DraftBlock(0, 0, (), (1, 2)))
    with pytest.raises(InvalidArgument, match="AUTOREGRESSIVE"):
        while True:
            session.next_token(timeout=10)


def test_draft_tokens_past_the_end_of_the_output_are_never_verified():
    # Make the target's own first choice the end of output: a block that goes on past it
    # would otherwise have its later tokens accepted and committed beyond the end.
    model = tiny_causal_lm(layers=2, seed=4)
    engine = TargetEngine(model)
    request = SessionRequest("walk to the red ball", settings=GenerationSettings(max_new_tokens=8))
    answer = list(engine.generate(engine.open_session(request), max_new_tokens=3))
    model.eos_token_ids = (answer[0],)
    session = engine.open_session(request)
    verdict = engine.verify([(session, DraftBlock(0, 0, (), tuple(answer)))])[0]
    assert (verdict.kind, verdict.accepted, verdict.token, verdict.eos) == (VerdictKind.FINAL, 1, -1, True)
    assert session.output == answer[:1]
