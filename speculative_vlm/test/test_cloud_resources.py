"""Fair shares of the verifier: streams count against their client from their first byte and
must open within seconds, a server-wide session limit leaves RPC slots free, prompts are
limited in tokens and prefilled in chunks between other sessions' passes, KV-cache memory is
budgeted, and failed authentication is throttled per address."""

import math
import threading
import time

import grpc
import pytest
from cloud_harness import RawStream, open_message, raw_stream, serving
from polling import wait_for
from speculative_vlm.cloud.auth import AuthThrottle, AuthThrottled
from speculative_vlm.cloud.config import ConfigError, ServerConfig, ServerLimits
from speculative_vlm.cloud.limits import KVBudget, LimitExceeded
from speculative_vlm.cloud.server import serve
from speculative_vlm.cloud.turns import ModelTurns
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import GenerationSettings, SessionRequest
from speculative_vlm.protocol.client import GrpcVerifier
from tiny_models import jpeg, slow_down, target_alone, tiny_causal_lm, tiny_pair, tiny_vlm

TOKEN, OTHER = "resources-token-0123456789abcdef", "resources-other-0123456789abcdef"
REQUEST = SessionRequest(prompt="walk to the red ball", settings=GenerationSettings(max_new_tokens=8))
SECONDS_PER_TOKEN = 0.004  # the slowed target: a 16-token chunk takes 64 ms


# ---- turns on the model ------------------------------------------------------------------------
def _turn(turns: ModelTurns, name: str, order: list[str], release: threading.Event | None = None,
          background: bool = False) -> threading.Thread:
    def take() -> None:
        with turns.background() if background else turns:
            order.append(name)
            if release is not None:
                release.wait(5)

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(0.05)  # queued before the next one
    return thread


def test_a_verification_pass_waits_for_the_running_prefill_chunk_only():
    turns, order, chunk_done = ModelTurns(), [], threading.Event()
    threads = [_turn(turns, "chunk 1", order, chunk_done, background=True),
               _turn(turns, "chunk 2", order, background=True),
               _turn(turns, "pass", order)]
    chunk_done.set()
    for t in threads:
        t.join(5)
    assert order == ["chunk 1", "pass", "chunk 2"]


def test_a_prefill_advances_a_chunk_between_back_to_back_verification_passes():
    turns, order, pass_done = ModelTurns(), [], threading.Event()
    threads = [_turn(turns, "pass 1", order, pass_done),
               _turn(turns, "chunk", order, background=True),
               _turn(turns, "pass 2", order)]
    pass_done.set()
    for t in threads:
        t.join(5)
    assert order == ["pass 1", "chunk", "pass 2"]


# ---- the authentication throttle ---------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_locked_out_after_the_failures_allowed_within_the_window():
    clock = Clock()
    throttle = AuthThrottle(max_failures=3, window_s=60, lockout_s=10, clock=clock)
    for _ in range(2):
        throttle.failed("ipv4:10.0.0.9")
        throttle.check("ipv4:10.0.0.9")
    throttle.failed("ipv4:10.0.0.9")
    with pytest.raises(AuthThrottled, match="locked out for another 10.0 s"):
        throttle.check("ipv4:10.0.0.9")
    throttle.check("ipv4:10.0.0.8")  # another address is not
    clock.now += 10.5
    throttle.check("ipv4:10.0.0.9")


def test_each_further_lockout_doubles_up_to_the_maximum():
    clock = Clock()
    throttle = AuthThrottle(max_failures=1, window_s=60, lockout_s=10, max_lockout_s=25, clock=clock)
    lockouts = []
    for _ in range(3):
        throttle.failed("peer")
        start = clock.now
        while throttle.locked_out("peer"):
            clock.now += 0.5
        lockouts.append(clock.now - start)
    assert lockouts == [10.0, 20.0, 25.0]


def test_failures_spread_wider_than_the_window_do_not_lock_out():
    clock = Clock()
    throttle = AuthThrottle(max_failures=3, window_s=10, clock=clock)
    for _ in range(6):
        throttle.failed("peer")
        clock.now += 6
    throttle.check("peer")


def test_the_throttle_remembers_a_bounded_number_of_addresses():
    throttle = AuthThrottle(max_failures=1, max_peers=100)
    for i in range(1000):
        throttle.failed(f"ipv6:[fd00::{i:x}]")
    assert len(throttle._peers) == 100 and throttle.locked_out("ipv6:[fd00::3e7]")


# ---- the KV-cache budget ------------------------------------------------------------------------
def test_kv_bytes_per_token_follow_the_model_config():
    # tiny llama: 4 layers x 2 KV heads x head_dim 16 (64 / 4 heads) x fp32, keys and values
    assert TargetEngine(tiny_causal_lm()).kv_bytes_per_token == 2 * 4 * 2 * 16 * 4


def test_a_reservation_over_the_budget_or_the_clients_share_is_refused_until_one_is_released():
    budget = KVBudget(budget_bytes=1000, bytes_per_token=10, client_share=0.5)
    budget.reserve("s1", "robot-a", 40)
    with pytest.raises(LimitExceeded, match="holds 400 B of its 500 B share") as refused:
        budget.reserve("s2", "robot-a", 20)  # 600 bytes > its 500
    assert refused.value.code == "kv_budget_exceeded"
    budget.reserve("s3", "robot-b", 50)
    with pytest.raises(LimitExceeded, match="900 B of the server's 1000 B"):
        budget.reserve("s4", "robot-c", 20)
    budget.release("s1")
    budget.reserve("s4", "robot-c", 20)
    assert budget.used_bytes == 700


# ---- chunked prefill ---------------------------------------------------------------------------
def _fed_lengths(adapter) -> list[int]:
    fed: list[int] = []
    adapter.decoder_layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: fed.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    return fed


def test_a_long_prompt_is_prefilled_a_chunk_at_a_time_and_decodes_as_if_at_once():
    request = SessionRequest("walk to the red ball and then " * 12, settings=REQUEST.settings)
    whole = target_alone(TargetEngine(tiny_causal_lm(), prefill_chunk_tokens=0), request)
    adapter = tiny_causal_lm()
    fed = _fed_lengths(adapter)
    engine = TargetEngine(adapter, prefill_chunk_tokens=16)
    pending = engine.begin_session(request)
    while not engine.prefill_step(pending):
        pass
    engine.close_session(engine.finish_session(pending))
    prefilled = pending.prompt_tokens - 1  # the last prompt id is fed with the first block
    assert max(fed) <= 16 and sum(fed) == prefilled and len(fed) >= math.ceil(prefilled / 16)
    assert target_alone(engine, request) == whole


def test_an_image_prompt_prefills_every_image_token_in_its_first_chunk():
    request = SessionRequest("what is in front of you", image=jpeg(), settings=REQUEST.settings)
    whole = target_alone(TargetEngine(tiny_vlm(), prefill_chunk_tokens=0), request)
    adapter = tiny_vlm()
    engine = TargetEngine(adapter, prefill_chunk_tokens=2)
    ids = adapter.encode(request).ids
    image = adapter.model.config.image_token_id
    fed = _fed_lengths(adapter)
    assert target_alone(engine, request) == whole
    assert fed[0] == max(2, max(i for i, t in enumerate(ids) if t == image) + 1)


# ---- the server's limits ----------------------------------------------------------------------
def test_a_session_limit_that_leaves_no_rpc_slot_free_is_refused_at_start():
    with pytest.raises(ConfigError, match="RPC slots"):
        ServerConfig(workers=16, limits=ServerLimits(max_sessions=14, max_sessions_per_client=4)).validate()
    ServerConfig(workers=16, limits=ServerLimits(max_sessions=10, max_sessions_per_client=4)).validate()


@pytest.fixture(scope="module")
def models():
    target, draft = tiny_pair()
    return slow_down(target, SECONDS_PER_TOKEN), draft


@pytest.fixture(scope="module")
def server(models):
    engine = TargetEngine(models[0])
    limits = ServerLimits(max_sessions=5, max_sessions_per_client=3, max_prompt_tokens=400, kv_budget_mb=1.0,
                    max_new_tokens=256)
    config = ServerConfig(bind="127.0.0.1:0", open_timeout_s=0.5, prefill_chunk_tokens=16, limits=limits)
    with serving(config, engine, tokens=f"robot:{TOKEN},other:{OTHER}") as handle:
        yield handle


def _address(server) -> str:
    return f"127.0.0.1:{server.port}"


def _long_prompt(adapter, tokens: int) -> str:
    """A prompt that is exactly ``tokens`` tokens once the chat template is applied."""
    words = tokens
    for _ in range(20):
        text = "go" + " left" * words
        n = len(adapter.encode(SessionRequest(text, settings=GenerationSettings(max_new_tokens=1))).ids)
        if n == tokens:
            return text
        words += tokens - n
    raise AssertionError(f"no prompt of exactly {tokens} tokens")


def test_streams_that_have_not_opened_count_against_their_clients_share(server):
    with grpc.insecure_channel(_address(server)) as channel:
        held = [RawStream(channel, token=OTHER) for _ in range(3)]
        time.sleep(0.2)
        refused = RawStream(channel, token=OTHER, hold=False).end()
        verifier = GrpcVerifier(_address(server), token=TOKEN)
        verifier.open(REQUEST).close()  # another client still gets in
        verifier.close()
        for stream in held:
            stream.hang_up()
    assert refused.code == "too_many_sessions" and refused.ended_after_s < 0.4
    assert "already holds 3 streams" in refused.details


def test_a_stream_that_sends_no_open_is_ended_at_the_open_timeout_not_the_idle_time(server):
    with grpc.insecure_channel(_address(server)) as channel:
        end = RawStream(channel, token=TOKEN).end()
    assert end.code == "open_timeout" and 0.4 < end.ended_after_s < 1.5


def test_the_server_limit_counts_every_clients_streams(server):
    with grpc.insecure_channel(_address(server)) as channel:
        held = [RawStream(channel, token=t) for t in (TOKEN, TOKEN, TOKEN, OTHER, OTHER)]
        time.sleep(0.2)
        end = RawStream(channel, token=OTHER, hold=False).end()
        for stream in held:
            stream.hang_up()
    assert end.code == "server_full" and "limit of 5 sessions" in end.details


def test_a_prompt_over_the_token_limit_is_refused_with_its_token_count(server, models):
    prompt = _long_prompt(models[0], 401)
    assert len(prompt) < ServerLimits().max_prompt_chars  # short in characters: the tokens decide
    end = raw_stream(_address(server), [open_message(SessionRequest(prompt=prompt))], token=TOKEN)
    assert end.code == "prompt_too_long"
    assert "401 tokens" in end.details and "limit is 400" in end.details


def test_a_session_whose_kv_cache_would_exceed_the_budget_is_refused(server, models):
    per_token = TargetEngine(models[0]).kv_bytes_per_token
    big = SessionRequest(prompt="turn left", settings=GenerationSettings(max_new_tokens=200))
    verifier = GrpcVerifier(_address(server), token=TOKEN)
    sessions = []
    try:
        # The client's share is 3/5 of 1 MB (614 tokens); each session reserves prompt + 200 + a block.
        for _ in range(2):
            sessions.append(verifier.open(big))
        reserved = server.metrics.kv_reserved_bytes._value.get()
        assert reserved > 2 * 200 * per_token
        end = raw_stream(_address(server), [open_message(big)], token=TOKEN)
        assert end.code == "kv_budget_exceeded" and "share" in end.details
    finally:
        for session in sessions:
            session.close()
        verifier.close()
    wait_for(lambda: not server.metrics.kv_reserved_bytes._value.get(), 5, step=0.05)
    assert server.metrics.kv_reserved_bytes._value.get() == 0


def test_a_client_that_leaves_mid_prefill_stops_it_within_a_chunk_and_gives_its_memory_back(server, models):
    prompt = _long_prompt(models[0], 400)  # 25 chunks of 16 tokens at 64 ms: 1.6 s
    with grpc.insecure_channel(_address(server)) as channel:
        stream = RawStream(channel, [open_message(SessionRequest(prompt=prompt))], token=TOKEN)
        time.sleep(0.4)
        assert server.metrics.kv_reserved_bytes._value.get() > 0
        stream.hang_up()
        left = time.monotonic()
        # The next Open waits at most for the chunk in progress, not for the rest of the prompt.
        verifier = GrpcVerifier(_address(server), token=OTHER)
        verifier.open(REQUEST).close()
        verifier.close()
        assert time.monotonic() - left < 0.8
    time.sleep(0.2)
    assert server.metrics.kv_reserved_bytes._value.get() == 0


def test_stopping_the_server_during_a_long_prefill_takes_a_chunk_not_the_prefill(models, monkeypatch):
    monkeypatch.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{TOKEN}")
    config = ServerConfig(bind="127.0.0.1:0", prefill_chunk_tokens=16, limits=ServerLimits(max_prompt_tokens=400))
    handle = serve(config, engine=TargetEngine(models[0]))
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stream = RawStream(channel, [open_message(SessionRequest(prompt=_long_prompt(models[0], 400)))],
                           token=TOKEN)
        time.sleep(0.4)
        start = time.monotonic()
        handle.stop(grace=0.5)
        stopped = time.monotonic() - start
        end = stream.end()
    assert end.code == "server_shutdown" and end.status == grpc.StatusCode.UNAVAILABLE
    assert stopped < 0.6  # one 64 ms chunk, and a grace of 0.5 s that nothing needs; the prefill is 1.6 s


def test_the_allocator_gives_memory_back_to_the_os_after_long_sessions_end(models, monkeypatch):
    from speculative_vlm.cloud import service

    trims = []
    monkeypatch.setattr(service, "TRIM_AFTER_BYTES", 100 * 1024)  # a tiny model's long session
    monkeypatch.setattr(service, "return_free_memory", lambda: trims.append(time.monotonic()))
    monkeypatch.setenv("SPECULATIVE_VLM_TOKENS", f"robot:{TOKEN}")
    handle = serve(ServerConfig(bind="127.0.0.1:0", session_idle_s=2.0, limits=ServerLimits(max_new_tokens=256)),
                   engine=TargetEngine(models[0]))
    verifier = GrpcVerifier(f"127.0.0.1:{handle.port}", token=TOKEN)
    try:
        verifier.open(REQUEST).close()  # reserves ~60 KB: no trim for it
        time.sleep(1.2)
        assert trims == []
        verifier.open(SessionRequest("turn left", settings=GenerationSettings(max_new_tokens=200))).close()
        closed = time.monotonic()
        time.sleep(1.2)  # the janitor runs every 0.5 s here
        assert len(trims) == 1 and trims[0] > closed
    finally:
        verifier.close()
        handle.stop()
