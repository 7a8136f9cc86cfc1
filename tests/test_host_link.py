"""The gateway's link to its hosts: the host's request is built from the gateway's own, field by
field, with nothing of how the gateway routes (a conversation id is often an e-mail address);
and a caller's own deadline never counts against a host. A scripted ModelHost on a real gRPC
server stands in for the host, so what reaches a host is read off the wire."""

import asyncio
import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from airouter.infill import Infill
from airouter.output import Constraint, ConstraintKind, OutputOptions, Tool, ToolChoice
from airouter.output_wire import infill_from_pb, output_from_pb, turn_from_pb
from airouter.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    generate_pb2,
    host_status_pb2,
    model_host_pb2,
)
from gateway.generation import (
    GenerateRequest,
    Policy,
    Routing,
    Sampling,
    Stopping,
)
from gateway.hosts import host_request
from gateway.server import RunningGateway, start_gateway
from tests.conftest import LoopThread, gateway_config, wait_until

MODEL = "m"
EMAIL = "alice@example.com"

# Every leaf of the gateway's request: where it goes in the host's request, or why it stays.
FORWARDED = {
    "model": "model",
    "prompt": "prompt",
    "messages": "chat.messages",
    "infill": "infill",
    "request_id": "request_id",
    "sampling.temperature": "sampling.temperature",
    "sampling.top_p": "sampling.top_p",
    "sampling.top_k": "sampling.top_k",
    "sampling.min_p": "sampling.min_p",
    "sampling.repetition_penalty": "sampling.repetition_penalty",
    "sampling.seed": "sampling.seed",
    "stopping.max_tokens": "stopping.max_tokens",
    "stopping.stop": "stopping.stop",
    "stopping.ignore_eos": "stopping.ignore_eos",
    # OutputOptions travel as the protocol's message of that name (airouter.output_wire).
    "output.constraint": "output.constraint",
    "output.tools": "output.tools",
    "output.tool_choice": "output.tool_choice.mode",
    "output.tool_function": "output.tool_choice.function",
    "output.parallel_tool_calls": "output.parallel_tool_calls",
    "output.logprobs": "output.logprobs",
    "output.top_logprobs": "output.top_logprobs",
    "output.n": "output.n",
}
GATEWAY_ONLY = {
    "routing.policy",
    "routing.min_context_length",
    "routing.conversation_id",
    "routing.prefix",
    "routing.key",
}


def leaves(cls: type, prefix: str = "") -> set[str]:
    """The dotted paths of a dataclass's fields, nested dataclasses opened up."""
    paths = set()
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else None
        if kind is not None and dataclasses.is_dataclass(kind):
            paths |= leaves(kind, f"{prefix}{field.name}.")
        else:
            paths.add(prefix + field.name)
    return paths


def at(message: Any, path: str) -> Any:
    for name in path.split("."):
        message = getattr(message, name)
    return message


def test_every_field_of_the_gateway_s_request_is_forwarded_or_kept_by_the_gateway() -> None:
    # A field added to the domain request fails here until the host link forwards it (and
    # this table says where) or it is declared the gateway's own.
    assert leaves(GenerateRequest) == set(FORWARDED) | GATEWAY_ONLY
    sampling = Sampling(0.5, 0.75, 7, 0.125, 1.25, 42)
    stopping = Stopping(9, ("END", "STOP"), True)
    routing = Routing(Policy.LOCAL_FIRST, 1024, EMAIL)
    output = OutputOptions(
        tools=(Tool("get_weather", "the weather", '{"type": "object"}'),),
        tool_choice=ToolChoice.FUNCTION,
        tool_function="get_weather",
        parallel_tool_calls=False,
        logprobs=True,
        top_logprobs=3,
        n=2,
    )
    chat = GenerateRequest(
        MODEL,
        messages=(
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "", "", (("call_1", "get_weather", '{"city": "Oslo"}'),)),
            ("tool", "sunny", "call_1", ()),
        ),
        sampling=sampling,
        stopping=stopping,
        routing=routing,
        request_id="req-1",
        output=output,
    )
    pb = host_request(chat)
    received = output_from_pb(pb.output)
    for leaf, path in FORWARDED.items():
        if leaf in ("prompt", "infill"):  # one input of three: each checked below
            continue
        sent, got = at(chat, leaf), at(pb, path)
        if leaf == "messages":
            got = tuple(turn_from_pb(m) for m in got)
        elif leaf.startswith("output."):
            got = getattr(received, leaf.removeprefix("output."))
        elif isinstance(sent, tuple):
            got = tuple(got)
        assert got == sent, leaf
    schema = Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object"}')
    constrained = dataclasses.replace(chat, output=OutputOptions(constraint=schema))
    assert output_from_pb(host_request(constrained).output).constraint == schema
    assert host_request(dataclasses.replace(chat, messages=None, prompt="raw")).prompt == "raw"
    infill = Infill("def f(", "):", (("a.py", "x = 1"),))
    sent = host_request(dataclasses.replace(chat, messages=None, infill=infill))
    assert infill_from_pb(sent.infill) == infill and not sent.HasField("chat")
    assert EMAIL.encode() not in pb.SerializeToString()


def test_unset_parameters_stay_unset_for_the_host_s_defaults() -> None:
    pb = host_request(GenerateRequest(MODEL, prompt="x"))
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        assert not pb.sampling.HasField(name)
    assert not pb.stopping.HasField("max_tokens")


class ScriptedHost:
    """A ModelHost over real gRPC: one ready model; Generate records each request's raw bytes
    and streams `tokens` tokens, one every `pace_s`, then a Finished."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.tokens = 2
        self.pace_s = 0.0
        self.reason = generate_pb2.FINISH_REASON_LENGTH
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self._generate,
                request_deserializer=None,  # the raw bytes, as they came
                response_serializer=model_host_pb2.GenerateResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self._list_models,
                request_deserializer=model_host_pb2.ListModelsRequest.FromString,
                response_serializer=model_host_pb2.ListModelsResponse.SerializeToString,
            ),
            "WatchStatus": grpc.unary_stream_rpc_method_handler(
                self._watch_status,
                request_deserializer=model_host_pb2.WatchStatusRequest.FromString,
                response_serializer=model_host_pb2.WatchStatusResponse.SerializeToString,
            ),
        }
        generic = grpc.method_handlers_generic_handler("airouter.v1.ModelHost", handlers)
        self.server.add_generic_rpc_handlers((generic,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def _generate(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_host_pb2.GenerateResponse]:
        self.received.append(raw)
        for _ in range(self.tokens):
            await asyncio.sleep(self.pace_s)
            yield model_host_pb2.GenerateResponse(
                token=generate_pb2.TokenDelta(text=" tok", token_count=1)
            )
        yield model_host_pb2.GenerateResponse(
            finished=generate_pb2.Finished(
                reason=self.reason,
                model=MODEL,
                usage=generate_pb2.Usage(prompt_tokens=3, completion_tokens=self.tokens),
            )
        )

    async def _list_models(
        self, request: model_host_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.ListModelsResponse:
        model = generate_pb2.ModelInfo(
            name=MODEL, context_length=4096, slots=4, state=generate_pb2.MODEL_STATE_READY
        )
        return model_host_pb2.ListModelsResponse(models=[model])

    async def _watch_status(
        self, request: model_host_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_host_pb2.WatchStatusResponse]:
        status = host_status_pb2.HostStatus(
            models=[
                host_status_pb2.ModelStatus(
                    name=MODEL, state=generate_pb2.MODEL_STATE_READY, slots=4
                )
            ]
        )
        while True:
            yield model_host_pb2.WatchStatusResponse(status=status)
            await asyncio.sleep(request.interval_ms / 1000)


@dataclasses.dataclass
class Linked:
    host: ScriptedHost
    gateway: RunningGateway
    stub: gateway_pb2_grpc.GatewayStub
    loop: LoopThread

    def http(
        self, body: dict[str, Any], path: str = "/v1/completions"
    ) -> tuple[int, dict[str, Any] | str]:
        assert self.gateway.http is not None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gateway.http.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                return response.status, text if body.get("stream") else json.loads(text)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def host_state(self) -> int:
        [info] = self.stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
        return info.state


@pytest.fixture
def linked() -> Iterator[Linked]:
    loop = LoopThread()
    host = ScriptedHost()
    loop.run(host.start())
    config = gateway_config(
        [f"127.0.0.1:{host.port}"], http_listen="127.0.0.1:0", http_request_timeout_s=1.0
    )
    gateway = loop.run(start_gateway(config))
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    linked = Linked(host, gateway, gateway_pb2_grpc.GatewayStub(channel), loop)
    wait_until(lambda: linked.host_state() == gateway_pb2.HOST_STATE_UP)
    yield linked
    channel.close()
    loop.run(gateway.stop(0))
    loop.run(host.server.stop(0))
    loop.close()


def test_the_conversation_id_never_reaches_a_host(linked: Linked) -> None:
    request = gateway_pb2.GatewayGenerateRequest(
        model=MODEL, prompt="Hello", conversation_id=EMAIL, min_context_length=16
    )
    request.routing_policy = gateway_pb2.ROUTING_POLICY_LOCAL_ONLY
    request.stopping.max_tokens = 2
    finished = list(linked.stub.Generate(request, timeout=30))[-1].finished
    assert finished.reason == generate_pb2.FINISH_REASON_LENGTH
    status, _ = linked.http({"model": MODEL, "prompt": "Hello", "user": EMAIL, "max_tokens": 2})
    assert status == 200
    assert len(linked.host.received) == 2
    for raw in linked.host.received:
        assert EMAIL.encode() not in raw
        parsed = model_host_pb2.GenerateRequest.FromString(raw)
        assert parsed.SerializeToString() == raw  # no field the host does not know
        assert parsed.model == MODEL and parsed.prompt == "Hello"
        assert parsed.stopping.max_tokens == 2


def test_a_caller_s_own_deadline_never_cools_a_healthy_host_down(linked: Linked) -> None:
    # Each request outlives the HTTP edge's 1 s timeout on a host that streams for 5 s.
    linked.host.tokens, linked.host.pace_s = 25, 0.2
    for _ in range(3):
        status, text = linked.http({"model": MODEL, "prompt": "Hello", "stream": True})
        assert status == 200
        assert "deadline passed" in str(text) and "[DONE]" in str(text)
    assert linked.host_state() == gateway_pb2.HOST_STATE_UP
    linked.host.tokens, linked.host.pace_s = 2, 0.0
    status, body = linked.http({"model": MODEL, "prompt": "Hello"})
    assert status == 200 and isinstance(body, dict)
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_cancelled_finish_reaches_http_clients_as_cancelled_not_stop(linked: Linked) -> None:
    # The host was stopped mid-request (a shutdown): nothing says the model stopped.
    linked.host.reason = generate_pb2.FINISH_REASON_CANCELLED
    status, body = linked.http({"model": MODEL, "prompt": "Hello"})
    assert status == 200 and isinstance(body, dict)
    assert body["choices"][0]["finish_reason"] == "cancelled"
    status, text = linked.http({"model": MODEL, "prompt": "Hello", "stream": True})
    assert status == 200 and '"finish_reason":"cancelled"' in str(text)


def test_a_huge_unknown_model_name_is_not_found_with_a_short_message(linked: Linked) -> None:
    # Echoed whole, 10,000 characters pass gRPC's metadata limit: some calls then arrived
    # as RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit").
    request = gateway_pb2.GatewayGenerateRequest(model="x" * 10_000, prompt="Hello")
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as info:
            list(linked.stub.Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(info.value.details()) < 500 and "10000 characters" in info.value.details()


def test_prefix_state_of_retired_hosts_is_dropped(linked: Linked) -> None:
    service, pool = linked.gateway.service, linked.gateway.pool
    address = f"127.0.0.1:{linked.host.port}"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}], "user": "u1"}
    linked.host.tokens = 1
    chat_url = "/v1/chat/completions"
    assert linked.http(chat, chat_url)[0] == 200
    assert service.prefixes.last_host("u1") == address
    linked.loop.run(pool.reconcile([]))  # the host leaves the pool
    assert service.prefixes.last_host("u1") is None
    assert not service.prefixes._sent


def test_a_large_chat_reaches_the_host_whole_through_either_door(linked: Linked) -> None:
    # Past offload.HEAVY_MESSAGES: parsed, translated and hashed away from the event loop.
    turns = [("user" if i % 2 else "assistant", f"message {i} é") for i in range(3000)]
    request = gateway_pb2.GatewayGenerateRequest(model=MODEL, conversation_id=EMAIL)
    for role, content in turns:
        request.chat.messages.add(role=role, content=content)
    request.stopping.max_tokens = 2
    assert list(linked.stub.Generate(request, timeout=60))[-1].finished.reason
    body = {
        "model": MODEL,
        "messages": [{"role": r, "content": c} for r, c in turns],
        "max_tokens": 2,
        "user": EMAIL,
    }
    assert linked.http(body, "/v1/chat/completions")[0] == 200
    for raw in linked.host.received:
        host_request_pb = model_host_pb2.GenerateRequest.FromString(raw)
        assert [(m.role, m.content) for m in host_request_pb.chat.messages] == turns
        assert EMAIL.encode() not in raw
