"""The upstream client against a local OpenRouter-compatible server: streaming, keep-alive
comments, retries, errors before and after the first token, deadlines, connection reuse."""

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import structlog.testing

from airouter.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from gateway.server import start_gateway
from gateway.upstream import Chunk, OpenAIUpstream, UpstreamSettings, UpstreamStreamError
from tests.conftest import LoopThread, gateway_config
from tests.fake_openrouter import API_KEY, FakeOpenRouter
from tests.processes import free_port_address
from tests.streaming import collect, gateway_request

T = TypeVar("T")


def with_upstream(test: Callable[[OpenAIUpstream, FakeOpenRouter], Awaitable[T]]) -> T:
    async def run() -> T:
        server = FakeOpenRouter()
        await server.start()
        upstream = OpenAIUpstream(
            UpstreamSettings(api_key=API_KEY, base_url=server.base_url, backoff_s=(0.05, 0.2))
        )
        await upstream.start()
        try:
            return await test(upstream, server)
        finally:
            await upstream.close()
            await server.stop()

    return asyncio.run(run())


async def chunks(upstream: OpenAIUpstream, model: str, deadline_s: float = 10) -> list[Chunk]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    deadline = time.monotonic() + deadline_s
    return [c async for c in upstream.stream("/chat/completions", body, deadline)]


def test_a_stream_skips_keep_alives_and_ends_with_usage_and_cost() -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> list[Chunk]:
        return await chunks(upstream, "vendor/ok")

    got = with_upstream(test)
    assert "".join(c.text for c in got) == "Hello world"
    assert [c.finish_reason for c in got if c.finish_reason] == ["stop"]
    usage = got[-1]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cost) == (3, 2, 0.00012)


@pytest.mark.parametrize("behaviour", ["429-once", "500-once", "reset-once"])
def test_transient_failures_before_the_first_token_are_retried(behaviour: str) -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> tuple[str, int]:
        got = await chunks(upstream, f"vendor/{behaviour}")
        return "".join(c.text for c in got), server.calls[behaviour]

    text, calls = with_upstream(test)
    assert text == "Hello world" and calls == 2


def test_retry_after_is_honoured() -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> float:
        started = time.monotonic()
        await chunks(upstream, "vendor/429-once")
        return time.monotonic() - started

    assert with_upstream(test) >= 0.2  # the server asked for 0.2 s


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        ("400", InvalidArgument, "messages: must not be empty"),
        ("401", Unauthenticated, "Invalid API key"),
        ("402", ResourceExhausted, "Insufficient credits"),
        ("403", PermissionDenied, "flagged by moderation"),
    ],
)
def test_the_requests_own_errors_are_not_retried(status: str, error: type, message: str) -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> int:
        with pytest.raises(error) as info:
            await chunks(upstream, f"vendor/{status}")
        assert f"upstream answered {status}" in str(info.value) and message in str(info.value)
        return server.calls[status]

    assert with_upstream(test) == 1


@pytest.mark.parametrize(
    ("behaviour", "needle"),
    [
        ("error-mid", "provider crashed"),
        ("reset-mid", "broke mid-stream"),
        ("truncated", "ended the stream without [DONE] mid-stream"),
        ("garbled", "sent an event that is not a JSON object"),
    ],
)
def test_a_failure_after_the_first_token_ends_the_stream_with_an_error(
    behaviour: str, needle: str
) -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> tuple[list[str], str]:
        texts: list[str] = []
        body = {"model": f"vendor/{behaviour}", "messages": [{"role": "user", "content": "Hi"}]}
        with pytest.raises(UpstreamStreamError) as info:
            async for chunk in upstream.stream("/chat/completions", body, None):
                texts.append(chunk.text)
        return texts, str(info.value)

    texts, message = with_upstream(test)
    assert texts == ["Hello"]
    assert needle in message


def test_a_slow_first_byte_beyond_the_deadline_is_deadline_exceeded() -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> float:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await chunks(upstream, "vendor/slow", deadline_s=0.5)
        return time.monotonic() - started

    assert with_upstream(test) < 2


def test_an_upstream_that_stays_down_is_unavailable_after_the_retries() -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> None:
        await server.stop()
        with pytest.raises(Unavailable) as info:
            await chunks(upstream, "vendor/ok")
        assert "failed after 4 attempts" in str(info.value)

    with_upstream(test)


def test_sequential_requests_reuse_a_few_connections_and_never_log_the_key() -> None:
    async def test(upstream: OpenAIUpstream, server: FakeOpenRouter) -> int:
        for _ in range(100):
            await chunks(upstream, "vendor/ok")
        return len(server.connections)

    with structlog.testing.capture_logs() as logs:
        connections = with_upstream(test)
        with_upstream(lambda upstream, server: chunks(upstream, "vendor/429-once"))
    assert connections <= 2
    assert any(e["event"] == "upstream_retry" for e in logs)
    assert API_KEY not in repr(logs)


def test_without_a_key_nothing_is_sent() -> None:
    async def run() -> None:
        upstream = OpenAIUpstream(UpstreamSettings(api_key=None, base_url="http://127.0.0.1:1"))
        await upstream.start()
        try:
            with pytest.raises(Unauthenticated) as info:
                await chunks(upstream, "vendor/ok")
            assert "OPENROUTER_API_KEY" in str(info.value)
        finally:
            await upstream.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def cloud_gateway(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A gateway whose openrouter/ models go to the fake server (and no modelhost is up)."""
    loop = LoopThread()
    server = FakeOpenRouter()
    loop.run(server.start())
    key = tmp_path_factory.mktemp("key") / "openrouter-key"
    key.write_text(API_KEY)
    config = gateway_config(
        [free_port_address()],
        openrouter_base_url=server.base_url,
        openrouter_api_key_file=key,
        default_policy="local_first",
        allow_policy_override=True,
        # The local host never comes up: the cloud takes over after this wait for it.
        first_message_timeout_s=1.0,
        model_policies={"capability:code": "cloud_only"},
        cloud_models={
            "gemma-3-270m": "openrouter/vendor/ok",
            "capability:code": "openrouter/vendor/ok",
        },
    )
    gateway = loop.run(start_gateway(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    yield gateway_pb2_grpc.GatewayStub(channel), server
    channel.close()
    loop.run(gateway.stop(0))
    loop.run(server.stop())
    loop.close()


def test_openrouter_models_stream_through_the_gateway_with_usage_and_cost(cloud_gateway) -> None:  # type: ignore[no-untyped-def]
    stub, _ = cloud_gateway
    request = gateway_request(model="openrouter/vendor/ok", messages=[("user", "Hi")])
    result = collect(stub.Generate(request, timeout=30))
    assert result.text == "Hello world"
    finished = result.finished
    assert finished.reason == generate_pb2.FINISH_REASON_STOP
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (3, 2)
    assert finished.usage.cost_usd == pytest.approx(0.00012)
    assert finished.model == "vendor/ok" and finished.host == "openrouter"
    raw = collect(stub.Generate(gateway_request(model="openrouter/vendor/ok", prompt="Hi")))
    assert raw.text == "Hello world"  # a raw prompt goes to /completions


def test_openrouter_errors_keep_their_meaning_through_the_gateway(cloud_gateway) -> None:  # type: ignore[no-untyped-def]
    stub, _ = cloud_gateway
    for model, code in [
        ("openrouter/vendor/401", grpc.StatusCode.UNAUTHENTICATED),
        ("openrouter/vendor/402", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("openrouter/vendor/403", grpc.StatusCode.PERMISSION_DENIED),
        ("openrouter/vendor/400", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            collect(stub.Generate(gateway_request(model=model, prompt="Hi"), timeout=30))
        assert info.value.code() == code and "upstream answered" in info.value.details()
    # Every stream ends truthfully: an upstream that fails, stops short or garbles after the
    # first token ends with an error finish naming why, never a silent "stop".
    for behaviour, needle in [
        ("error-mid", "provider crashed"),
        ("truncated", "without [DONE]"),
        ("no-finish", "without a finish reason"),
        ("garbled", "not a JSON object"),
        ("null-choice", "choices[0] is not an object"),
        ("usage-number", "usage is not an object"),
        ("content-number", "content is not a string"),
        # aiohttp reads a line past its limit in pieces: the event is then no JSON.
        ("long-line", "not a JSON object"),
    ]:
        broken = collect(
            stub.Generate(gateway_request(model=f"openrouter/vendor/{behaviour}", prompt="Hi"))
        )
        assert broken.text.startswith("Hello")
        assert broken.finished.reason == generate_pb2.FINISH_REASON_ERROR, behaviour
        assert needle in broken.finished.error_message


def test_local_first_falls_back_to_the_cloud_model_when_no_host_can_serve(cloud_gateway) -> None:  # type: ignore[no-untyped-def]
    stub, _ = cloud_gateway
    result = collect(stub.Generate(gateway_request(model="gemma-3-270m", prompt="Hi")))
    assert result.text == "Hello world" and result.finished.host == "openrouter"


def test_policies_per_request_and_per_model(cloud_gateway) -> None:  # type: ignore[no-untyped-def]
    stub, _ = cloud_gateway
    local_only = gateway_request(model="gemma-3-270m", prompt="Hi")
    local_only.routing_policy = gateway_pb2.ROUTING_POLICY_LOCAL_ONLY
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Generate(local_only, timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # capability:code is cloud_only by the gateway's config.
    coded = collect(stub.Generate(gateway_request(model="capability:code", prompt="Hi")))
    assert coded.finished.host == "openrouter"
    nowhere = gateway_request(model="llama-70b", prompt="Hi")
    nowhere.routing_policy = gateway_pb2.ROUTING_POLICY_CLOUD_ONLY
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Generate(nowhere, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "add it to cloud_models" in info.value.details()


@pytest.mark.parametrize("behaviour", ["null-choice", "usage-number", "long-line"])
def test_a_malformed_upstream_event_ends_an_http_stream_with_an_error_and_done(
    tmp_path: Path, behaviour: str
) -> None:
    loop = LoopThread()
    server = FakeOpenRouter()
    loop.run(server.start())
    key = tmp_path / "openrouter-key"
    key.write_text(API_KEY)
    config = gateway_config(
        [free_port_address()],
        http_listen="127.0.0.1:0",
        openrouter_base_url=server.base_url,
        openrouter_api_key_file=key,
        cloud_allowed_models=["openrouter/vendor/*"],
    )
    gateway = loop.run(start_gateway(config))
    try:
        assert gateway.http is not None
        body = {"model": f"openrouter/vendor/{behaviour}", "prompt": "Hi", "stream": True}
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.http.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        assert json.loads(events[0])["choices"][0]["text"] == "Hello"
        assert "not of OpenAI's shape" in events[1] or "not a JSON object" in events[1]
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "error"
        assert events[-1] == "[DONE]"
        assert "Traceback" not in text
    finally:
        loop.run(gateway.stop(0))
        loop.run(server.stop())
        loop.close()
