"""The modelhost over real gRPC with the real model."""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llama_cpp import Llama

from airouter.v1 import generate_pb2, model_host_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from modelhost.config import HostConfig, embedded_model_config
from modelhost.server import start_host
from tests.conftest import CONTEXT, Stack, wait_until
from tests.streaming import collect, host_request

GREEDY = {"temperature": 0.0}


def generate(stack: Stack, **fields):  # type: ignore[no-untyped-def]
    return collect(stack.host_stub.Generate(host_request(**fields), timeout=60))


def rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        collect(call)
    return info.value


def test_generate_streams_deltas_and_ends_with_usage_and_timings(stack: Stack) -> None:
    result = generate(stack, prompt="Once upon a time", max_tokens=12, **GREEDY)
    f = result.finished
    assert f.reason == generate_pb2.FINISH_REASON_LENGTH
    assert f.usage.completion_tokens == 12
    assert f.usage.prompt_tokens == 5  # <bos> Once upon a time
    assert f.model == "gemma-3-270m"
    assert len(result.deltas) >= 2 and result.text.strip()
    t = f.timings
    assert 0 < t.time_to_first_token_ms <= t.total_ms
    assert t.prefill_ms > 0 and t.decode_ms > 0 and t.queue_ms >= 0


def test_greedy_output_matches_llama_cpp_in_process(stack: Stack, model_path) -> None:  # type: ignore[no-untyped-def]
    prompt = "The three primary colors are"
    llm = Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False)
    expected = llm(prompt, max_tokens=20, temperature=0.0)["choices"][0]["text"]
    result = generate(stack, prompt=prompt, max_tokens=20, **GREEDY)
    assert result.text == expected


def test_alias_resolves_to_the_configured_name(stack: Stack) -> None:
    result = generate(stack, model="gemma3-270m", prompt="Hi", max_tokens=2)
    assert result.finished.model == "gemma-3-270m"


def test_chat_messages_are_rendered_with_the_model_template(stack: Stack, model_path) -> None:  # type: ignore[no-untyped-def]
    messages = [("system", "Answer briefly."), ("user", "Name a fruit.")]
    result = generate(stack, messages=messages, max_tokens=4, **GREEDY)
    # Gemma's format: the system text opens the first user turn, then the model's turn starts.
    rendered = (
        "<start_of_turn>user\nAnswer briefly.\n\nName a fruit.<end_of_turn>\n<start_of_turn>model\n"
    )
    llm = Llama(str(model_path), n_ctx=64, verbose=False, vocab_only=True)
    expected = llm.tokenize(rendered.encode(), add_bos=True, special=True)
    assert result.finished.usage.prompt_tokens == len(expected)


def test_same_seed_gives_the_same_text(stack: Stack) -> None:
    fields = {
        "model": "gemma-one-slot",
        "prompt": "My favourite animal is",
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 7,
    }
    # llama.cpp's logits depend slightly on where a sequence's cells lie in the KV cache
    # (see "Determinism" in the README). The first run leaves the prompt cached; the next two
    # then evaluate the same part of it into the same cells, on a model with one slot.
    generate(stack, **fields)
    first, second = generate(stack, **fields), generate(stack, **fields)
    assert first.finished.usage.cached_prompt_tokens == 4
    assert first.text == second.text
    assert generate(stack, **{**fields, "seed": 8}).text != first.text


def test_stop_string_ends_generation_and_is_not_returned(stack: Stack) -> None:
    free = generate(stack, prompt="Once upon a time", max_tokens=24, **GREEDY).text
    stop = free.split()[3]  # a word the greedy continuation is known to contain
    result = generate(stack, prompt="Once upon a time", max_tokens=24, stop=[stop], **GREEDY)
    assert result.finished.reason == generate_pb2.FINISH_REASON_STOP
    assert result.text == free[: free.index(stop)]
    assert stop not in result.text


def test_sampled_text_is_always_whole_characters(stack: Stack) -> None:
    # Hot sampling over a multilingual prompt visits byte-fallback tokens and split characters.
    result = generate(
        stack,
        prompt="日本語、中文、한국어, emoji 🙂🚀 and Ελληνικά:",
        max_tokens=64,
        temperature=2.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        seed=3,
    )
    assert result.finished.reason in (
        generate_pb2.FINISH_REASON_LENGTH,
        generate_pb2.FINISH_REASON_STOP,
    )
    for delta in result.deltas:
        delta.encode("utf-8")  # raises on a lone surrogate


def test_concurrent_streams_are_decoded_together(stack: Stack) -> None:
    def run(i: int):  # type: ignore[no-untyped-def]
        return generate(stack, prompt=f"Story number {i}:", max_tokens=24, seed=i)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    assert all(r.finished.usage.completion_tokens == 24 for r in results)
    # Each one's first token came before the earliest of them finished: they shared steps.
    earliest_end = min(r.finished.timings.total_ms for r in results)
    assert all(r.finished.timings.time_to_first_token_ms < earliest_end for r in results)


def test_concurrent_requests_may_share_a_request_id(stack: Stack) -> None:
    def run(max_tokens: int):  # type: ignore[no-untyped-def]
        return generate(stack, prompt="Hello", max_tokens=max_tokens, request_id="same-id")

    with ThreadPoolExecutor(2) as pool:
        short, long = pool.map(run, (4, 12))
    assert short.finished.usage.completion_tokens == 4
    assert long.finished.usage.completion_tokens == 12


def test_cancelled_stream_frees_its_slot_within_a_decode_step(stack: Stack) -> None:
    engine = stack.engine("gemma-3-270m")
    call = stack.host_stub.Generate(host_request(prompt="Count: 1, 2, 3,", max_tokens=400))
    for _ in range(3):
        next(call)
    assert engine.load().slots_busy == 1
    before = engine.load().tokens_generated
    call.cancel()
    wait_until(lambda: engine.load().slots_busy == 0, 5)
    # Only the tokens already in flight when the cancel landed were decoded.
    assert engine.load().tokens_generated - before <= 5


def test_requests_past_the_queue_limit_get_resource_exhausted(stack: Stack) -> None:
    stub = stack.host_stub
    running = stub.Generate(host_request(model="gemma-one-slot", prompt="A", max_tokens=300))
    next(running)  # holds the only slot
    waiting = stub.Generate(host_request(model="gemma-one-slot", prompt="B", max_tokens=2))
    engine = stack.engine("gemma-one-slot")
    wait_until(lambda: engine.load().queued >= 1, 5)
    error = rpc_error(stub.Generate(host_request(model="gemma-one-slot", prompt="C")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in error.details() and "gemma-one-slot" in error.details()
    running.cancel()
    # The waiting request is served as soon as the slot frees.
    assert collect(waiting).finished.usage.completion_tokens == 2


def test_unknown_model_is_not_found_naming_the_models(stack: Stack) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(model="llama-9000", prompt="hi")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "llama-9000" in error.details() and "gemma-3-270m" in error.details()


@pytest.mark.parametrize("fields", [{}, {"prompt": ""}, {"messages": []}], ids=str)
def test_request_without_prompt_or_messages_is_invalid(stack: Stack, fields: dict) -> None:  # type: ignore[type-arg]
    request = host_request(**fields)
    if "messages" in fields:
        request.chat.SetInParent()  # a chat with no turns
    error = rpc_error(stack.host_stub.Generate(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in error.details() and "messages" in error.details()


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -0.5, "[0.0, 2.0]"),
        ("temperature", 50.0, "[0.0, 2.0]"),
        ("temperature", math.nan, "[0.0, 2.0]"),
        ("top_p", 0.0, "(0.0, 1.0]"),
        ("top_p", 1.5, "(0.0, 1.0]"),
        ("top_k", 100000, "[0, 1000]"),
        ("min_p", 2.0, "[0.0, 1.0]"),
        ("repetition_penalty", 0.0, "[0.5, 2.0]"),
    ],
)
def test_out_of_range_sampling_is_invalid(
    stack: Stack, field: str, value: float, allowed: str
) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(prompt="hi", **{field: value})))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"sampling.{field}" in error.details() and allowed in error.details()


def test_max_tokens_beyond_the_context_left_is_invalid(stack: Stack) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(prompt="hi", max_tokens=CONTEXT)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # <bos> hi: two prompt tokens leave CONTEXT - 2.
    assert (
        "stopping.max_tokens" in error.details()
        and f"between 1 and {CONTEXT - 2}" in error.details()
    )


def test_zero_max_tokens_is_invalid(stack: Stack) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(prompt="hi", max_tokens=0)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prompt_longer_than_the_context_is_invalid_with_both_lengths(stack: Stack) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(prompt=" ".join(["word"] * 2000))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2001 tokens" in error.details() and f"context of {CONTEXT} tokens" in error.details()


def test_what_cannot_fit_is_refused_before_it_is_tokenized(stack: Stack) -> None:
    """20,000 tiny messages or 3 MB of text cost seconds of templating and tokenizing; they
    are refused at once from their count and size."""
    generate(stack, prompt="hi", max_tokens=1)  # loaded, vocabulary scanned
    wait_until(lambda: stack.host.residency.resolve("gemma-3-270m").engine.longest_token_bytes, 10)
    started = time.monotonic()
    error = rpc_error(stack.host_stub.Generate(host_request(messages=[("user", "a")] * 20_000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "20000 messages cannot fit" in error.details()
    error = rpc_error(stack.host_stub.Generate(host_request(prompt="<start_of_turn>" * 200_000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the prompt is 3000000 bytes" in error.details()
    assert time.monotonic() - started < 1.0


def test_bad_stop_strings_and_chat_roles_are_invalid(stack: Stack) -> None:
    error = rpc_error(stack.host_stub.Generate(host_request(prompt="hi", stop=[""])))
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stopping.stop[0]" in error.details()
    )
    error = rpc_error(stack.host_stub.Generate(host_request(messages=[("wizard", "hi")])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat.messages[0].role" in error.details() and "user" in error.details()


def test_list_models_reports_configured_models_and_state(stack: Stack) -> None:
    generate(stack, prompt="hi", max_tokens=1)  # the model is loaded by now
    models = {
        m.name: m for m in stack.host_stub.ListModels(model_host_pb2.ListModelsRequest()).models
    }
    default = models["gemma-3-270m"]
    assert default.state == generate_pb2.MODEL_STATE_READY
    assert list(default.aliases) == ["gemma3-270m"]
    assert default.context_length == CONTEXT and default.slots == 4


def test_health_and_reflection_are_served(stack: Stack) -> None:
    with grpc.insecure_channel(stack.host_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="airouter.v1.ModelHost")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(stream).list_services_response.service}
        assert {"airouter.v1.ModelHost", "grpc.health.v1.Health"} <= names
        # v1, as newer grpcurl and IDE clients ask first: the same messages, another name.
        v1 = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="airouter.v1.ModelHost"),
        ]
        listed, described = list(v1(iter(requests), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"airouter.v1.ModelHost", "grpc.reflection.v1.ServerReflection"} <= names
        assert described.file_descriptor_response.file_descriptor_proto


def test_chat_with_a_model_without_a_chat_template_is_a_failed_precondition(stack: Stack) -> None:
    # The embedded GGUF carries no template; without the configured fallback chat cannot work.
    bare = embedded_model_config().model_copy(update={"chat_template": None, "slots": 1})
    host = stack.loop.run(start_host(HostConfig(listen="127.0.0.1:0", models=[bare]), "cpu"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as channel:
            stub = ModelHostStub(channel)
            error = rpc_error(stub.Generate(host_request(messages=[("user", "hi")])))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "chat_template" in error.details() and "raw prompt" in error.details()
            # A raw prompt still works.
            assert (
                collect(
                    stub.Generate(host_request(prompt="hi", max_tokens=2))
                ).finished.usage.completion_tokens
                == 2
            )
    finally:
        stack.loop.run(host.stop(0))


def _describe(channel: grpc.Channel, method: str, requests: list[Any]) -> list[Any]:
    call = channel.stream_stream(
        f"/{method}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("server", ["host", "gateway"])
def test_every_symbol_reflection_lists_can_be_described(
    stack: Stack, server: str, version: str
) -> None:
    """As grpcurl describe and buf curl --list-methods walk a server: every service, each of
    its methods, and the types they take and return, then every file those name."""
    address = stack.host_address if server == "host" else stack.gateway_address
    method = f"grpc.reflection.{version}.ServerReflection"
    with grpc.insecure_channel(address) as channel:
        [listed] = _describe(
            channel, method, [reflection_pb2.ServerReflectionRequest(list_services="")]
        )
        services = [s.name for s in listed.list_services_response.service]
        assert "grpc.reflection.v1.ServerReflection" in services
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        symbols = []
        for service in services:
            [found] = _describe(
                channel,
                method,
                [reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)],
            )
            assert not found.HasField("error_response"), service
            for raw in found.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
            package, _, name = service.rpartition(".")
            [described] = [
                s for f in files.values() if f.package == package for s in f.service
                if s.name == name
            ]  # fmt: skip
            for rpc in described.method:
                symbols += [f"{service}.{rpc.name}", rpc.input_type[1:], rpc.output_type[1:]]
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols
        ]
        requests += [
            reflection_pb2.ServerReflectionRequest(file_by_filename=d)
            for f in files.values()
            for d in f.dependency
        ]
        for request, answer in zip(requests, _describe(channel, method, requests), strict=True):
            assert not answer.HasField("error_response"), request
            assert answer.file_descriptor_response.file_descriptor_proto
