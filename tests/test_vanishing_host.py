"""A host that vanishes without a TCP reset (a closed lid, a paused VM, a pulled cable), played
by a proxy that stops forwarding and closes nothing: the WatchStatus watchdog marks it down
within 3 s, the next request goes to the other host, and a stream it was serving ends with an
`error` finish instead of waiting for its deadline. And the other way round: a host notices
a client (a gateway) that vanished through keepalive, and frees the slot."""

import time
from collections.abc import Iterator

import grpc
import pytest
import structlog.testing

from airouter import grpc_server
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from gateway.server import RunningGateway, start_gateway
from modelhost.server import start_host
from tests.conftest import LoopThread, Stack, gateway_config, host_config, wait_until
from tests.freezing_proxy import FreezingProxy
from tests.streaming import collect, gateway_request, host_request


@pytest.fixture
def proxy(stack: Stack) -> Iterator[FreezingProxy]:
    proxy = FreezingProxy(stack.host_address)
    yield proxy
    proxy.close()  # the host sees its connection end and cancels what it still decodes


def gateway_over(stack: Stack, hosts: list[str]) -> tuple[RunningGateway, grpc.Channel]:
    gateway = stack.loop.run(start_gateway(gateway_config(hosts)))
    return gateway, grpc.insecure_channel(f"127.0.0.1:{gateway.port}")


def host_states(stub: gateway_pb2_grpc.GatewayStub) -> dict[str, gateway_pb2.HostInfo]:
    return {h.address: h for h in stub.ListHosts(gateway_pb2.ListHostsRequest()).hosts}


def test_a_frozen_idle_host_is_down_within_3_s_and_the_other_serves(
    stack: Stack, proxy: FreezingProxy
) -> None:
    gateway, channel = gateway_over(stack, [proxy.address, stack.host_address])
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        wait_until(
            lambda: (
                all(h.state == gateway_pb2.HOST_STATE_UP for h in host_states(stub).values())
                and len(host_states(stub)) == 2
            )
        )
        proxy.freeze()
        frozen = time.monotonic()
        wait_until(
            lambda: host_states(stub)[proxy.address].state == gateway_pb2.HOST_STATE_DOWN, 10
        )
        assert time.monotonic() - frozen <= 3.5  # 3 status intervals, and scheduling
        assert "no status update for 3 s" in host_states(stub)[proxy.address].state_detail
        for _ in range(3):
            reply = collect(
                stub.Generate(
                    gateway_request(prompt="Hi", max_tokens=2, temperature=0.0), timeout=30
                )
            )
            assert reply.finished.host == stack.host_address
    finally:
        channel.close()
        stack.loop.run(gateway.stop(0))


def test_a_host_frozen_mid_stream_ends_the_stream_with_an_error_finish(
    stack: Stack, proxy: FreezingProxy
) -> None:
    gateway, channel = gateway_over(stack, [proxy.address])
    try:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        wait_until(lambda: host_states(stub)[proxy.address].state == gateway_pb2.HOST_STATE_UP)
        request = gateway_request(
            prompt="Once upon a time", max_tokens=400, ignore_eos=True, temperature=0.0
        )
        stream = stub.Generate(request, timeout=120)
        assert next(stream).HasField("token")
        proxy.freeze()
        frozen = time.monotonic()
        rest = list(stream)
        assert time.monotonic() - frozen <= 4.0
        finished = rest[-1].finished
        assert finished.reason == generate_pb2.FINISH_REASON_ERROR
        assert "stopped answering: no status update for 3 s" in finished.error_message
        assert proxy.address in finished.error_message
    finally:
        channel.close()
        stack.loop.run(gateway.stop(0))


def test_a_host_notices_a_vanished_client_through_keepalive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway behind a link that froze: the host's keepalive pings go unanswered, it ends
    the call and frees the slot instead of decoding to the end for nobody (here with 1 s pings
    instead of 20 s, to stay short)."""
    monkeypatch.setattr(
        grpc_server,
        "SERVER_KEEPALIVE",
        [
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.http2.ping_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    loop = LoopThread()
    host = loop.run(start_host(host_config(), "cpu"))
    proxy = FreezingProxy(f"127.0.0.1:{host.port}")
    channel = grpc.insecure_channel(proxy.address)
    try:
        with structlog.testing.capture_logs() as logs:
            request = host_request(prompt="Once", max_tokens=500, ignore_eos=True)
            stream = ModelHostStub(channel).Generate(request, timeout=120)
            assert next(stream).HasField("token")
            engine = host.residency.resolve("gemma-3-270m").engine
            assert engine is not None and engine.load().slots_busy == 1
            proxy.freeze()
            wait_until(lambda: engine.load().slots_busy == 0, timeout=30)
        events = [e["event"] for e in logs]
        assert "generation_cancelled" in events and "generation_finished" not in events
    finally:
        channel.close()
        proxy.close()
        loop.run(host.stop(0))
        loop.close()
