"""The gateway relaying to real modelhosts over gRPC."""

import asyncio
import json
import signal
import urllib.error
import urllib.request
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import structlog.testing

from airouter.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    generate_pb2,
    model_host_pb2,
)
from airouter.v1.model_host_pb2 import ListModelsRequest
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from gateway.hosts import merged_responses
from gateway.server import start_gateway
from modelhost.config import HostConfig, ModelConfig
from modelhost.generation import Delta, Finish, FinishReason, Timings, merge_deltas
from modelhost.server import start_host
from tests.conftest import Stack, gateway_config, host_config, wait_until
from tests.processes import ServerProcess, free_port_address
from tests.streaming import collect, gateway_request, host_request


class ExtraGateway:
    """A second gateway over a chosen list of hosts, stopped when the test ends."""

    def __init__(self, stack: Stack, hosts: list[str], **config: object) -> None:
        self._stack = stack
        self.running = stack.loop.run(start_gateway(gateway_config(hosts, **config)))
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self._stack.loop.run(self.running.stop(0))


@pytest.fixture
def extra_gateway(stack: Stack):  # type: ignore[no-untyped-def]
    made: list[ExtraGateway] = []

    def make(hosts: list[str], **config: object) -> ExtraGateway:
        made.append(ExtraGateway(stack, hosts, **config))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


def test_gateway_relays_the_hosts_tokens(stack: Stack) -> None:
    fields = {"prompt": "The sun is", "max_tokens": 16, "temperature": 0.0}
    direct = collect(stack.host_stub.Generate(host_request(**fields)))
    relayed = collect(stack.gateway_stub.Generate(gateway_request(**fields)))
    # The second run reuses the first one's KV cells, and llama.cpp's CPU kernels are not
    # invariant to where cells lie (README "Determinism"), so the texts may part ways; the
    # stream's shape and the counts that matter are equal.
    assert relayed.text and len(relayed.deltas) <= 16
    assert relayed.finished.usage.prompt_tokens == direct.finished.usage.prompt_tokens
    assert relayed.finished.usage.completion_tokens == direct.finished.usage.completion_tokens
    assert relayed.finished.host == stack.host_address
    assert relayed.finished.model == "gemma-3-270m"


def test_count_tokens_counts_what_generate_reads_on_both_services(stack: Stack) -> None:
    request = gateway_request(prompt="The sun is", max_tokens=1, temperature=0.0)
    counted = stack.gateway_stub.CountTokens(gateway_pb2.GatewayCountTokensRequest(request=request))
    generated = collect(stack.gateway_stub.Generate(request))
    assert counted.input_tokens == generated.finished.usage.prompt_tokens > 2
    assert counted.model == "gemma-3-270m" and counted.host == stack.host_address
    on_host = stack.host_stub.CountTokens(
        model_host_pb2.CountTokensRequest(request=host_request(prompt="The sun is"))
    )
    assert on_host.input_tokens == counted.input_tokens and on_host.model == "gemma-3-270m"
    with pytest.raises(grpc.RpcError) as unknown:
        stack.gateway_stub.CountTokens(
            gateway_pb2.GatewayCountTokensRequest(request=gateway_request(model="x", prompt="y"))
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_stop_string_that_ended_a_stream_is_named(stack: Stack) -> None:
    fields = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 12, "temperature": 0.0}
    stopped = collect(stack.gateway_stub.Generate(gateway_request(stop=["@@", ","], **fields)))
    assert stopped.finished.reason == generate_pb2.FINISH_REASON_STOP
    assert stopped.finished.stop_sequence == "," and "," not in stopped.text
    plain = collect(stack.gateway_stub.Generate(gateway_request(**fields)))
    assert plain.finished.stop_sequence == ""


def test_gateway_lists_models_with_the_hosts_that_serve_them(stack: Stack) -> None:
    response = stack.gateway_stub.ListModels(gateway_pb2.GatewayListModelsRequest())
    models = {m.name: m for m in response.models}
    assert set(models) == {"gemma-3-270m", "gemma-one-slot"}
    assert list(models["gemma-3-270m"].hosts) == [stack.host_address]
    assert list(response.unreachable_hosts) == []


def test_gateway_merges_models_across_hosts_and_names_unreachable_ones(
    stack: Stack, extra_gateway
) -> None:  # type: ignore[no-untyped-def]
    dead = free_port_address()
    gateway = extra_gateway([stack.host_address, dead])
    response = gateway.stub.ListModels(gateway_pb2.GatewayListModelsRequest())
    assert {m.name for m in response.models} == {"gemma-3-270m", "gemma-one-slot"}
    assert list(response.unreachable_hosts) == [dead]


def test_unknown_model_is_not_found_naming_the_models(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        collect(stack.gateway_stub.Generate(gateway_request(model="gpt-7", prompt="hi")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-7" in info.value.details() and "gemma-3-270m" in info.value.details()


def test_empty_model_is_invalid(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        collect(stack.gateway_stub.Generate(gateway_request(model="", prompt="hi")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model is empty" in info.value.details()


def test_hosts_invalid_argument_reaches_the_client_unchanged(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        collect(stack.gateway_stub.Generate(gateway_request(prompt="hi", temperature=9.0)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.temperature" in info.value.details()


def test_no_reachable_host_is_unavailable_naming_the_hosts_tried(
    stack: Stack, extra_gateway
) -> None:  # type: ignore[no-untyped-def]
    dead = [free_port_address(), free_port_address()]
    # Hosts never up may still be starting: a request waits for them up to the first-message
    # budget (within its deadline), then says which hosts it tried.
    gateway = extra_gateway(dead, first_message_timeout_s=1.0)
    with pytest.raises(grpc.RpcError) as info:
        collect(gateway.stub.Generate(gateway_request(prompt="hi")))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert all(address in info.value.details() for address in dead)


def test_a_host_that_went_down_is_skipped_for_a_live_one(stack: Stack, extra_gateway) -> None:  # type: ignore[no-untyped-def]
    # A real host that lists the model, then stops: the gateway's catalog still names it.
    doomed = stack.loop.run(start_host(host_config(), "cpu"))
    doomed_address = f"127.0.0.1:{doomed.port}"
    gateway = extra_gateway([doomed_address, stack.host_address])
    gateway.stub.ListModels(gateway_pb2.GatewayListModelsRequest())
    stack.loop.run(doomed.stop(0))
    for _ in range(2):  # whichever host the rotation tries first, the live one answers
        result = collect(gateway.stub.Generate(gateway_request(prompt="hi", max_tokens=2)))
        assert result.finished.host == stack.host_address


def test_a_host_dying_mid_stream_ends_the_stream_with_an_error(stack: Stack, extra_gateway) -> None:  # type: ignore[no-untyped-def]
    doomed = stack.loop.run(start_host(host_config(), "cpu"))
    gateway = extra_gateway([f"127.0.0.1:{doomed.port}"])
    stream = gateway.stub.Generate(gateway_request(prompt="Count: 1, 2,", max_tokens=400))
    assert next(stream).HasField("token")
    stack.loop.run(doomed.stop(0))  # no grace: the host drops its streams
    result = collect(stream)
    assert result.finished.reason == generate_pb2.FINISH_REASON_ERROR
    assert "failed mid-stream" in result.finished.error_message
    assert result.finished.host == f"127.0.0.1:{doomed.port}"


def test_cancelling_at_the_gateway_cancels_on_the_host(stack: Stack) -> None:
    engine = stack.engine("gemma-3-270m")
    call = stack.gateway_stub.Generate(gateway_request(prompt="Count: 1, 2,", max_tokens=400))
    next(call)
    next(call)
    assert engine.load().slots_busy == 1
    call.cancel()
    wait_until(lambda: engine.load().slots_busy == 0, 5)


def test_deadline_reaches_the_host(stack: Stack) -> None:
    call = stack.gateway_stub.Generate(
        gateway_request(prompt="Count:", max_tokens=400), timeout=0.5
    )
    with pytest.raises(grpc.RpcError) as info:
        collect(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = stack.engine("gemma-3-270m")
    wait_until(lambda: engine.load().slots_busy == 0, 5)


def test_a_model_that_failed_to_load_is_unavailable_with_the_reason(
    stack: Stack, extra_gateway, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    config = HostConfig(
        listen="127.0.0.1:0", device="cpu", models=[ModelConfig(name="broken", path=broken)]
    )
    host = stack.loop.run(start_host(config, "cpu"))
    address = f"127.0.0.1:{host.port}"
    try:
        with grpc.insecure_channel(address) as channel:
            # Directly: the host waits for the load, then says why it failed.
            with pytest.raises(grpc.RpcError) as info:
                collect(ModelHostStub(channel).Generate(host_request(model="broken", prompt="hi")))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "'broken' failed to load" in info.value.details()
            assert str(broken) in info.value.details()
            models = ModelHostStub(channel).ListModels(ListModelsRequest()).models
            assert models[0].state == generate_pb2.MODEL_STATE_ERROR and models[0].state_detail
        # Through a gateway: no host can serve it, and the reason is passed on.
        gateway = extra_gateway([address])
        with pytest.raises(grpc.RpcError) as info:
            collect(gateway.stub.Generate(gateway_request(model="broken", prompt="hi")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            "failed to load on every host" in info.value.details()
            and address in info.value.details()
        )
    finally:
        stack.loop.run(host.stop(0))


class _QueuedCall:
    """Enough of a grpc.aio.UnaryStreamCall for merged_responses: messages as the test puts
    them in."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[object] = asyncio.Queue()

    async def read(self) -> object:
        return await self.messages.get()

    def cancelled(self) -> bool:
        return False


def test_tokens_that_wait_for_the_client_go_out_as_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the client side was slow, the relay reads the host on a task of its own; what
    piles up while the client side is busy again is merged, and nothing is lost or
    reordered."""
    monkeypatch.setattr("gateway.hosts.SLOW_WRITE_S", 0.0)  # every write counts as slow

    def token(text: str) -> model_host_pb2.GenerateResponse:
        return model_host_pb2.GenerateResponse(
            token=generate_pb2.TokenDelta(text=text, token_count=1)
        )

    async def relay() -> list[model_host_pb2.GenerateResponse]:
        call = _QueuedCall()
        call.messages.put_nowait(token("0"))
        received = []
        async for response in merged_responses(call):  # type: ignore[arg-type]
            received.append(response)
            if len(received) == 1:  # the client is busy while the host sends the rest
                for i in range(1, 30):
                    call.messages.put_nowait(token(f" {i}"))
                finished = generate_pb2.Finished(reason=generate_pb2.FINISH_REASON_LENGTH)
                call.messages.put_nowait(model_host_pb2.GenerateResponse(finished=finished))
                call.messages.put_nowait(grpc.aio.EOF)
        return received

    *deltas, last = asyncio.run(relay())
    assert last.HasField("finished")
    assert [d.token.token_count for d in deltas] == [1, 29]
    assert "".join(d.token.text for d in deltas) == " ".join(str(i) for i in range(30))


def test_merge_deltas_joins_runs_of_deltas_only() -> None:
    finish = Finish(FinishReason.LENGTH, 3, 3, Timings())
    merged = merge_deltas([Delta("a", 1), Delta("b", 1), finish, Delta("c", 1)])
    assert merged == [Delta("ab", 2), finish, Delta("c", 1)]


def test_a_draining_gateway_finishes_what_it_accepted_and_refuses_the_rest(stack: Stack) -> None:
    """SIGTERM with 8 streams on a 4-slot model, 4 of them still waiting for a token: all 8
    finish; new requests on both listeners are refused so clients go elsewhere."""
    gateway = ServerProcess("gateway", "serve", "--modelhost", stack.host_address)
    http_port = next(r["http_port"] for r in gateway.log if r["event"] == "gateway_serving")
    request = gateway_request(prompt="Once", max_tokens=24, ignore_eos=True, temperature=0.0)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            collect(stub.Generate(gateway_request(prompt="Hi", max_tokens=1), timeout=30))
            with ThreadPoolExecutor(8) as pool:
                streams = [
                    pool.submit(lambda: collect(stub.Generate(request, timeout=60)))
                    for _ in range(8)
                ]
                engine = stack.engine("gemma-3-270m")
                wait_until(lambda: (engine.load().slots_busy, engine.load().queued) == (4, 4))
                gateway.process.send_signal(signal.SIGTERM)
                wait_until(lambda: any(r["event"] == "draining" for r in list(gateway.log)))
                with pytest.raises(grpc.RpcError) as refused:
                    collect(stub.Generate(request, timeout=10))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.details()
                body = json.dumps({"model": "gemma-3-270m", "prompt": "Hi"}).encode()
                post = urllib.request.Request(
                    f"http://127.0.0.1:{http_port}/v1/completions", data=body
                )
                with pytest.raises(urllib.error.HTTPError) as busy:
                    urllib.request.urlopen(post, timeout=10)
                assert busy.value.code == 503
                results = [s.result() for s in streams]
        for result in results:
            assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
            assert result.finished.usage.completion_tokens == 24
        assert gateway.process.wait(timeout=30) == 0
    finally:
        if gateway.process.poll() is None:
            gateway.kill()


def test_an_oversized_request_is_refused_at_the_gateway_naming_the_limit(stack: Stack) -> None:
    """Never sent to each host in turn (each would refuse it as too large, RESOURCE_EXHAUSTED)
    nor to the cloud."""
    with pytest.raises(grpc.RpcError) as error:
        collect(stack.gateway_stub.Generate(gateway_request(prompt="x" * (5 << 20)), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4 MiB" in error.value.details()


def test_an_unknown_enum_value_is_invalid_argument_not_unknown(stack: Stack) -> None:
    request = gateway_request(prompt="Hi", max_tokens=1)
    request.routing_policy = 99  # type: ignore[assignment]
    with pytest.raises(grpc.RpcError) as error:
        collect(stack.gateway_stub.Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "routing_policy 99 is unknown" in error.value.details()


def test_a_request_sent_before_its_host_listens_waits_for_it(stack: Stack, extra_gateway) -> None:  # type: ignore[no-untyped-def]
    """`airouter up` starts the host and the gateway together: a request that arrives first
    waits for the host within its deadline instead of an immediate UNAVAILABLE."""
    address = free_port_address()
    gateway = extra_gateway([address])
    listed = gateway_pb2.ListHostsRequest()
    # The gateway has tried the host and found nothing listening.
    wait_until(lambda: gateway.stub.ListHosts(listed, timeout=10).hosts[0].state_detail)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(
            lambda: collect(
                gateway.stub.Generate(gateway_request(prompt="Hi", max_tokens=2), timeout=30)
            )
        )
        # A host slower to start than the 3 s the gateway used to wait: the request waits
        # within its deadline (and the first-message budget) for it.
        done, _ = futures.wait([reply], timeout=3.5)
        assert not done, reply.exception() or reply.result()
        config = host_config().model_copy(update={"listen": address})
        host = stack.loop.run(start_host(config, "cpu"))
        try:
            assert reply.result(timeout=30).finished.usage.completion_tokens == 2
        finally:
            stack.loop.run(host.stop(0))


def test_a_completed_stream_is_never_counted_as_cancelled(stack: Stack) -> None:
    """The gateway lets a call that has delivered its last message end by itself; cancelling
    it then made the host log (and count) about 1 in 120 finished requests as cancelled."""
    with structlog.testing.capture_logs() as logs:
        for i in range(40):
            collect(stack.gateway_stub.Generate(gateway_request(prompt=f"Hi {i}", max_tokens=2)))
        # The host logs each request's end after its last message: one line per request,
        # finished or cancelled.
        wait_until(lambda: sum(e["event"].startswith("generation_") for e in list(logs)) >= 40)
    events = [e["event"] for e in logs]
    assert events.count("generation_finished") >= 40
    assert "generation_cancelled" not in events
