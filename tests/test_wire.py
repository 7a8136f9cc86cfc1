"""The gateway's own types as airouter.v1 messages and back: nothing is lost either way, and
what the batch store kept before the gateway had its own types reads the same."""

from airouter.v1 import gateway_pb2
from gateway.batch_records import ItemResult, ItemState
from gateway.generation import (
    Finished,
    FinishReason,
    GenerateRequest,
    Policy,
    Routing,
    Sampling,
    Stopping,
    Timings,
    Usage,
)
from gateway.wire import (
    item_result_from_bytes,
    item_result_pb,
    request_bytes,
    request_from_bytes,
    request_from_pb,
    request_pb,
)

FULL = GenerateRequest(
    "m",
    messages=(("system", "be brief"), ("user", "héllo")),
    sampling=Sampling(0.5, 0.75, 7, 0.125, 1.25, 42),
    stopping=Stopping(9, ("END",), True),
    routing=Routing(Policy.CLOUD_ONLY, 1024, "alice@example.com"),
    request_id="r1",
)


def test_requests_survive_the_round_trip() -> None:
    for request in (FULL, GenerateRequest("m", prompt=""), GenerateRequest("m", messages=())):
        assert request_from_pb(request_pb(request)) == request
        assert request_from_bytes(request_bytes(request)) == request


def test_a_request_stored_as_the_gateway_s_message_reads_the_same() -> None:
    stored = gateway_pb2.GatewayGenerateRequest(model="m", prompt="Hi", conversation_id="c")
    stored.stopping.max_tokens = 4
    stored.sampling.temperature = 0.0
    read = request_from_bytes(stored.SerializeToString())
    assert read == GenerateRequest(
        "m",
        prompt="Hi",
        sampling=Sampling(temperature=0.0),
        stopping=Stopping(4),
        routing=Routing(conversation_id="c"),
    )


def test_results_survive_the_round_trip() -> None:
    finished = Finished(
        FinishReason.LENGTH, Usage(3, 4, 1, 0.5), Timings(1, 2, 3, 4, 5), "", "m", "h:1"
    )
    result = ItemResult("a", 3, ItemState.SUCCEEDED, 2, True, "text", finished, sequence=7)
    assert item_result_from_bytes(item_result_pb(result).SerializeToString()) == result
    failed = ItemResult("b", 0, ItemState.FAILED, 4, False, error_code="UNAVAILABLE")
    assert item_result_from_bytes(item_result_pb(failed).SerializeToString()) == failed


def test_an_unknown_finish_reason_is_an_error_that_says_so() -> None:
    pb = gateway_pb2.BatchItemResult(state=gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED)
    pb.finished.reason = 9  # type: ignore[assignment]
    finished = item_result_from_bytes(pb.SerializeToString()).finished
    assert finished is not None and finished.reason is FinishReason.ERROR
    assert "unknown finish reason (9)" in finished.error_message
