"""OpenAI's Responses API on the gateway's HTTP edge, with the official `openai` SDK as the
client, on the real chat model (SmolLM2-135M-Instruct): create, stream, structured output, a
function-call round trip, a chain through previous_response_id, the store, and bad input."""

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from modelhost.config import embedded_chat_model_config
from tests.conftest import http_stack

MODEL = "smollm2"
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    chat = embedded_chat_model_config()
    assert chat is not None
    model = chat.model_copy(update={"context_length": 1024, "slots": 3, "preload": True})
    with http_stack([model]) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


def test_create_retrieve_and_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        instructions="You are a helpful assistant. Answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=30,
        temperature=0,
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and "Paris" in response.output_text
    assert response.usage is not None and response.usage.input_tokens > 10
    assert 0 < response.usage.output_tokens <= 30
    kept = client.responses.retrieve(response.id)
    assert kept.output_text == response.output_text and kept.id == response.id
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_the_stream_says_what_the_whole_response_says(client: openai.OpenAI) -> None:
    fields: dict[str, Any] = dict(
        model=MODEL, input="Write a sentence about the sea.", max_output_tokens=24, temperature=0
    )
    whole = client.responses.create(**fields)
    with client.responses.stream(**fields) as stream:
        types = []
        deltas = []
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == whole.output_text == final.output_text
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert {"response.output_item.added", "response.output_text.done"} <= set(types)
    # Streamed responses are stored too.
    assert client.responses.retrieve(final.id).output_text == whole.output_text


class City(BaseModel):
    name: str
    country: str
    population: int


def test_structured_output_through_text_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "rank": {"type": "integer"}},
        "required": ["name", "rank"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="Name a famous city as JSON with its rank.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=80,
        temperature=0,
    )
    jsonschema.validate(json.loads(response.output_text), schema)
    parsed = client.responses.parse(
        model=MODEL, input="A city as JSON.", text_format=City, max_output_tokens=80, temperature=0
    )
    assert isinstance(parsed.output_parsed, City)


def test_a_function_call_round_trip(client: openai.OpenAI) -> None:
    called = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=80,
        temperature=0,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    # The result goes back after the stored response; the model answers in text.
    answer = client.responses.create(
        model=MODEL,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=40,
        temperature=0,
    )
    assert answer.output_text and answer.previous_response_id == called.id
    # What the answer read: the question, the call and its output (newest first by default).
    read = client.responses.input_items.list(answer.id, order="asc")
    assert [item.type for item in read.data] == [
        "message", "function_call", "function_call_output",
    ]  # fmt: skip
    assert read.data[1].call_id == read.data[2].call_id == calls[0].call_id  # type: ignore[union-attr]
    newest = client.responses.input_items.list(answer.id, limit=1)
    assert newest.data[0].type == "function_call_output" and newest.has_more
    # Streamed, the call's arguments arrive as deltas.
    with client.responses.stream(
        model=MODEL,
        input="Weather in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,  # a model this small, free to, repeats its call
        max_output_tokens=80,
        temperature=0,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert "".join(deltas) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_a_three_turn_chain_goes_where_its_start_is_cached(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        instructions="You are a patient tutor.",
        input="My name is Ada and I study the history of mathematics at university.",
        max_output_tokens=30,
        temperature=0,
    )
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input="Which mathematician should I read first?",
        max_output_tokens=30,
        temperature=0,
    )
    third = client.responses.create(
        model=MODEL,
        previous_response_id=second.id,
        input="And after that one?",
        max_output_tokens=30,
        temperature=0,
    )
    usages = [r.usage for r in (first, second, third)]
    assert all(u is not None for u in usages)
    inputs = [u.input_tokens for u in usages if u is not None]
    # Each turn reads the whole conversation before it...
    assert inputs[0] < inputs[1] < inputs[2]
    assert inputs[2] > inputs[1] + (second.usage.output_tokens if second.usage else 0)
    # ...most of which the host still held.
    assert (
        third.usage is not None and third.usage.input_tokens_details.cached_tokens > inputs[1] // 2
    )
    # A response that was not stored cannot be continued.
    unstored = client.responses.create(
        model=MODEL, input="Hi", store=False, max_output_tokens=5, temperature=0
    )
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="Again")
    assert "store" in missing.value.message


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": "hi", "temprature": 1}, "temprature"),
        ({"model": MODEL, "input": 5}, "input"),
        (
            {
                "model": MODEL,
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}],
            },
            "input_image",
        ),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, "web_search"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "needs tools"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
        ({"model": MODEL, "input": "hi", "truncation": "auto"}, "truncation"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field(
    client: openai.OpenAI, body: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/responses", body=body, cast_to=object)
    assert named in refused.value.message, refused.value.message
