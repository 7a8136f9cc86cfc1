"""Anthropic's Messages API on the gateway's HTTP edge, with the official `anthropic` SDK as
the client, on the real chat model (SmolLM2-135M-Instruct): whole and streamed messages, stop
sequences, a tool round trip, count_tokens, and the errors, keys and headers its clients
send."""

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import jsonschema
import pytest

from gateway.anthropic import generate_request, parse_messages
from modelhost.config import embedded_chat_model_config
from tests.conftest import http_stack

MODEL = "smollm2"
# Sampling is no parameter of the newest SDK's create(); older clients send it, as here.
GREEDY = {"temperature": 0}
TOKEN = "anthropic-door-token"
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}


@dataclass
class Door:
    client: anthropic.Anthropic
    base_url: str


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    chat = embedded_chat_model_config()
    assert chat is not None
    model = chat.model_copy(update={"context_length": 1024, "slots": 3, "preload": True})
    token = tmp_path_factory.mktemp("anthropic") / "token"
    token.write_text(TOKEN)
    with http_stack([model], token_file=token) as base_url:
        # The SDK sends the key as x-api-key, and anthropic-version, as Claude Code does.
        client = anthropic.Anthropic(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=120)
        yield Door(client, base_url)


@pytest.fixture
def client(door: Door) -> anthropic.Anthropic:
    return door.client


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_a_whole_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        system="You are a helpful assistant. Answer briefly.",
        messages=ask("What is the capital of France?"),
        max_tokens=40,
        extra_body=GREEDY,
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == MODEL
    (block,) = message.content
    assert block.type == "text" and "Paris" in block.text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > 10
    assert 0 < usage.output_tokens <= 40


def test_the_stream_says_what_the_whole_message_says(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = dict(
        model=MODEL,
        messages=ask("Write a sentence about the sea."),
        max_tokens=24,
        extra_body=GREEDY,
    )
    whole = client.messages.create(**fields)
    with client.messages.stream(**fields) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert whole.content[0].type == "text"
    assert streamed == whole.content[0].text == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # The raw events, in Anthropic's order.
    events = [e.type for e in client.messages.create(stream=True, **fields)]
    assert events[0] == "message_start" and events[1] == "content_block_start"
    assert set(events[2:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_a_stop_sequence_ends_the_message_and_is_named(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = dict(
        model=MODEL,
        messages=ask("Count from one to ten in words."),
        max_tokens=40,
        extra_body=GREEDY,
    )
    text = client.messages.create(**fields).content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    message = client.messages.create(stop_sequences=["zzz-never", stop], **fields)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]
    with client.messages.stream(stop_sequences=[stop], **fields) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_a_tool_round_trip(client: anthropic.Anthropic) -> None:
    messages = ask("What is the weather in Paris?")
    called = client.messages.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        # One call: a model this small, free to call again, repeats its call to max_tokens.
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=100,
        extra_body=GREEDY,
    )
    assert called.stop_reason == "tool_use"
    uses = [b for b in called.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    # The call and its result go back; the model answers in text.
    messages = [
        *messages,
        {"role": "assistant", "content": [b.model_dump() for b in called.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 24 C"},
            ],
        },
    ]
    answer = client.messages.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=60, extra_body=GREEDY
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text


def test_a_named_tool_streams_its_input_as_json_fragments(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        messages=ask("Weather in Oslo, in celsius please."),
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        max_tokens=100,
        extra_body=GREEDY,
    ) as stream:
        fragments = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    assert json.loads("".join(fragments)) == use.input
    jsonschema.validate(use.input, WEATHER["input_schema"])


def test_output_config_format_constrains_the_answer_to_a_schema(
    client: anthropic.Anthropic,
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model=MODEL,
        messages=ask("Name a famous city and its rank, as JSON."),
        max_tokens=80,
        # output_config is a parameter of the newest SDKs only; sent as they send it.
        extra_body={
            **GREEDY,
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        },
    )
    assert message.content[0].type == "text"
    jsonschema.validate(json.loads(message.content[0].text), schema)


def test_count_tokens_counts_what_the_message_would_read(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = dict(
        model=MODEL,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=ask("What is the weather in Rome?"),
        tools=[WEATHER],
    )
    counted = client.messages.count_tokens(**fields)
    message = client.messages.create(max_tokens=1, **fields)
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > 30  # the tools are in the prompt


def test_an_unknown_model_is_a_404_listing_the_models(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-opus-4-1", messages=ask("hi"), max_tokens=5)
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert MODEL in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-opus-4-1", messages=ask("hi"))


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"model": MODEL, "max_tokens": "5", "messages": ask("hi")}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]},
            "role",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "base64", "data": ""}}],
                    }
                ],
            },
            "image",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": ask("hi"), "temprature": 1}, "temprature"),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ask("hi"),
                "tool_choice": {"type": "any"},
            },
            "needs tools",
        ),
        (
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": ask("hi"),
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools[0]",
        ),
    ],
)
def test_bad_bodies_are_anthropic_shaped_400s_naming_the_field(
    client: anthropic.Anthropic, body: dict[str, Any], named: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body=body, cast_to=object)
    error: Any = caught.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"], error


def test_keys_are_checked_and_errors_keep_anthropic_shape(door: Door) -> None:
    unkeyed = anthropic.Anthropic(base_url=door.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        unkeyed.messages.create(model=MODEL, messages=ask("hi"), max_tokens=5)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # Authorization: Bearer works as well as x-api-key.
    bearer = anthropic.Anthropic(
        base_url=door.base_url, auth_token=TOKEN, api_key=None, max_retries=0
    )
    counted = bearer.messages.count_tokens(model=MODEL, messages=ask("hi"))
    assert counted.input_tokens > 0
    # Not JSON: a 400, with the request's id as Anthropic's clients read it.
    request = urllib.request.Request(
        f"{door.base_url}/v1/messages",
        data=b"\xff{",
        headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
    )
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=30)
    assert failed.value.code == 400 and failed.value.headers["request-id"]
    body = json.loads(failed.value.read())
    assert body["error"]["type"] == "invalid_request_error" and "UTF-8" in body["error"]["message"]


def test_the_translation_of_a_conversation_with_tools() -> None:
    parsed = parse_messages(
        {
            "model": MODEL,
            "max_tokens": 9,
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            "metadata": {"user_id": "user_1_session_2"},
            "stop_sequences": ["END"],
            "top_k": 5,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "x"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "Oslo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": "failed",
                            "is_error": True,
                        },
                        {"type": "text", "text": "And now?"},
                    ],
                },
            ],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        }
    )
    request = generate_request(parsed)
    assert request.messages == (
        ("system", "A\n\nB"),
        ("user", "Weather?"),
        ("assistant", "Checking.", "", (("t1", "w", '{"c": "Oslo"}'),)),
        ("tool", "Error: failed", "t1", ()),
        ("user", "And now?"),
    )
    assert request.routing.conversation_id == "user_1_session_2"
    assert request.stopping.max_tokens == 9 and request.stopping.stop == ("END",)
    assert request.sampling.top_k == 5 and request.sampling.temperature is None
    assert request.output.tools[0].name == "w" and not request.output.parallel_tool_calls
