"""The gateway's one request path: resolve -> route -> attempt -> relay -> finish.

The gRPC servicer, the HTTP edge and the batch runner are adapters over GatewayService: they
turn their transport's request into a gateway.generation.GenerateRequest, iterate `generate`,
and turn its events and domain errors (airouter.errors) back into their transport's. Metrics observe
the path through a RequestObserver; tracing spans are opened here.

Before the first message a host that is down, full, silent past its first-message budget, or
that ends the request with an error and no token, is skipped for the next candidate, within the
caller's deadline; after it, a failure ends the stream with an `error` finish naming the cause.
"""

import asyncio
import fnmatch
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog
from opentelemetry import trace

from airouter import tracing
from airouter.errors import (
    AirouterError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    shown,
)
from airouter.prefix import NO_PREFIX, Prefix
from airouter.v1 import generate_pb2
from gateway import router
from gateway.config import OPENROUTER_PREFIX
from gateway.database import StoreUnavailable
from gateway.embeddings import Embeddings, EmbedRequest
from gateway.generation import (
    Event,
    Finished,
    FinishReason,
    GenerateRequest,
    Token,
    Usage,
    error_finish,
    request_prefix,
    validate,
)
from gateway.hosts import Host, HostPool
from gateway.key_store import KeyRecord
from gateway.keys import DEFAULT_RESERVE, Admission, KeyRing
from gateway.offload import heavy, off_loop
from gateway.prefixes import DEFAULT_PREFIX_POLICY, PrefixMemory, PrefixPolicy
from gateway.upstream import OpenAIUpstream, relay_upstream

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

# How long a listing right after start waits for hosts to be tried.
FIRST_CONTACT_WAIT_S = 3.0
# Seconds a stopping gateway waits for key usage still to be written to the store.
USAGE_FLUSH_S = 10.0
# Errors before the first token after which another host may well succeed.
_FAILOVER_ERRORS = (Unavailable, ResourceExhausted, Internal)
# Candidates in this tier or worse are saturated or must evict: local_first prefers the cloud.
_SATURATED_TIER = 3
# The label of a model name no host or cloud model answers to: clients choose names, and
# each would otherwise be a series of its own in /metrics.
UNKNOWN_MODEL = "(unknown)"
OTHER_CLOUD_MODEL = f"{OPENROUTER_PREFIX}(other)"

# When hosts disagree on a model's state, the merged entry shows the most usable one.
_STATE_RANK = {
    state: rank
    for rank, state in enumerate(
        [
            generate_pb2.MODEL_STATE_READY,
            generate_pb2.MODEL_STATE_LOADING,
            generate_pb2.MODEL_STATE_NOT_LOADED,
            generate_pb2.MODEL_STATE_UNLOADING,
            generate_pb2.MODEL_STATE_ERROR,
        ]
    )
}


@dataclass(frozen=True)
class CloudRouting:
    """Where requests may run: the upstream for openrouter/ models, and which requests go
    there by policy (local_only, local_first, cloud_only) and to which cloud model.

    Cloud spending is the operator's to allow: under a local_only policy a client may name
    only the openrouter/ models that allowed_models admits (shell-style patterns) or that
    cloud_models names; and the operator's policy wins over a request's routing_policy unless
    allow_policy_override, except that a request may always ask for local_only."""

    upstream: OpenAIUpstream
    default_policy: str = "local_only"
    model_policies: dict[str, str] = field(default_factory=dict)
    cloud_models: dict[str, str] = field(default_factory=dict)
    allowed_models: tuple[str, ...] = ()
    allow_policy_override: bool = False

    def policy(self, request: GenerateRequest) -> str:
        operator = self.model_policies.get(request.model, self.default_policy)
        if request.routing.policy is None:
            return operator
        asked = request.routing.policy.value
        return asked if asked == "local_only" or self.allow_policy_override else operator

    def check_allowed(self, model: str, policy: str) -> None:
        """Raises PermissionDenied when a client names an openrouter/ model the operator has
        not allowed."""
        if policy != "local_only" or model in self.cloud_models.values():
            return
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in self.allowed_models):
            return
        raise PermissionDenied(
            f"{shown(model)} runs in the cloud, and this gateway's policy for it is local_only; "
            "the operator can admit it with cloud_allowed_models in gateway.toml"
        )


class RequestObserver(Protocol):
    """What the request path reports as it goes (metrics implement it)."""

    def first_token(self, model: str, seconds: float) -> None: ...
    def finished(self, model: str, finished: Finished, seconds: float) -> None: ...
    def refused(self, model: str, error: AirouterError) -> None: ...
    def failed_over(self, host: str) -> None: ...
    def embedded(self, model: str, host: str, prompt_tokens: int, seconds: float) -> None: ...
    def key_used(self, key: str, model: str, usage: Usage) -> None: ...
    def cloud_fallback(self, model: str) -> None: ...


class GatewayService:
    def __init__(
        self,
        pool: HostPool,
        cloud: CloudRouting,
        observer: RequestObserver,
        first_message_s: float = 60.0,  # GatewayConfig.first_message_timeout_s
        prefix_policy: PrefixPolicy = DEFAULT_PREFIX_POLICY,
        keys: KeyRing | None = None,
    ) -> None:
        self.pool = pool
        self.keys = keys
        # Usage rows go to the key store in order, on a thread of their own.
        # Usage rows written to the store in order, off the request path.
        self._usage_writes: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._usage_writer: asyncio.Task[None] | None = None
        self.cloud = cloud
        self.observer = observer
        # The most an attempt waits for a host's first message before the next host is tried.
        self.first_message_s = first_message_s
        self.prefix_policy = prefix_policy
        self.prefixes = PrefixMemory()
        pool.on_retire(self.prefixes.forget)
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Shutdown begins: new requests are refused (UNAVAILABLE, HTTP 503), so clients go
        to another gateway; those accepted finish, whether streaming or waiting for a host."""
        self.draining = True

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet finished."""
        return self._in_flight

    async def drained(self) -> None:
        """Returns once no request is in flight."""
        await self._idle.wait()

    async def generate(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> AsyncGenerator[Event, None]:
        """The stream of the host (or the cloud) that serves the request; raises a domain
        error when it cannot be served before a first message."""
        started = time.perf_counter()
        label = self.model_label(request.model)
        first = True
        admission: Admission | None = None
        usage = Usage()
        self._in_flight += 1
        self._idle.clear()
        try:
            if self.draining:
                raise Unavailable("the gateway is shutting down; send the request to another")
            if heavy(request):
                await off_loop(validate, request)
            else:
                validate(request)
            if request.routing.key:  # what it may use is reckoned only for keyed requests
                most = request.size() + (request.stopping.max_tokens or DEFAULT_RESERVE) * (
                    request.output.n
                )
                admission = await self._admit(request.routing.key, request.model, most, time_left_s)
            async with aclosing(self._serve(request, time_left_s)) as responses:
                async for event in responses:
                    if first and isinstance(event, Token):
                        self.observer.first_token(label, time.perf_counter() - started)
                        first = False
                    elif isinstance(event, Finished):
                        self.observer.finished(label, event, time.perf_counter() - started)
                        usage = event.usage
                    yield event
        except AirouterError as exc:
            self.observer.refused(label, exc)
            raise
        finally:
            if admission is not None:
                self._settle(admission, label, usage)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def count_tokens(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> "TokenCount":
        """The request's prompt tokens, counted by a host that serves its model (the one its
        generation would go to first, else the next); local models only."""
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        if heavy(request):
            await off_loop(validate, request)
        else:
            validate(request)
        requested = request.model
        self.check_key_models(request.routing.key, {requested})
        if requested.startswith(OPENROUTER_PREFIX) or self.cloud.policy(request) == "cloud_only":
            raise FailedPrecondition(
                f"{shown(requested)} runs in the cloud, where tokens cannot be counted ahead; "
                "count with a local model"
            )
        log = _log.bind(request_id=request.request_id, model=requested)
        ranked = await self._route(request, deadline, log, await self._prefix(request))
        failures = []
        for candidate in ranked:
            host = candidate.host
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                on_host = request.with_model(candidate.model.name)
                tokens, model = await host.count_tokens(on_host, left)
            except (Unavailable, ResourceExhausted, DeadlineExceeded) as exc:
                failures.append(f"{host.address} ({exc.code}: {exc})")
                continue
            return TokenCount(tokens, model, host.address)
        raise Unavailable(
            f"no host could count tokens for {shown(requested)}; tried: "
            f"{'; '.join(failures) or 'none in time'}"
        )

    async def embed(
        self, request: EmbedRequest, time_left_s: float | None, carrier: Any = None
    ) -> Embeddings:
        """The request's embeddings from a host that serves its model, chosen by load; before
        an answer, a host that is down or full is skipped for the next. Local models only.
        Its span continues the caller's trace from `carrier` (gRPC metadata, HTTP headers)."""
        attributes = functools.partial(
            tracing.embed_attributes,
            model=request.model,
            inputs=len(request.inputs),
            request_id=request.request_id,
        )
        name = f"embeddings {request.model}"
        with tracing.request_span(_tracer, name, attributes, carrier) as span:
            made = await self._embed(request, time_left_s)
            span.set_attributes(
                tracing.embedded_attributes(
                    model=made.model, input_tokens=made.prompt_tokens, host=made.host
                )
            )
        return made

    async def _embed(self, request: EmbedRequest, time_left_s: float | None) -> Embeddings:
        started = time.perf_counter()
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        label = self.model_label(request.model)
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        log = _log.bind(request_id=request.request_id, model=request.model)
        admission: Admission | None = None
        usage = Usage()
        try:
            if self.draining:
                raise Unavailable("the gateway is shutting down; send the request to another")
            request.validate()
            if request.key:
                inputs = request.inputs
                most = sum(len(i.encode()) + 2 if isinstance(i, str) else len(i) for i in inputs)
                admission = await self._admit(request.key, request.model, most, time_left_s)
            if request.model.startswith(OPENROUTER_PREFIX):
                raise FailedPrecondition(
                    f"{shown(request.model)} is a cloud model; embeddings are made by local "
                    "hosts only: name a local embedding model"
                )
            ranked = await self._candidates(request.model, 0, deadline)
            failures = []
            for candidate in ranked:
                host = candidate.host
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    on_host = replace(request, model=candidate.model.name)
                    answer = await host.embed(on_host, left)
                except _FAILOVER_ERRORS as exc:
                    failures.append(f"{host.address} ({exc.code}: {exc})")
                    self.observer.failed_over(host.address)
                    continue
                log.info(
                    "embedded",
                    host=host.address,
                    inputs=len(request.inputs),
                    prompt_tokens=answer.prompt_tokens,
                )
                seconds = time.perf_counter() - started
                self.observer.embedded(label, host.address, answer.prompt_tokens, seconds)
                usage = Usage(prompt_tokens=answer.prompt_tokens)
                return answer
            raise Unavailable(
                f"no host could embed for {shown(request.model)}; tried: "
                f"{'; '.join(failures) or 'none in time'}"
            )
        except AirouterError as exc:
            self.observer.refused(label, exc)
            raise
        finally:
            if admission is not None:
                self._settle(admission, label, usage)

    def _key(self, name: str) -> KeyRecord:
        record = self.keys.get(name) if self.keys is not None else None
        if record is None:
            raise Unauthenticated(f"the key {name!r} is unknown here; ask for a new one")
        return record

    def check_key_models(self, key: str, models: set[str]) -> None:
        """Refuses, at once, a request (a batch, a token count) whose key is not valid or may
        not use all of its models; nothing for a request without a key."""
        if key:
            assert self.keys is not None
            record = self._key(key)
            for model in sorted(models):
                self.keys.allows(record, model)

    async def _admit(
        self, key: str, model: str, most_tokens: int, time_left_s: float | None
    ) -> Admission:
        """Lets a keyed request in under its key's limits."""
        assert self.keys is not None
        return await self.keys.admit(self._key(key), model, most_tokens, time_left_s)

    def _settle(self, admission: Admission, label: str, usage: Usage) -> None:
        """What the request used counts toward its key, in memory now and in the store soon."""
        assert self.keys is not None
        _, write = self.keys.settle(
            admission, usage.prompt_tokens, usage.completion_tokens, usage.cost_usd
        )
        self._usage_writes.put_nowait(write)
        if self._usage_writer is None:
            self._usage_writer = asyncio.create_task(self._write_usage())
        self.observer.key_used(admission.key, label, usage)

    async def _write_usage(self) -> None:
        while True:
            write = await self._usage_writes.get()
            delay = 0.1
            while True:
                try:
                    await write()
                    break
                except StoreUnavailable:
                    await asyncio.sleep(delay)  # kept until the store is back
                    delay = min(delay * 2, 5.0)
            self._usage_writes.task_done()

    async def close(self) -> None:
        """Waits (a while) for the usage still being written."""
        if self._usage_writer is None:
            return
        try:
            await asyncio.wait_for(self._usage_writes.join(), USAGE_FLUSH_S)
        except TimeoutError:
            _log.error("key_usage_unwritten", rows=self._usage_writes.qsize())
        self._usage_writer.cancel()
        await asyncio.gather(self._usage_writer, return_exceptions=True)

    def model_label(self, requested: str) -> str:
        """The requested name as /metrics may show it: a name some host, alias or configured
        cloud model answers to; else OTHER_CLOUD_MODEL for an openrouter/ name, UNKNOWN_MODEL
        for the rest."""
        if requested.startswith(OPENROUTER_PREFIX):
            known = requested in self.cloud.cloud_models.values()
            return requested if known else OTHER_CLOUD_MODEL
        known = requested in self.cloud.cloud_models or any(
            router.matches(m, requested) for h in self.pool.hosts for m in h.models
        )
        return requested if known else UNKNOWN_MODEL

    def _cloud_spent(self, key: str) -> str:
        """Why the request may not go to the cloud ("" when it may): its key's budget."""
        if not key or self.keys is None:
            return ""
        record = self._key(key)
        if not self.keys.cloud_spent(record):
            return ""
        return f"the key {key!r} has spent its cloud budget (${record.limits.cloud_budget_usd:.2f})"

    async def _serve(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> AsyncGenerator[Event, None]:
        deadline = None if time_left_s is None else time.monotonic() + time_left_s
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        requested = request.model
        log = _log.bind(request_id=request.request_id, model=requested)
        cloud = self.cloud
        policy = cloud.policy(request)
        fallback = cloud.cloud_models.get(requested)
        spent = self._cloud_spent(request.routing.key)
        if spent and (requested.startswith(OPENROUTER_PREFIX) or policy == "cloud_only"):
            raise ResourceExhausted(
                f"{spent}, so it may use local models only, and {shown(requested)} runs in the "
                "cloud; ask for a local model"
            )
        if spent:
            policy = "local_only"  # the cloud fallback is off for this key
        if requested.startswith(OPENROUTER_PREFIX):
            cloud.check_allowed(requested, policy)
        if requested.startswith(OPENROUTER_PREFIX) or policy == "cloud_only":
            if not requested.startswith(OPENROUTER_PREFIX):
                if fallback is None:
                    raise FailedPrecondition(
                        f"{shown(requested)} is to run in the cloud but has no cloud model; add it "
                        "to cloud_models in gateway.toml, or ask for routing_policy local_only"
                    )
                request = request.with_model(fallback)
            async with aclosing(relay_upstream(cloud.upstream, request, deadline)) as responses:
                async for response in responses:
                    yield response
            return
        local_first = policy == "local_first" and fallback is not None
        try:
            prefix = await self._prefix(request)
            ranked = await self._route(request, deadline, log, prefix)
            if local_first and all(c.tier >= _SATURATED_TIER for c in ranked):
                raise ResourceExhausted("every host that serves it is saturated")
            attempts = self._attempts(request, ranked, deadline, log, prefix)
            async with aclosing(attempts) as responses:
                async for response in responses:
                    yield response
            return
        except (Unavailable, NotFound, ResourceExhausted) as exc:
            # _attempts raises these only before a first message was sent.
            if spent and fallback is not None:
                raise type(exc)(f"{exc}; and {spent}, so there is no cloud fallback") from None
            if not local_first:
                raise
            log.info("cloud_fallback", cloud_model=fallback, reason=str(exc))
            self.observer.cloud_fallback(self.model_label(requested))
            trace.get_current_span().add_event("cloud_fallback", {"airouter.reason": str(exc)})
        assert fallback is not None
        request = request.with_model(fallback)
        async with aclosing(relay_upstream(cloud.upstream, request, deadline)) as responses:
            async for response in responses:
                yield response

    async def _prefix(self, request: GenerateRequest) -> Prefix:
        """The prompt's prefix for routing: as a door hashed it off the loop, else hashed here
        (a heavy request on the heavy-work thread)."""
        if not self.prefix_policy.enabled:
            return NO_PREFIX
        if request.routing.prefix is not None:
            return request.routing.prefix
        if heavy(request):
            return await off_loop(request_prefix, request)
        return request_prefix(request)

    async def _route(
        self,
        request: GenerateRequest,
        deadline: float | None,
        log: Any,
        prefix: Prefix,
    ) -> list[router.Candidate]:
        """The ranked candidates, traced and logged with the choice and why."""
        with tracing.span(_tracer, "route") as span:
            hit = self._hit_estimate(request, prefix)
            ranked = await self._candidates(
                request.model, request.routing.min_context_length, deadline, hit
            )
            described = [c.describe() for c in ranked]
            span.set_attributes(
                {
                    "airouter.route.chosen": ranked[0].host.address,
                    "airouter.route.model": ranked[0].model.name,
                    "airouter.route.reason": ranked[0].reason,
                    "airouter.route.prefix_tokens": ranked[0].prefix_tokens,
                    "airouter.route.candidates": described,
                }
            )
            log.info(
                "route_chosen",
                host=ranked[0].host.address,
                served_model=ranked[0].model.name,
                reason=ranked[0].reason,
                prefix_tokens=ranked[0].prefix_tokens,
                candidates=described,
            )
        return ranked

    def _hit_estimate(self, request: GenerateRequest, prefix: Prefix) -> router.HitEstimate | None:
        """Prompt tokens a host holds for the request; the conversation's last host counts as
        holding at least enough to be preferred."""
        if not self.prefix_policy.enabled:
            return None
        last = self.prefixes.last_host(request.routing.conversation_id)
        if not prefix.blocks and last is None:
            return None
        floor = self.prefix_policy.min_tokens

        def hit(host: Host, model: generate_pb2.ModelInfo) -> int:
            tokens = self.prefixes.expected_hit(host, model.name, prefix.blocks)
            return max(tokens, floor) if host.address == last else tokens

        return hit

    async def _candidates(
        self,
        model: str,
        min_context: int,
        deadline: float | None,
        hit: router.HitEstimate | None = None,
    ) -> list[router.Candidate]:
        """The ranked candidates. While some host may still be starting (the gateway has just
        started, or the host with it) a request nothing can serve waits for the pool's view to
        change, within its deadline and at most the first-message budget."""
        now = time.monotonic()
        give_up = now + self.first_message_s
        if deadline is not None:
            # A little before the caller's deadline, so the caller learns why.
            give_up = min(give_up, deadline - min(1.0, 0.1 * (deadline - now)))
        while True:
            try:
                return router.candidates(
                    self.pool.hosts,
                    model,
                    min_context,
                    hit=hit,
                    policy=self.prefix_policy,
                )
            except (Unavailable, NotFound):
                left = give_up - time.monotonic()
                if left <= 0 or not self.pool.starting():
                    raise
                await self.pool.wait_for_change(left)

    async def _attempts(
        self,
        request: GenerateRequest,
        ranked: list[router.Candidate],
        deadline: float | None,
        log: Any,
        prefix: Prefix,
    ) -> AsyncGenerator[Event, None]:
        """Tries the candidates in order until one streams."""
        requested = request.model
        failures: list[str] = []
        last: AirouterError = Unavailable("no host was tried")
        for attempt, candidate in enumerate(ranked, start=1):
            host, name = candidate.host, candidate.model.name
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise DeadlineExceeded(
                    f"the deadline passed before a host could serve {shown(requested)}; tried: "
                    f"{'; '.join(failures) or 'none'}"
                )
            with tracing.span(
                _tracer,
                f"attempt {host.address}",
                kind=trace.SpanKind.CLIENT,
                attributes={"server.address": host.address, "airouter.attempt": attempt},
            ) as span:
                try:
                    # A host knows its models by name, not by alias or capability.
                    on_host = request.with_model(name)
                    relay = self._relay(host, name, on_host, left, span, prefix)
                    async with aclosing(relay) as responses:
                        async for response in responses:
                            yield response
                    return
                except _FailedOver as exc:
                    why = f"{host.address} ({exc.cause.code}: {exc.cause})"
                    span.set_status(trace.StatusCode.ERROR, why)
                    log.warning("host_failover", host=host.address, error=str(exc.cause))
                    self.observer.failed_over(host.address)
                    failures.append(why)
                    last = exc.cause
        if isinstance(last, ResourceExhausted):
            raise ResourceExhausted(
                f"every host that serves {shown(requested)} is full: {'; '.join(failures)}"
            )
        if isinstance(last, DeadlineExceeded):
            raise DeadlineExceeded(
                f"no host answered {shown(requested)} in time: {'; '.join(failures)}"
            )
        raise Unavailable(f"no host could serve {shown(requested)}; tried: {'; '.join(failures)}")

    async def _relay(
        self,
        host: Host,
        name: str,
        request: GenerateRequest,
        time_left_s: float | None,
        span: trace.Span,
        prefix: Prefix,
    ) -> AsyncGenerator[Event, None]:
        """One attempt on one host. Raises _FailedOver when the next host should be tried,
        another domain error when the request is the caller's to fix; after the first message
        every failure becomes an `error` finish."""
        budget: float | None = self.first_message_s
        if time_left_s is not None and time_left_s <= self.first_message_s:
            budget = None  # the caller's deadline comes first: the host's call ends with it
        stream = host.stream(request, time_left_s)
        host.in_flight[name] = host.in_flight.get(name, 0) + 1
        sent = self.prefixes.sent(host, name, prefix)
        prompt_tokens = 0
        try:
            try:
                async with asyncio.timeout(budget):
                    first = await anext(stream)
            except TimeoutError:
                self.pool.record_failure(host, "no first message in time")
                raise _FailedOver(
                    DeadlineExceeded(f"no first message within {self.first_message_s:.0f} s")
                ) from None
            except StopAsyncIteration:
                self.pool.record_failure(host, "a stream ended without a message")
                raise _FailedOver(Internal("the host ended the stream without a message")) from None
            except _FAILOVER_ERRORS as exc:
                if isinstance(exc, Unavailable | Internal):
                    self.pool.record_failure(host, f"{exc.code}: {exc}")
                raise _FailedOver(exc) from None
            if isinstance(first, Finished) and first.reason is FinishReason.ERROR:
                # Failed before any token (decode failure, engine crash): another host may not.
                self.pool.record_failure(host, first.error_message)
                raise _FailedOver(Internal(first.error_message or "generation failed"))
            message: Event | None = first
            while message is not None:
                if isinstance(message, Finished):
                    message.host = host.address
                    prompt_tokens = message.usage.prompt_tokens
                    if message.reason is not FinishReason.ERROR:
                        self.prefixes.remember(request.routing.conversation_id, host)
                    yield message
                    return
                yield message
                try:
                    message = await anext(stream)
                except StopAsyncIteration:
                    message = None
                except DeadlineExceeded:
                    # The caller's deadline (the host's call ends with it): not the host's fault.
                    span.set_status(trace.StatusCode.ERROR, "the request's deadline passed")
                    yield error_finish(
                        host.address, "had not finished when the request's deadline passed"
                    )
                    return
                except AirouterError as exc:
                    _log.warning("host_failed_mid_stream", host=host.address, error=str(exc))
                    self.pool.record_failure(host, f"failed mid-stream: {exc.code}")
                    span.set_status(trace.StatusCode.ERROR, str(exc))
                    yield error_finish(host.address, f"failed mid-stream: {exc}")
                    return
            self.pool.record_failure(host, "a stream ended without a result")
            span.set_status(trace.StatusCode.ERROR, "no result")
            yield error_finish(host.address, "ended the stream without a result")
        finally:
            host.in_flight[name] -= 1
            if sent is not None:
                self.prefixes.finished(sent, prefix, prompt_tokens)
            await stream.aclose()  # cancels the host's call if the client left

    async def list_models(self) -> "ModelListing":
        """The models of the available hosts, merged by name with their live state."""
        pool = self.pool
        await pool.first_contact(FIRST_CONTACT_WAIT_S)
        merged: dict[str, generate_pb2.ModelInfo] = {}
        for host in pool.routable():
            for model in host.models:
                state = host.state_of(model.name) or model.state
                status = host.model_status(model.name)
                detail = status.state_detail if status else ""
                entry = merged.get(model.name)
                if entry is None:
                    entry = merged[model.name] = generate_pb2.ModelInfo()
                    entry.CopyFrom(model)
                    del entry.hosts[:]
                    entry.state, entry.state_detail = state, detail
                elif _STATE_RANK.get(state, 9) < _STATE_RANK.get(entry.state, 9):
                    entry.state, entry.state_detail = state, detail
                if model.HasField("created_at") and (
                    not entry.HasField("created_at")
                    or model.created_at.seconds < entry.created_at.seconds
                ):
                    entry.created_at.CopyFrom(model.created_at)
                entry.hosts.append(host.address)
                if state == generate_pb2.MODEL_STATE_READY:
                    entry.resident_hosts.append(host.address)
        return ModelListing(
            [merged[name] for name in sorted(merged)],
            [h.address for h in pool.hosts if not h.routable],
        )


@dataclass(frozen=True)
class TokenCount:
    """A request's prompt tokens, as the host that counted them counts them."""

    input_tokens: int
    model: str  # the configured name of the model that counted them
    host: str


@dataclass(frozen=True)
class ModelListing:
    """The hosts' catalogs merged by name (each entry as the host link reports a model, with
    the hosts that serve it and where it is resident), and the hosts that could not say."""

    models: list[generate_pb2.ModelInfo]
    unreachable_hosts: list[str]


class _FailedOver(Exception):
    """An attempt failed before its first message in a way another host may not."""

    def __init__(self, cause: AirouterError) -> None:
        super().__init__(str(cause))
        self.cause = cause
