"""Draft-length policies: fixed, and adaptive from measured acceptance and timings."""

from __future__ import annotations

from speculative_vlm.decoding.policy import AdaptiveLength, FixedLength, RoundObservation, expected_tokens


def feed(policy: AdaptiveLength, rounds: int, drafted: int, accepted: int, d: float, v: float, rtt: float) -> None:
    for _ in range(rounds):
        policy.observe(RoundObservation(drafted, accepted, draft_s=drafted * d, verify_s=v, wait_s=v + rtt))


def test_fixed_length_never_changes():
    policy = FixedLength(3)
    policy.observe(RoundObservation(3, 0, 0.1, 0.1, 0.2))
    assert policy.next_length() == 3


def test_expected_tokens_per_round_follows_the_geometric_formula():
    assert expected_tokens(0.0, 4) == 1.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def test_high_acceptance_and_a_slow_link_make_blocks_long():
    policy = AdaptiveLength(initial=2, max_length=8)
    feed(policy, 20, drafted=4, accepted=4, d=0.01, v=0.1, rtt=0.3)
    assert policy.next_length() >= 7


def test_low_acceptance_and_a_slow_draft_make_blocks_short():
    policy = AdaptiveLength(initial=6, max_length=8)
    feed(policy, 20, drafted=4, accepted=0, d=0.2, v=0.05, rtt=0.0)
    assert policy.next_length() == 1
