"""Structured output, tools, log probabilities and n through the gateway's HTTP edge, with the
official `openai` SDK (and LangChain) as clients, on the real models: SmolLM2-135M-Instruct
(49k vocabulary, ChatML without tools: the fallback prompt) and Gemma 3 270M (262k)."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from airouter import cli
from airouter.v1 import generate_pb2
from airouter.v1.gateway_pb2_grpc import GatewayStub
from gateway.server import start_gateway
from modelhost.config import HostConfig, embedded_chat_model_config, embedded_model_config
from modelhost.server import RunningHost, start_host
from tests.conftest import LoopThread, gateway_config, wait_for_health
from tests.streaming import gateway_request

SMOL, GEMMA = "smollm2", "gemma-3-270m"

# Objects, arrays, enums, integers and numbers, required and optional fields, patterns.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,10}$"},
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "nickname": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


@dataclass
class Served:
    client: openai.OpenAI
    gateway_address: str
    host: RunningHost


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    chat = embedded_chat_model_config()
    assert chat is not None
    gemma = embedded_model_config()
    config = HostConfig(
        listen="127.0.0.1:0",
        device="cpu",
        cache_dir=Path.home() / ".cache" / "airouter",
        models=[
            chat.model_copy(update={"context_length": 1024, "slots": 5}),
            gemma.model_copy(update={"context_length": 512, "slots": 5, "preload": True}),
        ],
    )
    loop = LoopThread()
    host = loop.run(start_host(config, "cpu"))
    wait_for_health(f"127.0.0.1:{host.port}")
    gateway = loop.run(
        start_gateway(gateway_config([f"127.0.0.1:{host.port}"], http_listen="127.0.0.1:0"))
    )
    assert gateway.http is not None
    base_url = f"http://127.0.0.1:{gateway.http.port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    yield Served(client, f"127.0.0.1:{gateway.port}", host)
    loop.run(gateway.stop(0))
    loop.run(host.stop(0))
    loop.close()


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return served.client


def ask(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def streamed_choices(stream: Any) -> tuple[dict[int, str], dict[int, str]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_twenty_seeded_answers_follow_a_nested_schema(client: openai.OpenAI, model: str) -> None:
    outputs: list[str] = []
    for seed, stream in ((1, False), (2, True), (3, False), (4, True)):
        fields: dict[str, Any] = dict(
            model=model,
            messages=ask("Describe a person as JSON: name, age, role, tags and address."),
            response_format=schema_format(PERSON),
            temperature=0.8,
            seed=seed,
            n=5,
            max_tokens=200,
        )
        if stream:
            texts, reasons = streamed_choices(client.chat.completions.create(stream=True, **fields))
        else:
            response = client.chat.completions.create(**fields)
            texts = {c.index: c.message.content or "" for c in response.choices}
            reasons = {c.index: c.finish_reason for c in response.choices}
            assert response.usage is not None and response.usage.completion_tokens > 0
        assert sorted(texts) == [0, 1, 2, 3, 4] and set(reasons.values()) == {"stop"}, reasons
        outputs += texts.values()
    for text in outputs:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(outputs)) > 1  # seeded draws, not one answer twenty times


def test_json_object_mode_always_parses(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SMOL,
        messages=ask("Reply with a JSON object with two keys: the name and the color of a cat."),
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0.5,
        seed=5,
        n=3,
    )
    texts = [c.message.content or "" for c in response.choices]
    # Gemma 3 270M is a base model: a raw prompt it continues, constrained the same way.
    completion = client.completions.create(
        model=GEMMA,
        prompt=(
            'Cat: {"name": "Tom", "color": "grey"}\nCat: {"name": "Kit", "color": "white"}\nCat:'
        ),
        max_tokens=200,
        temperature=0.5,
        seed=5,
        n=3,
        extra_body={"response_format": {"type": "json_object"}},
    )
    texts += [c.text for c in completion.choices]
    reasons = [c.finish_reason for c in (*response.choices, *completion.choices)]
    assert reasons == ["stop"] * 6, list(zip(reasons, texts, strict=True))
    for text in texts:
        assert isinstance(json.loads(text), dict)


def test_regex_and_grammar_extensions(client: openai.OpenAI) -> None:
    date = client.chat.completions.create(
        model=SMOL,
        messages=ask("When did the Berlin wall fall?"),
        extra_body={"response_format": {"type": "regex", "regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}},
        max_tokens=20,
        temperature=0,
    )
    text = date.choices[0].message.content or ""
    assert len(text) == 10 and text[4] == "-" and text[7] == "-", text
    answer = client.chat.completions.create(
        model=SMOL,
        messages=ask("Is the sky blue?"),
        extra_body={
            "response_format": {
                "type": "grammar",
                "syntax": "gbnf",
                "grammar": 'root ::= "yes" | "no"',
            }
        },
        max_tokens=5,
        temperature=0,
    )
    assert answer.choices[0].message.content in ("yes", "no")


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user", "guest"]


def test_the_sdk_s_parse_helper_gets_its_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=SMOL,
        messages=ask("Invent a person with a name, an age and a role."),
        response_format=Person,
        max_tokens=100,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and parsed.role in ("admin", "user", "guest")


def test_langchain_structured_output(client: openai.OpenAI) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=SMOL, base_url=str(client.base_url), api_key="none", temperature=0, max_tokens=100
    )
    person = llm.with_structured_output(Person).invoke("Invent a person: name, age, role.")
    assert isinstance(person, Person)
    by_tool = llm.with_structured_output(Person, method="function_calling").invoke(
        "Invent a person: name, age, role."
    )
    assert isinstance(by_tool, Person)


def arguments_valid(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choices_always_call(client: openai.OpenAI, stream: bool) -> None:
    for seed, choice in enumerate(
        ["required", {"type": "function", "function": {"name": "get_time"}}]
    ):
        fields: dict[str, Any] = dict(
            model=SMOL,
            messages=ask("What is the weather in Paris?"),
            tools=[WEATHER, TIME],
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0.9,
            seed=seed,
            n=3,
            max_tokens=80,
        )
        if stream:
            calls: dict[int, dict[int, dict[str, str]]] = {}
            reasons = {}
            for chunk in client.chat.completions.create(stream=True, **fields):
                for c in chunk.choices:
                    for call in c.delta.tool_calls or ():
                        entry = calls.setdefault(c.index, {}).setdefault(
                            call.index, {"id": "", "name": "", "arguments": ""}
                        )
                        entry["id"] += call.id or ""
                        entry["name"] += (call.function and call.function.name) or ""
                        entry["arguments"] += (call.function and call.function.arguments) or ""
                    if c.finish_reason:
                        reasons[c.index] = c.finish_reason
            assert set(reasons.values()) == {"tool_calls"}, reasons
            for index in range(3):
                (call,) = calls[index].values()
                assert call["id"].startswith("call_")
                tool = WEATHER if call["name"] == "get_weather" else TIME
                jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
                if choice != "required":
                    assert call["name"] == "get_time"
        else:
            response = client.chat.completions.create(**fields)
            for c in response.choices:
                assert c.finish_reason == "tool_calls" and c.message.content is None
                (call,) = c.message.tool_calls or []
                tool = WEATHER if call.function.name == "get_weather" else TIME
                arguments_valid(call, tool)
                if choice != "required":
                    assert call.function.name == "get_time"


def test_a_tool_round_trip_through_the_sdk(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "You are a weather assistant. Be brief."},
        {"role": "user", "content": "What's the weather in Oslo?"},
    ]
    first = client.chat.completions.create(
        model=SMOL, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = first.choices[0].message.tool_calls or []
    assert arguments_valid(call, WEATHER)["city"]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "c": 21}'}
    )
    answer = client.chat.completions.create(
        model=SMOL, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    # A tool result must answer a call the conversation made.
    with pytest.raises(openai.BadRequestError) as orphan:
        client.chat.completions.create(
            model=SMOL,
            messages=[*messages[:2], {"role": "tool", "tool_call_id": "nope", "content": "x"}],
            max_tokens=5,
        )
    assert "answers tool call 'nope'" in orphan.value.message


def test_parallel_calls(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SMOL,
        messages=ask("Get the weather in Paris and the time in Tokyo."),
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    calls = response.choices[0].message.tool_calls or []
    assert len(calls) >= 2, calls
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        arguments_valid(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_logprobs_on_chat_and_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=SMOL, messages=ask("Say hello."), max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        ranked = [t.logprob for t in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
    streamed = client.chat.completions.create(
        model=SMOL, messages=ask("Say hello."), max_tokens=6, temperature=0, logprobs=True,
        stream=True,
    )  # fmt: skip
    tokens = [
        t
        for chunk in streamed
        for c in chunk.choices
        for t in (c.logprobs and c.logprobs.content) or ()
    ]
    assert [t.token for t in tokens] == [t.token for t in content]
    legacy = client.completions.create(
        model=GEMMA, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and lp.tokens and "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(top) <= 2 for top in lp.top_logprobs or [])


def test_n_choices_share_the_prompt_and_sum_usage(client: openai.OpenAI) -> None:
    prompt = "Write one sentence about the sea. " * 8
    single = client.chat.completions.create(
        model=SMOL, messages=ask(prompt), max_tokens=10, temperature=0
    )
    several = client.chat.completions.create(
        model=SMOL, messages=ask(prompt), max_tokens=10, temperature=1.0, seed=7, n=4
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.usage is not None and single.usage is not None
    assert several.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert several.usage.completion_tokens == 40
    assert len({c.message.content for c in several.choices}) > 1


HUGE = schema_format({"type": "object", "x": "y" * (1 << 20)})
SELF_REF = schema_format({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}})
ENDLESS = schema_format({"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]})
NOPE = {"type": "function", "function": {"name": "nope"}}
LOOP = {"type": "grammar", "grammar": 'start: "a" start'}


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"response_format": HUGE}, "response_format", "KiB"),
        ({"response_format": SELF_REF}, "response_format", "admits no output"),
        ({"response_format": ENDLESS}, "response_format", "never ends"),
        ({"response_format": LOOP}, "response_format", "never ends"),
        ({"response_format": schema_format({"type": "strin"})}, "response_format", "strin"),
        ({"tools": [WEATHER] * 1000}, "tools", "at most 256 tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "given twice"),
        ({"tools": [WEATHER], "tool_choice": NOPE}, "tool_choice", "not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 17}, "n", "less than or equal to 16"),
    ],
)  # fmt: skip
def test_hostile_output_options_are_cheap_400s_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str, needle: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=SMOL, messages=ask("Hi"), max_tokens=5, extra_body=extra
        )
    assert needle in refused.value.message, refused.value.message
    assert refused.value.param == param  # type: ignore[attr-defined]
    assert time.perf_counter() - started < 5  # refused before any host was asked


def test_constrained_and_free_requests_are_decoded_together(served: Served) -> None:
    """(That the free ones' text is unchanged by it is test_batching's: there the batch's shape
    can be held equal, which HTTP requests cannot.)"""

    def free() -> str:
        response = served.client.chat.completions.create(
            model=SMOL, messages=ask("Tell me about the moon."), max_tokens=40, temperature=0
        )
        return response.choices[0].message.content or ""

    def constrained(seed: int) -> str:
        response = served.client.chat.completions.create(
            model=SMOL,
            messages=ask("Describe a person as JSON."),
            response_format=schema_format(PERSON),
            max_tokens=150,
            temperature=0.8,
            seed=seed,
        )
        return response.choices[0].message.content or ""

    engine = served.host.residency.resolve(SMOL).engine
    assert engine is not None
    before = engine.load()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(constrained, seed) for seed in range(3)]
        beside = pool.submit(free)
        assert beside.result()
        for other in others:
            jsonschema.validate(json.loads(other.result()), PERSON)
    after = engine.load()
    steps = after.decode_steps - before.decode_steps
    tokens = after.tokens_generated - before.tokens_generated
    assert tokens / steps > 1.5  # they were decoded together, several tokens a step


def test_a_batch_file_with_response_format_gives_json_in_every_result(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        {
            "custom_id": f"person-{i}",
            "url": "/v1/chat/completions",
            "body": {
                "model": SMOL,
                "messages": ask(f"Describe person number {i} as JSON."),
                "response_format": schema_format(PERSON),
                "max_tokens": 200,
                "temperature": 0.7,
                "seed": i,
                "logprobs": i == 0,
            },
        }
        for i in range(6)
    ]
    lines.append(
        {
            "custom_id": "call",
            "url": "/v1/chat/completions",
            "body": {
                "model": SMOL,
                "messages": ask("Weather in Rome?"),
                "tools": [WEATHER],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "max_tokens": 60,
                "n": 2,
            },
        }
    )
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    argv = ["--gateway", served.gateway_address, "batch", "submit", str(requests), "--wait"]
    assert cli.main([*argv, "-o", str(output)]) == 0, capsys.readouterr().err
    results = {json.loads(line)["custom_id"]: json.loads(line) for line in output.open()}
    for i in range(6):
        body = results[f"person-{i}"]["response"]["body"]
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PERSON)
        assert bool(body["choices"][0]["logprobs"]) == (i == 0)
    call = results["call"]["response"]["body"]
    assert [c["index"] for c in call["choices"]] == [0, 1]
    for choice in call["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        (made,) = choice["message"]["tool_calls"]
        assert made["function"]["name"] == "get_weather"
        jsonschema.validate(
            json.loads(made["function"]["arguments"]), WEATHER["function"]["parameters"]
        )


def test_the_gateway_s_grpc_door_carries_output_options_and_tool_calls(served: Served) -> None:
    stub = GatewayStub(grpc.insecure_channel(served.gateway_address))
    request = gateway_request(
        model=SMOL, messages=[("user", "What is the weather in Rome?")], max_tokens=60
    )
    weather = WEATHER["function"]
    request.output.tools.add(
        name=weather["name"],
        description=weather["description"],
        parameters=json.dumps(weather["parameters"]),
    )
    request.output.tool_choice.mode = generate_pb2.TOOL_CHOICE_MODE_REQUIRED
    request.output.parallel_tool_calls = False
    request.output.logprobs = True
    calls = []
    finished = None
    for response in stub.Generate(request, timeout=120):
        if response.HasField("tool_call"):
            calls.append(response.tool_call)
        elif response.HasField("finished"):
            finished = response.finished
        else:
            assert response.token.text  # empty deltas are never sent
    assert finished is not None and finished.reason == generate_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), weather["parameters"])
    # An enum value this gateway does not know is the caller's error, named.
    request.output.tool_choice.mode = 99  # type: ignore[assignment]
    with pytest.raises(grpc.RpcError) as unknown:
        list(stub.Generate(request, timeout=30))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tool_choice.mode 99 is unknown" in unknown.value.details()


def test_a_hundred_realistic_tools_work(served: Served) -> None:
    """A hundred tools of every parameter type: the grammar compiles, and every call made is
    one of them with valid arguments. (Offered in a chat, a hundred such tools are
    some 17,000 tokens of prompt, more than these small models hold; a raw prompt carries the
    same grammar.)"""
    from bench.structured import realistic_tools

    tools = realistic_tools(100)
    stub = GatewayStub(grpc.insecure_channel(served.gateway_address))
    shown = "\n".join(f"- {t.name}: {t.description}" for t in tools[:10])
    request = gateway_request(
        model=SMOL, prompt=f"Tools:\n{shown}\nA call:\n", max_tokens=400, temperature=0.5, seed=3
    )
    for tool in tools:
        request.output.tools.add(
            name=tool.name, description=tool.description, parameters=tool.parameters
        )
    request.output.tool_choice.mode = generate_pb2.TOOL_CHOICE_MODE_REQUIRED
    request.output.parallel_tool_calls = False
    request.output.n = 3
    calls = {}
    for response in stub.Generate(request, timeout=120):
        if response.HasField("tool_call"):
            calls[response.tool_call.choice_index] = response.tool_call
        elif response.HasField("finished"):
            reasons = {c.index: c.reason for c in response.finished.choices}
    # A small model may ramble in a free string until max_tokens (its call is then unfinished,
    # and comes back as text); every call that is made is one of the tools, valid.
    done = [i for i, reason in reasons.items() if reason == generate_pb2.FINISH_REASON_TOOL_CALLS]
    assert done and set(reasons.values()) <= {
        generate_pb2.FINISH_REASON_TOOL_CALLS,
        generate_pb2.FINISH_REASON_LENGTH,
    }
    offered = {t.name: json.loads(t.parameters) for t in tools}
    assert sorted(calls) == done
    for call in calls.values():
        jsonschema.validate(json.loads(call.arguments), offered[call.name])
