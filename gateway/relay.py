"""Relays a generation stream from the best host, failing over while no token was sent."""

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from opentelemetry import trace

from airouter import tracing
from airouter.errors import (
    AirouterError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from airouter.v1 import gateway_pb2, generate_pb2
from gateway import router
from gateway.config import OPENROUTER_PREFIX
from gateway.hosts import HostPool
from gateway.openai_protocol import OpenAIUpstream, UpstreamStreamError

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

# How long a request waits for a host to become available before it fails.
STARTUP_WAIT_S = 3.0
# Codes after which another host may well succeed; any other error is the request's own.
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class HostError(Exception):
    """A host rejected the request with a status that is the caller's to see."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class CloudRouting:
    """Where requests may run: the upstream for openrouter/ models, and which requests go
    there by policy (local_only, local_first, cloud_only) and to which cloud model."""

    upstream: OpenAIUpstream
    default_policy: str = "local_only"
    model_policies: dict[str, str] = field(default_factory=dict)
    cloud_models: dict[str, str] = field(default_factory=dict)

    def policy(self, request: gateway_pb2.GatewayGenerateRequest) -> str:
        if request.routing_policy:
            return _POLICY_NAMES[request.routing_policy]
        return self.model_policies.get(request.model, self.default_policy)


_POLICY_NAMES = {
    gateway_pb2.ROUTING_POLICY_LOCAL_ONLY: "local_only",
    gateway_pb2.ROUTING_POLICY_LOCAL_FIRST: "local_first",
    gateway_pb2.ROUTING_POLICY_CLOUD_ONLY: "cloud_only",
}
# Candidates in this tier or worse are saturated or must evict: local_first prefers the cloud.
_SATURATED_TIER = 3


async def relay_generate(
    pool: HostPool,
    request: gateway_pb2.GatewayGenerateRequest,
    time_left_s: float | None,
    cloud: CloudRouting | None = None,
    on_failover: Callable[[str], None] | None = None,
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    """Yields the stream of the host (or the cloud) that serves the request. Before the first
    message a host that is down or full is skipped for the next candidate; after it, a
    failure ends the stream with FINISH_REASON_ERROR."""
    deadline = None if time_left_s is None else time.monotonic() + time_left_s
    if not request.model:
        raise InvalidArgument("model is empty; name a model (`airouter models` lists them)")
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    requested = request.model
    log = _log.bind(request_id=request.request_id, model=requested)
    policy = cloud.policy(request) if cloud else "local_only"
    fallback = cloud.cloud_models.get(requested) if cloud else None
    if requested.startswith(OPENROUTER_PREFIX) or policy == "cloud_only":
        if cloud is None:
            raise Unavailable("this gateway has no upstream for openrouter/ models configured")
        if not requested.startswith(OPENROUTER_PREFIX):
            if fallback is None:
                raise FailedPrecondition(
                    f"{requested!r} is to run in the cloud but has no cloud model; add it to "
                    "cloud_models in gateway.toml, or ask for routing_policy local_only"
                )
            request.model = fallback
        async for response in relay_upstream(cloud.upstream, request, deadline):
            yield response
        return
    local_first = policy == "local_first" and fallback is not None and cloud is not None
    try:
        ranked = await _route(pool, request, deadline, log)
        if local_first and all(c.tier >= _SATURATED_TIER for c in ranked):
            raise ResourceExhausted("every host that serves it is saturated")
        async for response in _attempts(pool, request, ranked, deadline, log, on_failover):
            yield response
        return
    except (Unavailable, NotFound, ResourceExhausted) as exc:
        # _attempts raises these only before a first message was sent.
        if not local_first:
            raise
        assert cloud is not None and fallback is not None
        log.info("cloud_fallback", cloud_model=fallback, reason=str(exc))
        trace.get_current_span().add_event("cloud_fallback", {"airouter.reason": str(exc)})
    request.model = fallback
    async for response in relay_upstream(cloud.upstream, request, deadline):
        yield response


async def _route(
    pool: HostPool,
    request: gateway_pb2.GatewayGenerateRequest,
    deadline: float | None,
    log: Any,
) -> list[router.Candidate]:
    """The ranked candidates, traced and logged with the choice and why."""
    with _tracer.start_as_current_span("route") as span:
        ranked = await _candidates(pool, request, deadline)
        described = [c.describe() for c in ranked]
        span.set_attributes(
            {
                "airouter.route.chosen": ranked[0].host.address,
                "airouter.route.model": ranked[0].model.name,
                "airouter.route.reason": ranked[0].reason,
                "airouter.route.candidates": described,
            }
        )
        log.info(
            "route_chosen",
            host=ranked[0].host.address,
            served_model=ranked[0].model.name,
            reason=ranked[0].reason,
            candidates=described,
        )
    return ranked


async def _attempts(
    pool: HostPool,
    request: gateway_pb2.GatewayGenerateRequest,
    ranked: list[router.Candidate],
    deadline: float | None,
    log: Any,
    on_failover: Callable[[str], None] | None,
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    """Tries the candidates in order until one streams; see relay_generate."""
    requested = request.model
    failures: list[str] = []
    last_code = grpc.StatusCode.UNAVAILABLE
    for attempt, candidate in enumerate(ranked, start=1):
        host, name = candidate.host, candidate.model.name
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(
                f"the deadline passed before a host could serve {requested!r}; tried: "
                f"{'; '.join(failures) or 'none'}"
            )
        request.model = name  # a host knows its models by name, not by capability
        timeout = None if deadline is None else deadline - time.monotonic()
        with _tracer.start_as_current_span(
            f"attempt {host.address}",
            kind=trace.SpanKind.CLIENT,
            attributes={"server.address": host.address, "airouter.attempt": attempt},
        ) as span:
            call = host.generate(
                request, timeout=timeout, metadata=tracing.inject_metadata(host.metadata)
            )
            host.in_flight[name] = host.in_flight.get(name, 0) + 1
            started = finished = False
            try:
                async for response in merged_responses(call):
                    if response.HasField("finished"):
                        response.finished.host = host.address
                        finished = True
                    started = True
                    yield response
                if not finished:
                    pool.record_failure(host, "a stream ended without a result")
                    span.set_status(trace.StatusCode.ERROR, "no result")
                    yield _error_finish(host.address, "the host ended the stream without a result")
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                span.set_status(trace.StatusCode.ERROR, f"{code.name}: {exc.details()}")
                if started:
                    log.warning("host_failed_mid_stream", host=host.address, code=code.name)
                    pool.record_failure(host, f"failed mid-stream: {code.name}")
                    yield _error_finish(host.address, f"failed mid-stream: {exc.details()}")
                    return
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(
                        f"the deadline passed while waiting for host {host.address}: "
                        f"{exc.details()}"
                    ) from None
                if code not in _FAILOVER_CODES:
                    raise HostError(code, exc.details() or code.name) from None
                log.warning("host_failover", host=host.address, code=code.name)
                if on_failover is not None:
                    on_failover(host.address)
                failures.append(f"{host.address} ({code.name}: {exc.details()})")
                last_code = code
                if code == grpc.StatusCode.UNAVAILABLE:
                    pool.record_failure(host, f"{code.name}: {exc.details()}")
            finally:
                host.in_flight[name] -= 1
                call.cancel()  # no-op once finished; stops the host's decoding if cancelled
    if last_code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ResourceExhausted(
            f"every host that serves {requested!r} is full: {'; '.join(failures)}"
        )
    raise Unavailable(f"no host could serve {requested!r}; tried: {'; '.join(failures)}")


async def _candidates(
    pool: HostPool, request: gateway_pb2.GatewayGenerateRequest, deadline: float | None
) -> list[router.Candidate]:
    """The ranked candidates. While some host has not been contacted yet (the gateway has just
    started) a request nothing can serve waits for the pool's view to change, within its
    deadline and at most STARTUP_WAIT_S."""
    give_up = time.monotonic() + STARTUP_WAIT_S
    if deadline is not None:
        give_up = min(give_up, deadline)
    while True:
        try:
            return router.candidates(pool.hosts, request.model, request.min_context_length)
        except (Unavailable, NotFound):
            left = give_up - time.monotonic()
            if left <= 0 or all(h.contacted for h in pool.hosts):
                raise
            await pool.wait_for_change(left)


async def merged_responses(
    call: grpc.aio.UnaryStreamCall,
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    """The call's messages, read by a task of their own. Token deltas that arrive while earlier
    ones are still being written to the client go out as one message: a host that streams
    faster than the client takes tokens costs fewer writes, and nothing waits when it does not.
    Raises the call's error after the messages that came before it."""
    pending: deque[gateway_pb2.GatewayGenerateResponse] = deque()
    arrived = asyncio.Event()
    failure: list[grpc.aio.AioRpcError] = []
    done = False

    async def read() -> None:
        nonlocal done
        try:
            async for response in call:
                pending.append(response)
                arrived.set()
        except grpc.aio.AioRpcError as exc:
            failure.append(exc)
        finally:
            done = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            while pending:
                response = pending.popleft()
                if response.HasField("token") and pending and pending[0].HasField("token"):
                    texts, count = [response.token.text], response.token.token_count
                    while pending and pending[0].HasField("token"):
                        token = pending.popleft().token
                        texts.append(token.text)
                        count += token.token_count
                    response.token.text, response.token.token_count = "".join(texts), count
                yield response
            if done and not pending:
                if failure:
                    raise failure[0]
                return
    finally:
        reader.cancel()


def _error_finish(host: str, why: str) -> gateway_pb2.GatewayGenerateResponse:
    return gateway_pb2.GatewayGenerateResponse(
        finished=generate_pb2.Finished(
            reason=generate_pb2.FINISH_REASON_ERROR, error_message=f"host {host} {why}", host=host
        )
    )


# What Finished.host says of a request the upstream served.
UPSTREAM_HOST = "openrouter"
_FINISH_REASONS = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "error": generate_pb2.FINISH_REASON_ERROR,
}


async def relay_upstream(
    upstream: OpenAIUpstream, request: gateway_pb2.GatewayGenerateRequest, deadline: float | None
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    """Streams an `openrouter/<vendor>/<model>` request from the OpenAI-compatible upstream,
    in the gateway's messages. Errors before the first token are raised (mapped from the
    upstream's status); after it the stream ends with FINISH_REASON_ERROR."""
    path, body = openai_body(request)
    where = f"upstream {upstream.settings.base_url}"
    with _tracer.start_as_current_span(
        f"openrouter {body['model']}",
        kind=trace.SpanKind.CLIENT,
        attributes={"server.address": upstream.settings.base_url, "url.path": path},
    ) as span:
        stream = _upstream_stream(upstream, request, deadline, path, body, where)
        async with aclosing(stream):  # a client leaving closes the upstream response at once
            async for response in stream:
                if response.HasField("finished"):
                    span.set_attributes(tracing.finish_attributes(response.finished))
                    if response.finished.error_message:
                        span.set_status(trace.StatusCode.ERROR, response.finished.error_message)
                yield response


async def _upstream_stream(
    upstream: OpenAIUpstream,
    request: gateway_pb2.GatewayGenerateRequest,
    deadline: float | None,
    path: str,
    body: dict[str, Any],
    where: str,
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    started = time.monotonic()
    first_token_ms = 0.0
    finish = generate_pb2.Finished(reason=generate_pb2.FINISH_REASON_STOP, host=UPSTREAM_HOST)
    sent = False
    try:
        async for chunk in upstream.stream(path, body, deadline):
            if chunk.model:
                finish.model = chunk.model
            if chunk.text:
                if not sent:
                    first_token_ms = (time.monotonic() - started) * 1e3
                sent = True
                yield gateway_pb2.GatewayGenerateResponse(
                    token=generate_pb2.TokenDelta(text=chunk.text, token_count=1)
                )
            if chunk.finish_reason:
                finish.reason = _FINISH_REASONS.get(
                    chunk.finish_reason, generate_pb2.FINISH_REASON_STOP
                )
            if chunk.prompt_tokens is not None:
                finish.usage.prompt_tokens = chunk.prompt_tokens
                finish.usage.completion_tokens = chunk.completion_tokens or 0
                finish.usage.cost_usd = chunk.cost or 0.0
    except (UpstreamStreamError, AirouterError) as exc:
        if not sent:
            raise
        finish.reason = generate_pb2.FINISH_REASON_ERROR
        finish.error_message = f"{where} failed mid-stream: {exc}"
    total_ms = (time.monotonic() - started) * 1e3
    finish.timings.time_to_first_token_ms = first_token_ms
    finish.timings.total_ms = total_ms
    yield gateway_pb2.GatewayGenerateResponse(finished=finish)


def openai_body(request: gateway_pb2.GatewayGenerateRequest) -> tuple[str, dict[str, Any]]:
    """The OpenAI API path and JSON body for a gateway request: chat messages go to
    /chat/completions, a raw prompt to /completions."""
    body: dict[str, Any] = {"model": request.model.removeprefix(OPENROUTER_PREFIX)}
    if request.HasField("chat"):
        path = "/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    else:
        path = "/completions"
        body["prompt"] = request.prompt
    sampling = request.sampling
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        if sampling.HasField(name):
            body[name] = getattr(sampling, name)
    if request.stopping.HasField("max_tokens"):
        body["max_tokens"] = request.stopping.max_tokens
    if request.stopping.stop:
        body["stop"] = list(request.stopping.stop)
    return path, body
