"""One trace from client to token: the gateway and modelhost processes export their spans over
OTLP/gRPC to a receiver started here (the OpenTelemetry collector's own service definition)."""

import functools
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from airouter import tracing
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2, keys_pb2, model_host_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from gateway.generation import GenerateRequest, request_attributes
from tests.conftest import LoopThread, wait_for_health, wait_until
from tests.fake_openrouter import API_KEY, FakeOpenRouter
from tests.processes import ServerProcess
from tests.streaming import collect, gateway_request

# A trace id the client chose, in W3C traceparent form: the gateway must continue it.
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]
    events: list[str]
    error: bool
    links: list[tuple[str, str]]  # (trace_id, span_id) of each linked span


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every span the exporters send."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.exports: list[bytes] = []  # every export as it came, to search for secrets
        self._lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        with self._lock:
            self.exports.append(request.SerializeToString())
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(
                            Span(
                                service=service,
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                events=[e.name for e in s.events],
                                error=s.status.code == s.status.STATUS_CODE_ERROR,
                                links=[(k.trace_id.hex(), k.span_id.hex()) for k in s.links],
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]


@dataclass
class Traced:
    receiver: Receiver
    hosts: list[ServerProcess]
    gateway: ServerProcess
    stub: gateway_pb2_grpc.GatewayStub
    env: dict[str, str]


def model_toml(preload: bool) -> str:
    return (
        '[[models]]\nname = "m"\nchat_template = "gemma"\ncontext_length = 256\nslots = 1\n'
        f"batch_tokens = 64\npreload = {'true' if preload else 'false'}\n"
    )


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    directory = tmp_path_factory.mktemp("traced")
    hosts = []
    for name, preload in [("first", True), ("second", False)]:
        config = Path(directory / f"{name}.toml")
        config.write_text(model_toml(preload))
        host = ServerProcess(
            "modelhost", "serve", "--device", "cpu", "--config", str(config), env=env
        )
        wait_for_health(host.address)
        hosts.append(host)
    gateway = ServerProcess(
        "gateway", "serve", *(f"--modelhost={h.address}" for h in hosts), env=env
    )
    wait_for_health(gateway.address)
    channel = grpc.insecure_channel(gateway.address)
    yield Traced(receiver, hosts, gateway, gateway_pb2_grpc.GatewayStub(channel), env)
    channel.close()
    for process in (gateway, *hosts):
        if process.process.poll() is None:
            process.stop()
    server.stop(0)


def resident_on(stub: gateway_pb2_grpc.GatewayStub, model: str) -> list[str]:
    listed = stub.ListModels(gateway_pb2.GatewayListModelsRequest(), timeout=10).models
    return next((list(m.resident_hosts) for m in listed if m.name == model), [])


def queued(host: ModelHostStub, model: str) -> int:
    status = host.GetStatus(model_host_pb2.GetStatusRequest(), timeout=10).status
    return next(m.queue_depth for m in status.models if m.name == model)


def wait_for_spans(receiver: Receiver, trace_id: str, names: set[str]) -> list[Span]:
    deadline = time.monotonic() + 20
    while True:
        spans = receiver.trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        assert time.monotonic() < deadline, f"missing {names - {s.name for s in spans}}"
        time.sleep(0.1)


def test_one_trace_holds_gateway_routing_host_and_engine_spans(traced: Traced) -> None:
    # "m" is resident on the first host only: the request lands there, once the gateway's
    # view of the hosts says so.
    wait_until(lambda: resident_on(traced.stub, "m") == [traced.hosts[0].address])
    request = gateway_request(model="m", prompt="Hello", max_tokens=4, temperature=0.0)
    result = collect(
        traced.stub.Generate(request, metadata=[("traceparent", CLIENT_TRACEPARENT)], timeout=60)
    )
    host = traced.hosts[0].address
    assert result.finished.host == host
    spans = wait_for_spans(
        traced.receiver,
        CLIENT_TRACE_ID,
        {
            "text_completion m",
            "route",
            f"attempt {host}",
            "generate m",
            "queue",
            "prefill",
            "decode",
        },
    )
    by_name = {s.name: s for s in spans}
    request_span = by_name["text_completion m"]
    assert request_span.service == "airouter-gateway"
    assert request_span.parent_id == CLIENT_TRACEPARENT.split("-")[2]  # the client's span
    assert request_span.attributes["gen_ai.operation.name"] == "text_completion"
    assert request_span.attributes["gen_ai.request.model"] == "m"
    assert request_span.attributes["gen_ai.response.model"] == "m"
    assert (
        request_span.attributes["gen_ai.usage.input_tokens"] == result.finished.usage.prompt_tokens
    )
    assert request_span.attributes["gen_ai.usage.output_tokens"] == 4
    assert request_span.attributes["gen_ai.response.finish_reasons"] == ["length"]
    route = by_name["route"]
    assert route.parent_id == request_span.span_id
    assert route.attributes["airouter.route.chosen"] == host
    assert "resident" in str(route.attributes["airouter.route.reason"])
    attempt = by_name[f"attempt {host}"]
    assert attempt.parent_id == request_span.span_id
    handling = by_name["generate m"]
    assert handling.service == "airouter-modelhost"
    assert handling.parent_id == attempt.span_id  # the context crossed gRPC
    assert "first_token" in handling.events
    assert handling.attributes["airouter.prefill_ms"] > 0  # type: ignore[operator]
    for phase in ("queue", "prefill", "decode"):
        assert by_name[phase].parent_id == handling.span_id
    # Log lines inside the request carry its trace id, in both processes.
    route_logs = [r for r in traced.gateway.log if r.get("event") == "route_chosen"]
    assert any(r.get("trace_id") == CLIENT_TRACE_ID for r in route_logs)
    # The host logs the end of a generation after its last message is sent: wait for it.
    wait_until(
        lambda: any(
            r.get("event") == "generation_finished" and r.get("trace_id") == CLIENT_TRACE_ID
            for r in list(traced.hosts[0].log)
        ),
        10,
    )


def test_a_failover_shows_both_attempts_in_one_trace(traced: Traced) -> None:
    first, second = traced.hosts
    long = gateway_request(model="m", prompt="Count:", max_tokens=200, ignore_eos=True)
    running = traced.stub.Generate(long, timeout=60)
    next(running)  # the first host's one slot is busy
    results: list[object] = []
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"

    def waiting() -> None:
        request = gateway_request(model="m", prompt="Hi", max_tokens=2)
        call = traced.stub.Generate(request, metadata=[("traceparent", traceparent)], timeout=60)
        results.append(collect(call))

    thread = threading.Thread(target=waiting)
    thread.start()
    with grpc.insecure_channel(first.address) as channel:
        host = ModelHostStub(channel)
        wait_until(lambda: queued(host, "m") == 1)  # it waits in the first host's queue
    first.kill()
    thread.join(timeout=60)
    assert results and results[0].finished.host == second.address  # type: ignore[attr-defined]
    assert collect(running).finished.reason == generate_pb2.FINISH_REASON_ERROR
    spans = wait_for_spans(
        traced.receiver,
        trace_id,
        {f"attempt {first.address}", f"attempt {second.address}", "generate m", "load m"},
    )
    by_name = {s.name: s for s in spans}
    failed, served = by_name[f"attempt {first.address}"], by_name[f"attempt {second.address}"]
    assert failed.error and not served.error
    assert (failed.attributes["airouter.attempt"], served.attributes["airouter.attempt"]) == (1, 2)
    assert failed.parent_id == served.parent_id  # both under the request's span
    # The second host loaded the model for this request: the load is in the trace too.
    assert by_name["generate m"].parent_id == served.span_id
    assert by_name["load m"].service == "airouter-modelhost"


def test_openrouter_calls_and_the_http_edge_are_traced(traced: Traced, tmp_path: Path) -> None:
    """A gateway whose openrouter/ models go to a local fake upstream (retried once on 429),
    asked over its HTTP edge with the client's own traceparent."""
    loop = LoopThread()
    upstream = FakeOpenRouter()
    loop.run(upstream.start())
    key = tmp_path / "key"
    key.write_text(API_KEY)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'modelhosts = ["{traced.hosts[1].address}"]\n'
        f'openrouter_base_url = "{upstream.base_url}"\nopenrouter_api_key_file = "{key}"\n'
        'cloud_allowed_models = ["openrouter/vendor/*"]\n'
    )
    gateway = ServerProcess("gateway", "serve", "--config", str(config), env=traced.env)
    try:
        wait_for_health(gateway.address)
        http_port = next(r["http_port"] for r in gateway.log if r["event"] == "gateway_serving")
        # An API key (the gateway has no tokens, so its admin RPCs are open on loopback).
        with grpc.insecure_channel(gateway.address) as channel:
            secret = (
                gateway_pb2_grpc.GatewayStub(channel)
                .CreateKey(keys_pb2.CreateKeyRequest(name="traced"))
                .secret
            )
        trace_id = "5b8aa5a2d2c872e8321cf37308d69df2"
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": "openrouter/vendor/429-once",
                    "messages": [{"role": "user", "content": "Hi"}],
                }
            ).encode(),
            headers={
                "Content-Type": "application/json",
                "traceparent": f"00-{trace_id}-a3ce929d0e0e4736-01",
                "Authorization": f"Bearer {secret}",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            request_id = response.headers["x-request-id"]
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"] == "Hello world"
        spans = wait_for_spans(
            traced.receiver,
            trace_id,
            {"chat openrouter/vendor/429-once", "openrouter vendor/429-once"},
        )
        by_name = {s.name: s for s in spans}
        call = by_name["openrouter vendor/429-once"]
        assert call.parent_id == by_name["chat openrouter/vendor/429-once"].span_id
        assert call.events == ["retry"] and call.attributes["gen_ai.usage.output_tokens"] == 2
        assert by_name["chat openrouter/vendor/429-once"].parent_id == "a3ce929d0e0e4736"
        # The id the client got in x-request-id is the request span's, and the logs'.
        assert by_name["chat openrouter/vendor/429-once"].attributes["airouter.request_id"] == (
            request_id
        )
        # The key's secret is in no span and no log line; its usage is counted by name.
        assert all(secret.encode() not in export for export in traced.receiver.exports)
        assert secret not in json.dumps(gateway.log)
    finally:
        gateway.stop()
        loop.run(upstream.stop())
        loop.close()


def test_batch_items_are_traces_of_their_own_linked_to_the_batch(traced: Traced) -> None:
    items = [
        gateway_pb2.BatchItem(
            custom_id=f"traced-{i}", request=gateway_request(model="m", prompt="Hi", max_tokens=2)
        )
        for i in range(2)
    ]
    batch = traced.stub.SubmitBatch(
        gateway_pb2.SubmitBatchRequest(batch_id="traced", items=items),
        metadata=[("traceparent", CLIENT_TRACEPARENT)],
    ).batch
    finished = list(
        traced.stub.StreamBatchResults(
            gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id), timeout=60
        )
    )
    hosts = {m.result.custom_id: m.result.finished.host for m in finished}
    assert len(hosts) == 2
    batch_span = next(
        s
        for s in wait_for_spans(traced.receiver, CLIENT_TRACE_ID, {"batch traced"})
        if s.name == "batch traced"
    )
    assert batch_span.parent_id == CLIENT_TRACEPARENT.split("-")[2]
    assert batch_span.attributes["airouter.batch.items"] == 2
    deadline = time.monotonic() + 20
    while (
        len(
            item_spans := [
                s for s in traced.receiver.spans if s.name.startswith("batch_item traced-")
            ]
        )
        < 2
    ):
        assert time.monotonic() < deadline, "the item spans never arrived"
        time.sleep(0.1)
    for item in item_spans:
        # Not nested under the batch: a trace of its own, linked to the batch's span.
        assert item.trace_id != CLIENT_TRACE_ID and item.parent_id == ""
        assert item.links == [(CLIENT_TRACE_ID, batch_span.span_id)]
        assert item.attributes["airouter.batch.id"] == "traced"
        assert item.attributes["gen_ai.usage.output_tokens"] == 2
        host = hosts[str(item.attributes["airouter.batch.custom_id"])]
        spans = wait_for_spans(traced.receiver, item.trace_id, {"route", "generate m"})
        by_name = {s.name: s for s in spans}
        assert by_name["route"].parent_id == item.span_id
        assert by_name[f"attempt {host}"].parent_id == item.span_id
        assert by_name["generate m"].parent_id == by_name[f"attempt {host}"].span_id


def test_a_gateway_without_tracing_opens_no_spans_and_passes_a_callers_trace_on(
    traced: Traced,
) -> None:
    # In this process no SDK is installed: the request path's spans are not even no-op spans.
    tracer = trace.get_tracer("test")
    attributes = functools.partial(request_attributes, GenerateRequest("m", prompt="Hi"))
    with tracing.request_span(tracer, "generate m", attributes, [("x-request-id", "1")]) as span:
        assert span is trace.INVALID_SPAN
        with tracing.span(tracer, "route") as child:
            assert child is trace.INVALID_SPAN
        assert tracing.inject_metadata() == ()
    # A caller's trace context still reaches the hosts through an untraced gateway.
    host = next(h for h in traced.hosts if h.process.poll() is None)  # a test above kills one
    untraced = ServerProcess("gateway", "serve", f"--modelhost={host.address}")
    try:
        wait_for_health(untraced.address)
        trace_id, caller_span = "5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8"
        with grpc.insecure_channel(untraced.address) as channel:
            result = collect(
                gateway_pb2_grpc.GatewayStub(channel).Generate(
                    gateway_request(model="m", prompt="Hello", max_tokens=2),
                    metadata=[("traceparent", f"00-{trace_id}-{caller_span}-01")],
                    timeout=60,
                )
            )
        assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        spans = wait_for_spans(traced.receiver, trace_id, {"generate m"})
        assert {s.service for s in spans} == {"airouter-modelhost"}
        assert next(s for s in spans if s.name == "generate m").parent_id == caller_span
    finally:
        untraced.stop()
