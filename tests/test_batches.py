"""Batches through a real gateway and modelhost: durable submit, results once each, slots
filled but never overfilled, retries, cancellation, and a gateway killed mid-batch."""

import json
import time
from pathlib import Path

import grpc
import pytest

from airouter import cli
from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import Stack, scrape_metrics, wait_until
from tests.processes import ServerProcess, free_port_address
from tests.streaming import collect, gateway_request

SUCCEEDED = gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED


def items(count: int, **fields: object) -> list[gateway_pb2.BatchItem]:
    fields.setdefault("max_tokens", 4)
    fields.setdefault("temperature", 0.0)
    return [
        gateway_pb2.BatchItem(
            custom_id=f"item-{i}", request=gateway_request(prompt=f"Item {i}:", **fields)
        )
        for i in range(count)
    ]


def submit(stub: gateway_pb2_grpc.GatewayStub, batch: list[gateway_pb2.BatchItem], batch_id=""):  # type: ignore[no-untyped-def]
    request = gateway_pb2.SubmitBatchRequest(batch_id=batch_id, items=batch)
    return stub.SubmitBatch(request, timeout=30).batch


def results(stub: gateway_pb2_grpc.GatewayStub, batch_id: str, after: int = 0):  # type: ignore[no-untyped-def]
    request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch_id, after_sequence=after)
    return list(stub.StreamBatchResults(request, timeout=120))


def test_every_item_gets_one_result_in_sequence_and_the_text_a_request_gets(stack: Stack) -> None:
    stub = stack.gateway_stub
    batch = submit(stub, items(10))
    assert batch.state == gateway_pb2.BATCH_STATE_IN_PROGRESS and batch.counts.total == 10
    streamed = results(stub, batch.id)
    assert [m.result.sequence for m in streamed] == list(range(1, 11))
    assert sorted(m.result.index for m in streamed) == list(range(10))
    assert all(m.result.state == SUCCEEDED and m.result.attempts == 1 for m in streamed)
    assert all(m.result.finished.usage.completion_tokens == 4 for m in streamed)
    assert streamed[-1].counts.succeeded == 10 and streamed[-1].counts.pending == 0
    # The item ran as the same request runs on its own: same prompt, same length. (Its
    # greedy text can differ in a rare token: batch composition changes float sums.)
    first = next(m.result for m in streamed if m.result.index == 3)
    alone = collect(stack.gateway_stub.Generate(items(10)[3].request, timeout=30))
    assert first.custom_id == "item-3" and first.text
    assert first.finished.usage.prompt_tokens == alone.finished.usage.prompt_tokens
    assert first.finished.usage.completion_tokens == alone.finished.usage.completion_tokens

    done = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
    assert done.state == gateway_pb2.BATCH_STATE_COMPLETED and done.counts.succeeded == 10
    assert done.HasField("finished_at")
    # A client that lost its stream resumes after the last sequence it saw.
    rest = results(stub, batch.id, after=7)
    assert [m.result.sequence for m in rest] == [8, 9, 10]
    listed = stub.ListBatches(gateway_pb2.ListBatchesRequest()).batches
    assert batch.id in [b.id for b in listed]


def test_items_fill_the_free_slots_and_never_more(stack: Stack) -> None:
    """gemma-3-270m has 4 slots on the stack's host: the batch keeps 4 items running."""
    stub = stack.gateway_stub
    batch = submit(stub, items(16, max_tokens=12, ignore_eos=True))
    running = []
    request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id)
    for message in stub.StreamBatchResults(request, timeout=120):
        running.append(message.counts.running)
    assert max(running) <= 4
    assert max(running) >= 3  # one finishing item frees a slot the next one takes at once


def test_resubmitting_the_same_batch_id_is_safe_and_other_items_are_refused(stack: Stack) -> None:
    stub = stack.gateway_stub
    first = submit(stub, items(3), batch_id="nightly-2026-11-26")
    again = submit(stub, items(3), batch_id="nightly-2026-11-26")
    assert again.id == first.id and again.counts.total == 3
    assert len(results(stub, first.id)) == 3
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, items(4), batch_id="nightly-2026-11-26")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "choose another batch_id" in info.value.details()


@pytest.mark.parametrize(
    ("batch", "batch_id", "message"),
    [
        ([], "", "no items"),
        (items(2) + items(1), "", "'item-0' is used twice"),
        ([gateway_pb2.BatchItem(request=gateway_request(prompt="x"))], "", "custom_id is empty"),
        ([gateway_pb2.BatchItem(custom_id="a", request=gateway_request())], "", "neither"),
        (
            [gateway_pb2.BatchItem(custom_id="a", request=gateway_request(model="", prompt="x"))],
            "",
            "model is empty",
        ),
        (items(1), "no spaces please", "letters, digits"),
        (
            [
                gateway_pb2.BatchItem(
                    custom_id="a",
                    request=gateway_pb2.GatewayGenerateRequest(
                        model="gemma-3-270m",
                        prompt="x",
                        routing_policy=99,  # type: ignore[arg-type]
                    ),
                )
            ],
            "",
            "items[0].request: routing_policy 99 is unknown",
        ),
    ],
)
def test_bad_batches_are_refused_naming_the_problem(
    stack: Stack, batch: list[gateway_pb2.BatchItem], batch_id: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        submit(stack.gateway_stub, batch, batch_id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_unknown_batches_are_not_found(stack: Stack) -> None:
    stub = stack.gateway_stub
    calls = [
        lambda: stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id="nope")),
        lambda: stub.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id="nope")),
        lambda: results(stub, "nope"),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "airouter batch list" in info.value.details()


def test_an_item_that_cannot_run_fails_alone_without_retries(stack: Stack) -> None:
    stub = stack.gateway_stub
    batch = items(3)
    batch[1].request.model = "no-such-model"
    batch[2].request.sampling.temperature = -1.0
    by_index = {m.result.index: m.result for m in results(stub, submit(stub, batch).id)}
    assert by_index[0].state == SUCCEEDED
    unknown, invalid = by_index[1], by_index[2]
    assert unknown.state == gateway_pb2.BATCH_ITEM_STATE_FAILED and unknown.attempts == 1
    assert unknown.error_code == "NOT_FOUND" and "no-such-model" in unknown.error_message
    assert invalid.error_code == "INVALID_ARGUMENT" and invalid.attempts == 1
    assert "temperature" in invalid.error_message


def test_cancel_stops_running_items_and_settles_every_item(stack: Stack) -> None:
    stub = stack.gateway_stub
    batch = submit(stub, items(20, model="gemma-one-slot", max_tokens=64, ignore_eos=True))
    stream = stub.StreamBatchResults(
        gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id), timeout=120
    )
    first = next(stream)
    assert first.result.state == SUCCEEDED
    cancelled = stub.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id=batch.id)).batch
    assert cancelled.state == gateway_pb2.BATCH_STATE_CANCELLED
    counts = cancelled.counts
    assert counts.running == counts.pending == 0
    assert counts.succeeded + counts.cancelled == 20 and counts.cancelled >= 18
    rest = [m.result for m in stream]  # the stream ends once every item has its result
    assert len(rest) == 19
    assert {r.error_code for r in rest if r.state == gateway_pb2.BATCH_ITEM_STATE_CANCELLED} == {
        "CANCELLED"
    }
    # The host stopped the running item: its one slot is free for the next request at once.
    wait_until(lambda: stack.engine("gemma-one-slot").load().slots_busy == 0, timeout=5)
    again = stub.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id=batch.id)).batch
    assert again.state == gateway_pb2.BATCH_STATE_CANCELLED  # cancelling twice is harmless


def test_a_completed_batch_cannot_be_cancelled(stack: Stack) -> None:
    stub = stack.gateway_stub
    done = submit(stub, items(1))
    results(stub, done.id)
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id=done.id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already completed" in info.value.details()


def test_a_gateway_killed_mid_batch_resumes_with_nothing_lost_or_repeated(
    stack: Stack, tmp_path: Path
) -> None:
    database = str(tmp_path / "batches.sqlite3")
    gateway = ServerProcess(
        "gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database
    )
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    batch = submit(stub, items(24, max_tokens=16, ignore_eos=True), batch_id="survivor")
    before = []
    for message in stub.StreamBatchResults(
        gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id), timeout=120
    ):
        before.append(message.result)
        if len(before) == 6:
            break
    gateway.kill()
    channel.close()

    # The same database, on another port: a second gateway on it would be refused.
    restarted = ServerProcess(
        "gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database
    )
    try:
        assert any(r["event"] == "batches_resumed" for r in restarted.log)
        with grpc.insecure_channel(restarted.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            after = [m.result for m in results(stub, batch.id)]
            final = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
    finally:
        restarted.stop()
    assert [r.sequence for r in after] == list(range(1, 25))
    assert sorted(r.custom_id for r in after) == sorted(f"item-{i}" for i in range(24))
    assert after[:6] == before  # what was announced before the kill is what is stored
    assert all(r.state == SUCCEEDED for r in after)
    assert final.state == gateway_pb2.BATCH_STATE_COMPLETED and final.counts.succeeded == 24


def test_one_database_serves_one_gateway(stack: Stack, tmp_path: Path) -> None:
    database = str(tmp_path / "batches.sqlite3")
    first = ServerProcess(
        "gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database
    )
    try:
        with pytest.raises(AssertionError, match="exit code 2"):
            ServerProcess(
                "gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database
            )
    finally:
        first.stop()


def test_items_that_fail_on_a_dying_host_are_retried_and_counted(tmp_path: Path) -> None:
    """The only host dies mid-batch and comes back: running items fail, wait out their
    backoff (others wait for a host rather than fail) and all succeed in the end."""
    address = free_port_address()
    host = ServerProcess("modelhost", "serve", listen=address)
    gateway = ServerProcess("gateway", "serve", "--modelhost", address)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            batch = submit(stub, items(12, max_tokens=48, ignore_eos=True))
            stream = stub.StreamBatchResults(
                gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id), timeout=120
            )
            first = next(stream)
            host.kill()
            host = ServerProcess("modelhost", "serve", listen=address)
            rest = [m.result for m in stream]
            metrics = _scrape(gateway)
    finally:
        gateway.stop()
        host.stop()
    assert [first.result.state, *(r.state for r in rest)] == [SUCCEEDED] * 12
    assert max(r.attempts for r in rest) >= 2
    assert metrics["airouter_gateway_batch_item_retries_total"] >= 1
    assert metrics['airouter_gateway_batch_items{state="succeeded"}'] == 12
    assert any(r["event"] == "batch_item_retry" for r in gateway.log)


def test_cli_runs_an_openai_batch_file(stack: Stack, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    requests = tmp_path / "requests.jsonl"
    lines = [
        {
            "custom_id": "chat-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gemma-3-270m",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 5,
            },
        },
        {
            "custom_id": "text-1",
            "url": "/v1/completions",
            "body": {"model": "gemma-3-270m", "prompt": "Once", "max_tokens": 5},
        },
        {
            "custom_id": "missing",
            "url": "/v1/completions",
            "body": {"model": "no-such-model", "prompt": "x", "max_tokens": 5},
        },
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    code = cli.main(
        [
            "--gateway",
            stack.gateway_address,
            "batch",
            "submit",
            str(requests),
            "--wait",
            "-o",
            str(output),
        ]
    )
    assert code == 1  # one item failed
    out = {
        json.loads(line)["custom_id"]: json.loads(line) for line in output.read_text().splitlines()
    }
    assert out["chat-1"]["response"]["status_code"] == 200
    assert out["chat-1"]["response"]["body"]["object"] == "chat.completion"
    assert out["chat-1"]["response"]["body"]["usage"]["completion_tokens"] >= 1
    assert out["text-1"]["response"]["body"]["object"] == "text_completion"
    assert out["missing"]["response"]["status_code"] == 404
    assert out["missing"]["response"]["body"]["error"]["code"] == "not_found"
    err = capsys.readouterr().err
    assert "2 succeeded, 1 failed, 0 cancelled of 3" in err

    batch_id = err.split()[0]
    assert cli.main(["--gateway", stack.gateway_address, "batch", "status", batch_id]) == 0
    assert "completed" in capsys.readouterr().out
    assert cli.main(["--gateway", stack.gateway_address, "batch", "list"]) == 0
    assert batch_id in capsys.readouterr().out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1: not JSON"),
        ('{"url": "/v1/completions", "body": {}}', "line 1: custom_id: required"),
        ('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "url '/v1/embeddings'"),
        (
            '{"custom_id": "a", "url": "/v1/completions", "body": {"model": "m"}}',
            "line 1: body: prompt: required",
        ),
        (
            '{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "m", '
            '"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}}',
            "line 1: body: messages[0].content: part 0: text must be a string",
        ),
        (
            '{"custom_id": "a", "url": "/v1/completions", '
            '"body": {"model": "m", "prompt": "x", "max_tokens": true}}',
            "line 1: body: max_tokens: Input should be a valid integer",
        ),
        # Escapes that decode to half a surrogate pair: UTF-8 on disk, but not text.
        (
            '{"custom_id": "a", "url": "/v1/completions", "body": {"model": "m", '
            '"prompt": "x\\udc80"}}',
            "line 1: body: the body holds a lone surrogate (\\udc80)",
        ),
        (
            '{"custom_id": "\\ud800", "url": "/v1/completions", '
            '"body": {"model": "m", "prompt": "x"}}',
            "line 1: custom_id holds a lone surrogate (\\ud800)",
        ),
    ],
)
def test_cli_refuses_a_bad_batch_file_naming_the_line(
    stack: Stack,
    tmp_path: Path,
    capsys,
    line: str,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(line + "\n")
    code = cli.main(["--gateway", stack.gateway_address, "batch", "submit", str(requests)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_file_that_is_not_utf8_naming_the_line(
    stack: Stack,
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    requests = tmp_path / "requests.jsonl"
    good = b'{"custom_id": "a", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}'
    requests.write_bytes(good + b"\n" + good.replace(b"x", b"\xff") + b"\n")
    code = cli.main(["--gateway", stack.gateway_address, "batch", "submit", str(requests)])
    assert code == 2
    assert "line 2: not UTF-8" in capsys.readouterr().err


def test_results_after_any_sequence_end_cleanly(stack: Stack) -> None:
    stub = stack.gateway_stub
    batch_id = submit(stub, items(1)).id
    wait_until(
        lambda: (
            stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch_id)).batch.state
            == gateway_pb2.BATCH_STATE_COMPLETED
        ),
        120,
    )
    for after in ((1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch_id, after_sequence=after)
        assert list(stub.StreamBatchResults(request, timeout=30)) == []


def _scrape(gateway: ServerProcess) -> dict[str, float]:
    port = next(r["http_port"] for r in gateway.log if r["event"] == "gateway_serving")
    return scrape_metrics(f"http://127.0.0.1:{port}/metrics")


def test_shutdown_ends_result_streams_so_clients_resume_with_the_next_gateway(
    stack: Stack, tmp_path: Path
) -> None:
    database = str(tmp_path / "batches.sqlite3")
    args = ("gateway", "serve", "--modelhost", stack.host_address, "--batch-db", database)
    gateway = ServerProcess(*args, "--shutdown-grace", "60")
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    batch = submit(stub, items(6, model="gemma-one-slot", max_tokens=24, ignore_eos=True))
    stream = stub.StreamBatchResults(
        gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id), timeout=120
    )
    first = next(stream).result
    started = time.monotonic()
    assert gateway.stop() == 0
    assert time.monotonic() - started < 30  # the open result stream did not hold the grace
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"after sequence {first.sequence}" in info.value.details()
    channel.close()

    restarted = ServerProcess(*args)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            rest = results(stub, batch.id, after=first.sequence)
    finally:
        restarted.stop()
    assert sorted(m.result.index for m in rest) == sorted(set(range(6)) - {first.index})
