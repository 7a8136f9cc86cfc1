"""The gateway's service core against fake hosts: failover before the first message (errors,
an error finish with no token, silence past the first-message budget), truthful endings after
it, refusals that cost nothing, and the labels its observer sees."""

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from airouter.errors import (
    AirouterError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from airouter.v1 import generate_pb2, host_status_pb2
from gateway.embeddings import Embeddings, EmbedRequest
from gateway.generation import (
    Event,
    Finished,
    FinishReason,
    GenerateRequest,
    Policy,
    Routing,
    Token,
    Usage,
)
from gateway.hosts import Host, HostPool
from gateway.service import UNKNOWN_MODEL, CloudRouting, GatewayService
from gateway.standing import HostState
from gateway.upstream import OpenAIUpstream, UpstreamSettings

MODEL = "m"
Script = Callable[[GenerateRequest], AsyncIterator[Any]]


class _Channel:
    """Enough of a grpc.aio.Channel for a Host that never calls it."""

    def unary_stream(self, *_: Any, **__: Any) -> None:
        return None

    def unary_unary(self, *_: Any, **__: Any) -> None:
        return None


@dataclass
class Observer:
    events: list[tuple[str, Any]] = field(default_factory=list)

    def first_token(self, model: str, seconds: float) -> None:
        self.events.append(("first_token", model))

    def finished(self, model: str, finished: Finished, seconds: float) -> None:
        self.events.append(("finished", (model, finished.reason, finished.host)))

    def refused(self, model: str, error: AirouterError) -> None:
        self.events.append(("refused", (model, error.code)))

    def failed_over(self, host: str) -> None:
        self.events.append(("failed_over", host))

    def embedded(self, model: str, host: str, prompt_tokens: int, seconds: float) -> None:
        self.events.append(("embedded", (model, host, prompt_tokens)))

    def cloud_fallback(self, model: str) -> None:
        self.events.append(("cloud_fallback", model))

    def key_used(self, key: str, model: str, usage: Usage) -> None:
        self.events.append(("key_used", (key, model, usage.prompt_tokens)))


def token(text: str) -> Token:
    return Token(text)


def finish(reason: FinishReason = FinishReason.STOP, error: str = "") -> Finished:
    return Finished(reason, error_message=error, model=MODEL)


def fake_host(address: str, script: Script, *, free_slots: int = 1) -> Host:
    """An up host serving MODEL, ready; `script` plays its Generate stream."""
    host = Host(address, _Channel())  # type: ignore[arg-type]
    host.models = [generate_pb2.ModelInfo(name=MODEL, context_length=4096)]
    host.status = host_status_pb2.HostStatus(
        models=[
            host_status_pb2.ModelStatus(
                name=MODEL,
                state=generate_pb2.MODEL_STATE_READY,
                slots=4,
                slots_busy=4 - free_slots,
            )
        ]
    )
    host.standing.updated(0.0, draining=False)
    calls: list[GenerateRequest] = []

    async def stream(request: GenerateRequest, time_left_s: float | None) -> AsyncIterator[Event]:
        calls.append(request)
        async for message in script(request):
            yield message

    host.stream = stream  # type: ignore[method-assign]
    host.calls = calls  # type: ignore[attr-defined]
    return host


def plays(*messages: Any, hang: bool = False) -> Script:
    """A host that sends `messages` (an exception among them is raised there)."""

    async def script(_: GenerateRequest) -> AsyncIterator[Any]:
        for message in messages:
            if isinstance(message, Exception):
                raise message
            yield message
        if hang:
            await asyncio.sleep(3600)

    return script


def serve(
    hosts: list[Host],
    request: GenerateRequest | None = None,
    *,
    first_message_s: float = 5.0,
    time_left_s: float | None = 10.0,
    **cloud: Any,
) -> tuple[list[Event], AirouterError | None, Observer]:
    """Runs one request through a service over `hosts` (the first is ranked first)."""
    observer = Observer()

    async def run() -> tuple[list[Event], AirouterError | None]:
        pool = HostPool([])
        pool.hosts = hosts
        upstream = OpenAIUpstream(UpstreamSettings(api_key=None))
        routing = CloudRouting(upstream, **cloud)
        service = GatewayService(pool, routing, observer, first_message_s)
        out: list[Event] = []
        try:
            async for message in service.generate(
                request or GenerateRequest(MODEL, prompt="Hi"),
                time_left_s,
            ):
                out.append(message)
        except AirouterError as exc:
            return out, exc
        return out, None

    out, error = asyncio.run(run())
    return out, error, observer


def ordered(first: Host, *rest: Host) -> list[Host]:
    """Hosts ranked with `first` first: it has a free slot, the rest are busy (a lower tier,
    so the router's random pick between equals does not apply)."""
    for host in rest:
        assert host.status is not None
        host.status.models[0].slots_busy = host.status.models[0].slots
    return [first, *rest]


def test_a_host_that_refuses_before_its_first_message_fails_over_to_the_next() -> None:
    a = fake_host("a:1", plays(Unavailable("the host is shutting down")))
    b = fake_host("b:1", plays(token("Hel"), token("lo"), finish()))
    out, error, observer = serve(ordered(a, b))
    assert error is None
    assert "".join(m.text for m in out if isinstance(m, Token)) == "Hello"
    assert out[-1].host == "b:1"
    assert ("failed_over", "a:1") in observer.events
    assert ("finished", (MODEL, FinishReason.STOP, "b:1")) in observer.events
    assert len(a.standing.failures) == 1  # counts toward a's cool-down


def test_an_error_finish_before_any_token_fails_over_and_counts_toward_cool_down() -> None:
    a = fake_host("a:1", plays(finish(FinishReason.ERROR, "llama_decode -1")))
    b = fake_host("b:1", plays(token("ok"), finish()))
    hosts = ordered(a, b)
    for _ in range(3):
        out, error, _ = serve(hosts)
        assert error is None and out[-1].host == "b:1"
    assert a.state is HostState.COOLING_DOWN
    assert "llama_decode -1" in a.detail


def test_a_silent_host_fails_over_within_the_first_message_budget() -> None:
    a = fake_host("a:1", plays(hang=True))
    b = fake_host("b:1", plays(token("ok"), finish()))
    out, error, observer = serve(ordered(a, b), first_message_s=0.05)
    assert error is None and out[-1].host == "b:1"
    assert ("failed_over", "a:1") in observer.events


def test_every_host_silent_ends_with_deadline_exceeded_naming_them() -> None:
    a = fake_host("a:1", plays(hang=True))
    b = fake_host("b:1", plays(hang=True))
    _, error, _ = serve(ordered(a, b), first_message_s=0.05)
    assert error is not None and error.code == "DEADLINE_EXCEEDED"
    assert "a:1" in str(error) and "b:1" in str(error)


def test_a_failure_mid_stream_ends_with_an_error_finish_naming_the_cause() -> None:
    a = fake_host("a:1", plays(token("Hel"), Unavailable("Socket closed")))
    b = fake_host("b:1", plays(token("never"), finish()))
    out, error, _ = serve(ordered(a, b))
    assert error is None
    assert out[0].text == "Hel"
    assert out[-1].reason == FinishReason.ERROR
    assert "a:1" in out[-1].error_message
    assert "Socket closed" in out[-1].error_message
    assert not b.calls  # no second host after a token was sent


def test_a_stream_that_ends_without_a_result_is_not_a_success() -> None:
    a = fake_host("a:1", plays(token("Hel")))
    out, error, _ = serve([a])
    assert error is None
    assert out[-1].reason == FinishReason.ERROR
    assert "without a result" in out[-1].error_message


def test_the_request_s_own_error_is_not_failed_over() -> None:
    a = fake_host("a:1", plays(InvalidArgument("the prompt has 9000 tokens; the context 4096")))
    b = fake_host("b:1", plays(token("never"), finish()))
    _, error, observer = serve(ordered(a, b))
    assert isinstance(error, InvalidArgument) and "9000 tokens" in str(error)
    assert not b.calls
    assert ("refused", (MODEL, "INVALID_ARGUMENT")) in observer.events


def test_every_host_full_is_resource_exhausted() -> None:
    a = fake_host("a:1", plays(ResourceExhausted("queue full")))
    b = fake_host("b:1", plays(ResourceExhausted("queue full")))
    _, error, _ = serve(ordered(a, b))
    assert isinstance(error, ResourceExhausted) and "a:1" in str(error)
    assert not a.standing.failures  # a full host is healthy


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (GenerateRequest("", prompt="x"), "model is empty"),
        (GenerateRequest(MODEL), "neither a prompt"),
        (GenerateRequest(MODEL, prompt="\udc80"), "lone surrogate"),
        (
            GenerateRequest(MODEL, prompt="x", routing=Routing(conversation_id="u" * 257)),
            "at most 256",
        ),
        (
            GenerateRequest(MODEL, prompt="x" * (5 << 20)),
            "the request is 5.0 MiB; a generate request may be at most 4 MiB",
        ),
    ],
)
def test_bad_requests_are_refused_before_any_host_is_asked(
    request_: GenerateRequest, needle: str
) -> None:
    a = fake_host("a:1", plays(token("never"), finish()))
    _, error, _ = serve([a], request_)
    assert isinstance(error, InvalidArgument) and needle in str(error)
    assert not a.calls


def test_an_unknown_model_name_is_counted_under_one_label() -> None:
    a = fake_host("a:1", plays(token("never"), finish()))
    for name in ("x" * 10_000, "another-made-up-name"):
        _, error, observer = serve([a], GenerateRequest(name, prompt="x"))
        assert isinstance(error, NotFound)
        assert observer.events == [("refused", (UNKNOWN_MODEL, "NOT_FOUND"))]


def test_no_host_up_is_unavailable_with_each_host_s_state() -> None:
    a = fake_host("a:1", plays())
    a.standing.lost(1.0, "no status update for 3 s")
    _, error, _ = serve([a], time_left_s=0.1)
    assert isinstance(error, Unavailable)
    assert "a:1: down (no status update for 3 s)" in str(error)


def cloud_request(model: str, policy: Policy | None = None) -> GenerateRequest:
    return GenerateRequest(model, prompt="x", routing=Routing(policy))


# The fake upstream is never started: a request that passes the operator's gate fails there.
NOT_STARTED = "the upstream client is not started"


def test_an_operator_local_only_forbids_cloud_models_it_has_not_allowed() -> None:
    a = fake_host("a:1", plays(token("local"), finish()))
    _, error, _ = serve([a], cloud_request("openrouter/openai/gpt-5"))
    assert isinstance(error, PermissionDenied) and "cloud_allowed_models" in str(error)
    allowed = {"allowed_models": ("openrouter/meta-llama/*",)}
    _, error, _ = serve([a], cloud_request("openrouter/meta-llama/llama-4"), **allowed)
    assert isinstance(error, Unavailable) and NOT_STARTED in str(error)
    _, error, _ = serve([a], cloud_request("openrouter/openai/gpt-5"), **allowed)
    assert isinstance(error, PermissionDenied)
    # A cloud model the operator chose as a fallback is allowed by that choice.
    fallback = {"cloud_models": {MODEL: "openrouter/openai/gpt-5"}}
    _, error, _ = serve([a], cloud_request("openrouter/openai/gpt-5"), **fallback)
    assert isinstance(error, Unavailable) and NOT_STARTED in str(error)


def test_the_operator_s_policy_wins_over_the_request_s_unless_it_allows_overrides() -> None:
    a = fake_host("a:1", plays(token("local"), finish()))
    cloud_only = cloud_request(MODEL, Policy.CLOUD_ONLY)
    routing = {"cloud_models": {MODEL: "openrouter/openai/gpt-5"}}
    out, error, _ = serve([a], cloud_only, **routing)
    assert error is None and out[-1].host == "a:1"  # stayed local
    _, error, _ = serve([a], cloud_only, allow_policy_override=True, **routing)
    assert isinstance(error, Unavailable) and NOT_STARTED in str(error)  # went to the cloud
    # Asking for local_only spends nothing: always honoured.
    local_only = cloud_request(MODEL, Policy.LOCAL_ONLY)
    out, error, _ = serve([a], local_only, default_policy="cloud_only", **routing)
    assert error is None and out[-1].host == "a:1"


def _embedding_host(address: str, *answers: Any, free_slots: int = 1) -> Host:
    """A fake host whose Embed answers with `answers` in turn (an exception is raised)."""
    host = fake_host(address, plays(), free_slots=free_slots)
    asked: list[EmbedRequest] = []
    replies = list(answers)

    async def embed(request: EmbedRequest, time_left_s: float | None) -> Embeddings:
        asked.append(request)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return Embeddings(np.zeros((len(request.inputs), 4), np.float32), 7, MODEL, address)

    host.embed = embed  # type: ignore[method-assign]
    host.asked = asked  # type: ignore[attr-defined]
    return host


def _embed(hosts: list[Host], request: EmbedRequest) -> tuple[Any, Observer]:
    observer = Observer()

    async def run() -> Any:
        pool = HostPool([])
        pool.hosts = hosts
        upstream = OpenAIUpstream(UpstreamSettings(api_key=None))
        service = GatewayService(pool, CloudRouting(upstream), observer)
        try:
            return await service.embed(request, 10.0)
        except AirouterError as exc:
            return exc

    return asyncio.run(run()), observer


def test_embeddings_go_to_the_free_host_and_fail_over_before_an_answer() -> None:
    a = _embedding_host("a:1", Unavailable("the host is shutting down"))
    b = _embedding_host("b:1", "ok")
    made, observer = _embed(ordered(a, b), EmbedRequest(MODEL, ["x", "y"]))
    assert made.host == "b:1" and made.vectors.shape == (2, 4)
    assert len(a.asked) == 1 and len(b.asked) == 1  # type: ignore[attr-defined]
    assert ("failed_over", "a:1") in observer.events
    assert ("embedded", (MODEL, "b:1", 7)) in observer.events


def test_an_embedding_request_a_host_calls_wrong_is_not_retried_elsewhere() -> None:
    a = _embedding_host("a:1", InvalidArgument("input[0] is 600 tokens"))
    b = _embedding_host("b:1", "ok")
    error, observer = _embed(ordered(a, b), EmbedRequest(MODEL, ["x" * 10]))
    assert isinstance(error, InvalidArgument)
    assert b.asked == []  # type: ignore[attr-defined]
    assert observer.events == [("refused", (MODEL, "INVALID_ARGUMENT"))]


def test_embedding_requests_refused_before_any_host_is_asked() -> None:
    a = _embedding_host("a:1", "ok")
    for request, refusal in [
        (EmbedRequest(MODEL, []), InvalidArgument),
        (EmbedRequest(MODEL, ["x"] * 2049), InvalidArgument),
        (EmbedRequest("openrouter/x/y", ["x"]), FailedPrecondition),
        (EmbedRequest("other", ["x"]), NotFound),
    ]:
        error, _ = _embed([a], request)
        assert isinstance(error, refusal), (request.model, error)
    assert a.asked == []  # type: ignore[attr-defined]
