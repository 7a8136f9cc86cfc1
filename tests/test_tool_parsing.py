"""Tool calls parsed from recorded outputs of each family's format (Hermes/Qwen, Llama 3.x,
Mistral, and the generic JSON fallback), whole and split across deltas at every point,
including malformed and unfinished calls: nothing the model wrote is lost."""

# ruff: noqa: E501 (recorded model outputs are kept whole, one per line)
import json

import pytest

from airouter.output import Tool, ToolCallDelta
from modelhost.generation import Delta
from modelhost.tools import (
    CallFormat,
    ToolCallParser,
    call_format,
    fallback_turns,
    render_with_template,
)

TOOLS = frozenset({"get_weather", "get_time"})


def parse(form: CallFormat, text: str, *, step: int = 0) -> tuple[str, list[tuple[str, dict]]]:
    """Feeds text whole (step 0) or `step` characters at a time; returns the text that came
    out and the calls (name, arguments)."""
    parser = ToolCallParser(form, TOOLS)
    pieces = [text] if not step else [text[i : i + step] for i in range(0, len(text), step)]
    events = []
    for piece in pieces:
        events += parser.feed(Delta(piece, 1))
    events += parser.finish()
    texts = "".join(e.text for e in events if isinstance(e, Delta))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [c.call_index for c in calls] == list(range(len(calls)))
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == len(calls)
    # No token goes uncounted: every delta fed is carried by some delta out.
    assert sum(e.token_count for e in events if isinstance(e, Delta)) == len(pieces)
    return texts, [(c.name, json.loads(c.arguments)) for c in calls]


PARIS = {"city": "Paris"}
RECORDED = [
    # Hermes / Qwen 2.5 / Qwen 3
    (CallFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [("get_weather", PARIS)]),
    (CallFormat.HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me check.\n", [("get_weather", PARIS)]),
    (CallFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>', "", [("get_weather", PARIS), ("get_time", {"city": "Tokyo"})]),
    (CallFormat.HERMES, "It is sunny in Paris.", "It is sunny in Paris.", []),
    (CallFormat.HERMES, "Compare a < b and <tool> tags.", "Compare a < b and <tool> tags.", []),
    # Malformed: bad JSON, an unknown tool, an unfinished block: all text.
    (CallFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    (CallFormat.HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    (CallFormat.HERMES, '<tool_call>\n{"name": "get_weather", "argum', '<tool_call>\n{"name": "get_weather", "argum', []),
    # A closing tag inside an argument's string does not end the call.
    (CallFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n</tool_call>', "", [("get_weather", {"city": "a</tool_call>b"})]),
    # Arguments written as a JSON string, as some models do.
    (CallFormat.HERMES, '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', "", [("get_weather", PARIS)]),
    # The generic fallback: a bare JSON call, a list of calls, OpenAI's own shape.
    (CallFormat.HERMES, '{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [("get_weather", PARIS)]),
    (CallFormat.HERMES, '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "parameters": {"city": "Oslo"}}]', "", [("get_weather", PARIS), ("get_time", {"city": "Oslo"})]),
    (CallFormat.HERMES, '{"tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}', "", [("get_time", {})]),
    (CallFormat.HERMES, '{"answer": 42}', '{"answer": 42}', []),
    # Llama 3.1 / 3.2 / 3.3
    (CallFormat.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", PARIS)]),
    (CallFormat.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", PARIS)]),
    (CallFormat.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"city": "Rome"}}', "", [("get_weather", PARIS), ("get_time", {"city": "Rome"})]),
    (CallFormat.LLAMA3, "The weather is fine.", "The weather is fine.", []),
    (CallFormat.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Par', '{"name": "get_weather", "parameters": {"city": "Par', []),
    # Mistral (v3 and Nemo)
    (CallFormat.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"city": "Lima"}}]', "", [("get_weather", PARIS), ("get_time", {"city": "Lima"})]),
    (CallFormat.MISTRAL, "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    (CallFormat.MISTRAL, "Sure, here you go.", "Sure, here you go.", []),
]  # fmt: skip


@pytest.mark.parametrize(("form", "output", "text", "calls"), RECORDED)
@pytest.mark.parametrize("step", [0, 1, 3, 7])
def test_recorded_outputs_parse(
    form: CallFormat, output: str, text: str, calls: list, step: int
) -> None:
    assert parse(form, output, step=step) == (text, calls)


def test_text_before_a_call_streams_before_the_call_is_complete() -> None:
    parser = ToolCallParser(CallFormat.HERMES, TOOLS)
    out = parser.feed(Delta("Checking the weather <tool", 1))
    assert [e.text for e in out if isinstance(e, Delta)] == ["Checking the weather "]
    assert parser.feed(Delta('_call>{"name": "get_weather", ', 1)) == [Delta("", 1)]
    (piece, _) = parser.feed(Delta('"arguments": {}}</tool_call>', 1))
    assert isinstance(piece, ToolCallDelta) and piece.name == "get_weather"


def test_the_family_is_read_from_the_template() -> None:
    assert call_format("{% for m in messages %}<tool_call>{% endfor %}") is CallFormat.HERMES
    assert call_format("{{- '<|python_tag|>' }}") is CallFormat.LLAMA3
    assert call_format("{{ '[TOOL_CALLS]' }}") is CallFormat.MISTRAL
    assert call_format(None) is CallFormat.HERMES


# Qwen 2.5's template, shortened: it knows tools, and is rendered as transformers renders it.
QWEN = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif not (message.role == "system" and tools) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_knows_tools_renders_them_and_the_conversation() -> None:
    tool = Tool(
        "get_weather",
        "The weather",
        '{"type": "object", "properties": {"city": {"type": "string"}}}',
    )
    messages = [
        ("user", "Weather in Oslo?"),
        ("assistant", "", "", (("call_1", "get_weather", '{"city": "Oslo"}'),)),
        ("tool", "sunny", "call_1", ()),
    ]
    text = render_with_template(QWEN, messages, (tool,))
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_fallback_prompt_offers_the_tools_and_writes_calls_as_text() -> None:
    tool = Tool("get_time", "The time")
    turns = fallback_turns(
        [
            ("system", "Be brief."),
            ("user", "Time in Lima?"),
            ("assistant", "", "", (("call_1", "get_time", '{"city": "Lima"}'),)),
            ("tool", "10:00", "call_1", ()),
        ],
        (tool,),
        offer=True,
    )
    assert turns[0][0] == "system" and turns[0][1].startswith("Be brief.")
    assert '"name": "get_time"' in turns[0][1] and "<tool_call>" in turns[0][1]
    assert turns[2] == (
        "assistant",
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>',
    )
    assert turns[3] == ("user", "<tool_response>\n10:00\n</tool_response>")
