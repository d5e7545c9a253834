"""Refusals end their stream with the matching gRPC status (so proxies and gRPC metrics see
them), keeping the reason as the status details and the project's code in the trailing
metadata; the in-band Error message still comes first. The client maps a refusal to the same
typed error whichever of the two it reads."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cloud_harness import RawStream, draft_message, open_message, raw_stream, serving
from speculative_vlm.cloud.config import ServerConfig, ServerLimits
from speculative_vlm.decoding.target_engine import TargetEngine
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    EmptyPrompt,
    GenerationSettings,
    InvalidArgument,
    LinkLost,
    PromptTooLong,
    Refused,
    SessionNotFound,
    SessionRequest,
)
from speculative_vlm.protocol import errors
from speculative_vlm.protocol import verifier_pb2 as pb
from speculative_vlm.protocol.client import GrpcVerifier

TOKEN, OTHER = "status-codes-token-0123456789abcd", "status-codes-other-0123456789abcd"
REQUEST = SessionRequest(prompt="turn left", settings=GenerationSettings(max_new_tokens=8))
S = grpc.StatusCode


@pytest.fixture(scope="module")
def server(models):
    with serving(ServerConfig(bind="127.0.0.1:0", open_timeout_s=0.5,
                              limits=ServerLimits(max_sessions_per_client=2, max_prompt_tokens=64)),
                 TargetEngine(models[0]), tokens=f"robot:{TOKEN},other:{OTHER}") as handle:
        yield handle


def _address(server) -> str:
    return f"127.0.0.1:{server.port}"


def test_a_refused_stream_ends_with_the_codes_status_reason_and_code_after_the_error_message(server):
    end = raw_stream(_address(server), [b"\xff\xff not protobuf"], token=TOKEN)
    assert [r.error.code for r in end.replies] == ["malformed"]
    assert end.status == S.INVALID_ARGUMENT and end.code == "malformed"
    assert end.details == end.replies[0].error.reason


def test_a_wrong_token_ends_the_stream_unauthenticated(server):
    end = raw_stream(_address(server), [open_message(REQUEST)], token="not-a-token-of-this-server")
    assert (end.status, end.code) == (S.UNAUTHENTICATED, "unauthenticated")
    assert "unknown token" in end.details


def test_a_prompt_over_the_token_limit_ends_invalid_argument(server):
    end = raw_stream(_address(server), [open_message(SessionRequest(prompt="go left " * 40))], token=TOKEN)
    assert (end.status, end.code) == (S.INVALID_ARGUMENT, "prompt_too_long")


def test_a_draft_before_open_ends_not_found(server):
    end = raw_stream(_address(server), [draft_message(DraftBlock(0, 0, (), (1, 2)))], token=TOKEN)
    assert (end.status, end.code) == (S.NOT_FOUND, "no_session")


def test_a_second_open_on_one_stream_ends_failed_precondition(server):
    end = raw_stream(_address(server), [open_message(REQUEST), open_message(REQUEST)], token=TOKEN)
    assert [r.WhichOneof("kind") for r in end.replies] == ["opened", "error"]
    assert (end.status, end.code) == (S.FAILED_PRECONDITION, "already_open")


def test_a_stream_that_sends_no_open_ends_deadline_exceeded(server):
    with grpc.insecure_channel(_address(server)) as channel:
        end = RawStream(channel, token=TOKEN).end()
    assert (end.status, end.code) == (S.DEADLINE_EXCEEDED, "open_timeout")


def test_streams_over_the_clients_share_end_resource_exhausted(server):
    with grpc.insecure_channel(_address(server)) as channel:
        held = [RawStream(channel, [open_message(REQUEST)], token=OTHER) for _ in range(2)]
        time.sleep(0.3)
        end = RawStream(channel, [open_message(REQUEST)], token=OTHER, hold=False).end()
        for stream in held:
            stream.hang_up()
    assert (end.status, end.code) == (S.RESOURCE_EXHAUSTED, "too_many_sessions")


def test_a_session_closed_by_its_robot_ends_ok(server):
    close = pb.ClientMessage(close=pb.Close()).SerializeToString()
    end = raw_stream(_address(server), [open_message(REQUEST), close], token=TOKEN)
    assert [r.WhichOneof("kind") for r in end.replies] == ["opened"]
    assert end.status == S.OK and end.code is None


def test_the_client_raises_the_same_typed_error_for_the_in_band_error(server):
    verifier = GrpcVerifier(_address(server), token=TOKEN)
    with pytest.raises(PromptTooLong) as refused:
        verifier.open(SessionRequest(prompt="go left " * 40))
    verifier.close()
    assert refused.value.code == "prompt_too_long" and "tokens" in refused.value.reason


# A server that answers every stream with a status only, as a proxy or another implementation may.
@pytest.fixture
def status_only_server():
    answer: dict = {}

    def session(requests, context):
        next(requests, None)
        if answer.get("code"):
            context.set_trailing_metadata(errors.trailing_metadata(answer["code"]))
        context.abort(answer["status"], answer["details"])
        yield  # a generator, as a stream handler is

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "speculative_vlm.v1.Verification", {"Session": grpc.stream_stream_rpc_method_handler(
            session, request_deserializer=pb.ClientMessage.FromString,
            response_serializer=pb.ServerMessage.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, answer
    server.stop(0)


@pytest.mark.parametrize("code, exception", [
    ("prompt_too_long", PromptTooLong), ("empty_prompt", EmptyPrompt), ("invalid_argument", InvalidArgument),
    ("session_expired", SessionNotFound), ("server_shutdown", LinkLost), ("kv_budget_exceeded", Refused),
])
def test_the_client_maps_a_status_with_a_code_to_the_codes_typed_error(status_only_server, code, exception):
    port, answer = status_only_server
    answer.update(status=errors.status_for(code), details="why it was refused", code=code)
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=TOKEN, open_timeout_s=2, backoff_initial_s=0.05)
    with pytest.raises(exception) as raised:
        verifier.open(REQUEST)
    verifier.close()
    assert type(raised.value) is exception and "why it was refused" in str(raised.value)
    if isinstance(raised.value, Refused):
        assert raised.value.code == code


@pytest.mark.parametrize("status, expected_code", [(S.RESOURCE_EXHAUSTED, "resource_exhausted"),
                                                   (S.UNAUTHENTICATED, "unauthenticated")])
def test_the_client_maps_a_bare_status_by_the_status(status_only_server, status, expected_code):
    port, answer = status_only_server
    answer.update(status=status, details="said by a proxy", code=None)
    verifier = GrpcVerifier(f"127.0.0.1:{port}", token=TOKEN, open_timeout_s=2)
    with pytest.raises(Refused) as refused:
        verifier.open(REQUEST)
    verifier.close()
    assert refused.value.code == expected_code


def test_every_code_the_table_lists_ends_with_a_non_ok_status_and_a_typed_error():
    for kind in errors.ERRORS.values():
        assert kind.status is not S.OK, kind.code
        exc = errors.exception_for(kind.code, "reason")
        assert isinstance(exc, kind.exception) and "reason" in str(exc)

