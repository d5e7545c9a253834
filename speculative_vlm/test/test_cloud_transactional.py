"""Transactional batches: a failure while verifying one item of a batched pass leaves every
other item exactly as if the failing one had never been batched with it (no token appended,
no round dropped, no verdict lost), by construction and without retrying.

First on the engine (a poisoned item in the middle of a batch of four healthy sessions, each
way of failing), then through the real gRPC server: a client provoking every verification
error we know of while four healthy robots decode, whose outputs must all equal the target's
own."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

import pytest
import torch
from cloud_harness import serving
from speculative_vlm.cloud.config import ServerConfig, ServerLimits
from speculative_vlm.decoding import admission
from speculative_vlm.decoding.loop import SpeculativeDecoder
from speculative_vlm.decoding.rules import InvalidProbability
from speculative_vlm.decoding.target_engine import TargetEngine, TargetSession
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    GenerationSettings,
    InvalidArgument,
    Refused,
    SessionNotFound,
    SessionRequest,
    Verdict,
    VerdictKind,
)
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import target_alone

PROMPTS = ["walk to the red ball", "turn left slowly", "sit down now", "go back two metres"]
POISON = "poison: stand on one leg"
GREEDY = GenerationSettings(max_new_tokens=24)
SAMPLING = GenerationSettings(temperature=1.0, max_new_tokens=24)
ROUNDS = 5


@pytest.fixture(scope="module")
def expected(models):
    engine = TargetEngine(models[0])
    return {p: target_alone(engine, SessionRequest(p, settings=GREEDY)) for p in PROMPTS}


# ---- the engine ------------------------------------------------------------------------------


def _block(session: TargetSession, answer: list[int], round_no: int) -> DraftBlock:
    """Three drafted tokens from the target's own answer; every other round the third is wrong,
    so both the all-accepted and the rejected paths commit."""
    done = len(session.output)
    tokens = list(answer[done : done + 3])
    if round_no % 2 and len(tokens) == 3:
        tokens[2] = (tokens[2] + 1) % 1000
    return DraftBlock(round_no, done, tuple(session.output[-2:]), tuple(tokens))


def _snapshot(session: TargetSession) -> tuple:
    return (list(session.kv.ids), session.kv.cached, list(session.output), session.rounds,
            session.generator.get_state().clone())


def _same(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and torch.equal(a[4], b[4])


def _run(models, expected, poison: Callable | None, poison_settings=GREEDY):
    """ROUNDS batched passes over the four healthy sessions (and, if given, a poisoned one in the
    middle of each batch); returns healthy verdicts, early verdicts and states, and the poison's."""
    engine = TargetEngine(models[0], exit_layers=[1], max_batch=8)
    healthy = [engine.open_session(SessionRequest(p, settings=GREEDY)) for p in PROMPTS]
    bad = engine.open_session(SessionRequest(POISON, settings=poison_settings)) if poison else None
    verdicts, early, poison_results = [], [], []
    for r in range(ROUNDS):
        items = [(s, _block(s, expected[p], r)) for s, p in zip(healthy, PROMPTS, strict=True)]
        before = None
        if bad is not None:
            block = poison(engine, bad, r)
            before = _snapshot(bad)
            items.insert(2, (bad, block))
        seen: list[tuple[str, Verdict]] = []
        results = engine.verify(items, on_early=lambda s, v, seen=seen: seen.append((s.request.prompt, v)))
        if bad is not None:
            poison_results.append((results.pop(2), before, _snapshot(bad)))
        verdicts.append([(v.kind, v.accepted, v.token, v.eos) for v in results])
        early.append([(p, v.accepted, v.token, v.exit_layer) for p, v in seen if p != POISON])
    states = [(list(s.kv.ids), s.kv.cached, list(s.output), s.rounds) for s in healthy]
    return verdicts, early, states, poison_results


def _bypass_admission(monkeypatch):
    """Let a bad block past admission, to prove the pass itself contains what admission would stop."""
    monkeypatch.setattr(admission, "check_block", lambda *args, **kwargs: None)


def nan_temperature(engine, session, r):
    # Admission refuses it at Open; here it slips past (as a future bug might) into the pass.
    session.request = dataclasses.replace(session.request, settings=GenerationSettings(temperature=math.nan))
    return DraftBlock(r, len(session.output), (), (5, 6, 7))


def nan_probability(engine, session, r):
    return DraftBlock(r, len(session.output), (), (5, 6), q=({5: 0.5}, {6: math.nan}))


def probability_id_past_the_vocabulary(engine, session, r):
    return DraftBlock(r, len(session.output), (), (5,), q=({5: 0.5, engine.model.vocab_size + 3: 0.2},))


def commit_fails_half_way(engine, session, r):
    original = type(session.out).extend.__get__(session.out)

    def extend(tokens):
        tokens = list(tokens)
        if tokens:
            original(tokens[:1])  # one token in, then the failure: the rollback must undo it
            raise RuntimeError("storage failed while committing")

    session.out.extend = extend
    return DraftBlock(r, len(session.output), (), (5, 6, 7))


def token_outside_the_vocabulary(engine, session, r):
    return DraftBlock(r, len(session.output), (), (5, engine.model.vocab_size))


def closed_session(engine, session, r):
    engine.close_session(session)
    return DraftBlock(r, len(session.output), (), (5, 6))


FAILURES = {
    "nan temperature past admission": (nan_temperature, True, InvalidProbability),
    "nan draft probability past admission": (nan_probability, True, InvalidProbability),
    "draft probability id past the vocabulary, past admission": (
        probability_id_past_the_vocabulary, True, InvalidProbability),
    "commit failing half-way": (commit_fails_half_way, False, RuntimeError),
    "token outside the vocabulary": (token_outside_the_vocabulary, False, InvalidArgument),
    "closed session": (closed_session, False, SessionNotFound),
}


@pytest.fixture(scope="module")
def alone(models, expected):
    """The four healthy sessions batched with nobody else."""
    return _run(models, expected, None)


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_a_failing_item_leaves_every_other_item_as_if_it_had_never_been_batched(
        models, expected, alone, case, monkeypatch):
    poison, bypass, error = FAILURES[case]
    if bypass:
        _bypass_admission(monkeypatch)
    verdicts, early, states, poisoned = _run(models, expected, poison, poison_settings=SAMPLING)
    assert verdicts == alone[0], "a healthy verdict changed"
    assert early == alone[1], "a healthy early verdict changed or was lost"
    assert states == alone[2], "a healthy session's ids, cache or output changed"
    for result, before, after in poisoned:
        assert isinstance(result, error), result
        if case != "closed session":
            assert _same(before, after), "the failing session was not left as before the pass"


def test_an_early_verdict_that_fails_costs_its_own_item_that_signal_only(models, expected, alone, monkeypatch):
    original = TargetEngine._early_verdict

    def early(self, it, layer, logits):
        if it.session.request.prompt == POISON:
            raise RuntimeError("exit head failed")
        return original(self, it, layer, logits)

    monkeypatch.setattr(TargetEngine, "_early_verdict", early)
    verdicts, early_seen, states, poisoned = _run(
        models, expected, lambda engine, s, r: _block(s, expected[PROMPTS[0]], r))
    assert (verdicts, early_seen, states) == alone[:3]
    assert all(isinstance(result, Verdict) and result.kind is VerdictKind.FINAL for result, _, _ in poisoned)


def test_a_forward_pass_that_fails_fails_its_items_and_leaves_each_as_before(models, expected, monkeypatch):
    engine = TargetEngine(models[0], max_batch=8)
    sessions = [engine.open_session(SessionRequest(p, settings=GREEDY)) for p in PROMPTS]
    engine.verify([(s, _block(s, expected[p], 0)) for s, p in zip(sessions, PROMPTS, strict=True)])
    before = [_snapshot(s) for s in sessions]
    forward = engine.model.forward

    def half_a_pass(states, **kwargs):  # the model runs, then fails before the pass ends
        forward(states, **kwargs)
        raise MemoryError("out of memory")

    monkeypatch.setattr(engine.model, "forward", half_a_pass)
    results = engine.verify([(s, _block(s, expected[p], 1)) for s, p in zip(sessions, PROMPTS, strict=True)])
    assert all(isinstance(r, MemoryError) for r in results)
    assert all(_same(b, _snapshot(s)) for b, s in zip(before, sessions, strict=True))
    monkeypatch.undo()
    again = engine.verify([(s, _block(s, expected[p], 1)) for s, p in zip(sessions, PROMPTS, strict=True)])
    assert all(v.kind is VerdictKind.FINAL for v in again)


def test_closing_a_session_during_a_pass_waits_for_it_and_its_batch_mates_get_their_verdicts(
        models, expected, monkeypatch):
    engine = TargetEngine(models[0], max_batch=8)
    stay, leave = (engine.open_session(SessionRequest(p, settings=GREEDY)) for p in PROMPTS[:2])
    in_pass, release = threading.Event(), threading.Event()
    forward = engine.model.forward

    def slow_forward(states, **kwargs):
        in_pass.set()
        release.wait(timeout=10)
        return forward(states, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
    results: list = []
    verifying = threading.Thread(target=lambda: results.extend(engine.verify(
        [(stay, _block(stay, expected[PROMPTS[0]], 0)), (leave, _block(leave, expected[PROMPTS[1]], 0))])))
    verifying.start()
    assert in_pass.wait(timeout=10)
    closing = threading.Thread(target=engine.close_session, args=(leave,))
    closing.start()
    closing.join(timeout=0.3)
    assert closing.is_alive() and leave.kv.cache is not None, "the cache was freed under a running pass"
    release.set()
    verifying.join(timeout=10)
    closing.join(timeout=10)
    assert isinstance(results[0], Verdict) and results[0].kind is VerdictKind.FINAL
    assert leave.kv.cache is None


# ---- through the gRPC server, four healthy robots at a time ---------------------------------

HEALTHY, INTRUDER = "healthy-robots-token-000000000000", "intruder-robot-token-11111111111"


@pytest.fixture(scope="module")
def server(models):
    engine = TargetEngine(models[0], exit_layers=[1], max_batch=8)
    config = ServerConfig(bind="127.0.0.1:0", max_batch=8, max_wait_ms=15, exit_layers=(1,),
                          limits=ServerLimits(requests_per_second=10_000, burst=10_000))
    with serving(config, engine, tokens=f"healthy:{HEALTHY},intruder:{INTRUDER}") as handle:
        yield handle


@pytest.fixture(scope="module")
def poisoned_engine(server):
    """Sessions whose prompt starts with 'poison' fail inside their own item of a pass."""
    engine = server.service.engine
    mp = pytest.MonkeyPatch()
    decide, commit = engine._decide, engine._commit
    mp.setattr(engine, "_decide", lambda it, logits: _poisoned(it, "decide") or decide(it, logits))
    mp.setattr(engine, "_commit", lambda it, outcome, elapsed: _poisoned(it, "commit") or commit(it, outcome, elapsed))
    original_early = engine._early_verdict
    mp.setattr(engine, "_early_verdict", lambda it, layer, logits: _poisoned(it, "early") or
               original_early(it, layer, logits))
    yield engine
    mp.undo()


def _poisoned(it, where: str) -> None:
    if it.session.request.prompt == f"poison {where}":
        if where == "commit":
            it.session.out.extend(it.tokens[:1])  # half-way through its commit
        raise RuntimeError(f"injected failure in {where}")


def _final(session, timeout: float = 10.0) -> Verdict:
    while (verdict := session.next_verdict(timeout=timeout)).kind is VerdictKind.EARLY:
        pass
    return verdict


def _refused_at_open(settings: GenerationSettings, code: str = "invalid_argument") -> Callable:
    def attack(verifier: GrpcVerifier, vocab: int) -> str:
        with pytest.raises(Refused) as refused:
            verifier.open(SessionRequest("walk to the red ball", settings=settings)).close()
        assert refused.value.code == code, refused.value
        return refused.value.code
    return attack


def _refused_draft(make: Callable[[int], DraftBlock], settings=SAMPLING, code: str = "invalid_argument") -> Callable:
    def attack(verifier: GrpcVerifier, vocab: int) -> str:
        session = verifier.open(SessionRequest("walk to the red ball", settings=settings))
        try:
            session.submit(make(vocab))
            with pytest.raises(Refused) as refused:
                _final(session)
            assert refused.value.code == code, refused.value
            return refused.value.code
        finally:
            session.close()
    return attack


def _ragged(verifier: GrpcVerifier, vocab: int) -> str:
    session = verifier.open(SessionRequest("walk to the red ball", settings=SAMPLING))
    try:
        session._requests.put(pb.ClientMessage(draft=pb.Draft(round=0, tokens=[1], q=[
            pb.SparseDistribution(token_ids=[1, 2], probs=[0.5])])))  # the client library cannot build this
        with pytest.raises(InvalidArgument):
            _final(session)
        return "invalid_argument"
    finally:
        session.close()


def _poison(where: str, fails: bool = True) -> Callable:
    def attack(verifier: GrpcVerifier, vocab: int) -> str:
        session = verifier.open(SessionRequest(f"poison {where}", settings=GREEDY))
        try:
            session.submit(DraftBlock(0, 0, (), (5, 6, 7)))
            try:
                verdict = _final(session)
            except Refused as refused:
                assert fails and refused.code == "verify_failed", refused
                return refused.code
            assert not fails, "an injected failure was not reported"
            return verdict.kind.name.lower()
        finally:
            session.close()
    return attack


def _past_the_end(verifier: GrpcVerifier, vocab: int) -> str:
    # Drafts after an EOS: only up to the EOS is verified, nothing is committed past the end.
    session = verifier.open(SessionRequest("walk to the red ball", settings=GREEDY))
    try:
        eos = session.opened.eos_token_ids[0]
        session.submit(DraftBlock(0, 0, (), (eos, 0, 0, 0)))
        verdict = _final(session)
        assert verdict.kind is VerdictKind.FINAL and verdict.accepted <= 1
        return "final"
    finally:
        session.close()


def _closes_mid_pass(verifier: GrpcVerifier, vocab: int) -> str:
    session = verifier.open(SessionRequest("walk to the red ball", settings=GREEDY))
    for r in range(4):
        session.submit(DraftBlock(r, 0, (), (5, 6, 7)))
    session._call.cancel()  # gone while its blocks are queued or in a pass
    session.close()
    return "cancelled"


ATTACKS: dict[str, Callable] = {
    "nan temperature": _refused_at_open(GenerationSettings(temperature=math.nan)),
    "infinite temperature": _refused_at_open(GenerationSettings(temperature=math.inf)),
    "negative top_k": _refused_at_open(GenerationSettings(temperature=1.0, top_k=-5)),
    "top_p above one": _refused_at_open(GenerationSettings(temperature=1.0, top_p=1.5)),
    "negative max_new_tokens": _refused_at_open(GenerationSettings(max_new_tokens=-3)),
    "draft probability ids at the vocabulary size": _refused_draft(
        lambda vocab: DraftBlock(0, 0, (), (5,), q=({5: 0.5, vocab: 0.3},))),
    "nan draft probabilities": _refused_draft(lambda vocab: DraftBlock(0, 0, (), (5, 6), q=({5: math.nan}, {6: 1.0}))),
    "draft probabilities above one": _refused_draft(lambda vocab: DraftBlock(0, 0, (), (5,), q=({5: 7.0},))),
    "negative draft probabilities": _refused_draft(lambda vocab: DraftBlock(0, 0, (), (5,), q=({5: -0.5},))),
    "fewer distributions than tokens": _refused_draft(lambda vocab: DraftBlock(0, 0, (), (5, 6), q=({5: 0.5},))),
    "ragged distribution": _ragged,
    "token ids at the vocabulary size": _refused_draft(lambda vocab: DraftBlock(0, 0, (), (5, vocab)), GREEDY),
    "base_tail longer than base_length": _refused_draft(lambda vocab: DraftBlock(0, 0, (1, 2), (5,)), GREEDY),
    "drafts past the end of the output": _past_the_end,
    "failure injected in its rules": _poison("decide"),
    "failure injected half-way through its commit": _poison("commit"),
    "failure injected in its early verdict": _poison("early", fails=False),
    "stream cancelled with blocks in flight": _closes_mid_pass,
}


def _healthy_robot(models, port: int, prompt: str, results: dict, start: threading.Barrier) -> None:
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=HEALTHY)
    try:
        decoder = SpeculativeDecoder(models[1], verifier, verdict_timeout_s=30)
        original = decoder._draft_block

        def paced(*args, **kwargs):  # a robot drafting on a slow CPU: passes fill with other robots' blocks
            time.sleep(0.01)
            return original(*args, **kwargs)

        decoder._draft_block = paced
        start.wait(timeout=30)
        results[prompt] = decoder.generate(SessionRequest(prompt, settings=GREEDY)).token_ids
    except BaseException as exc:  # reported by the test
        results[prompt] = exc
    finally:
        verifier.close()


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
def test_four_healthy_robots_get_the_target_output_while_a_client_attacks(
        models, expected, server, poisoned_engine, attack):
    results: dict[str, object] = {}
    start = threading.Barrier(len(PROMPTS) + 1)
    robots = [threading.Thread(target=_healthy_robot, args=(models, server.port, p, results, start))
              for p in PROMPTS]
    for robot in robots:
        robot.start()
    attacker = GrpcVerifier(f"127.0.0.1:{server.port}", token=INTRUDER)
    answers: list[str] = []
    try:
        start.wait(timeout=30)
        # At least three attempts, and keep attacking until every robot is done.
        while len(answers) < 3 or any(robot.is_alive() for robot in robots):
            answers.append(ATTACKS[attack](attacker, models[0].vocab_size))
    finally:
        attacker.close()
        for robot in robots:
            robot.join(timeout=60)
    outcomes = {p: results.get(p) == expected[p] for p in PROMPTS}
    print(f"\n[{attack}] healthy robots equal to the target alone: {sum(outcomes.values())}/{len(PROMPTS)}; "
          f"{len(answers)} attempts, answered {sorted(set(answers))}")
    assert not any(isinstance(r, BaseException) for r in results.values()), results
    assert all(outcomes.values()), outcomes
    assert server.service.scheduler._thread.is_alive()
    probe = GrpcVerifier(f"127.0.0.1:{server.port}", token=HEALTHY)
    assert probe.serving()
    probe.close()
