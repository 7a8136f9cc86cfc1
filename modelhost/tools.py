"""Tool calling on the host: the prompt that offers the tools, the grammar that keeps calls
valid, and the parser that turns a choice's text into OpenAI-style calls.

A model whose chat template knows tools (it mentions them) gets them through its own Jinja
template, rendered in a sandbox as transformers does. Any other model gets the fallback: a
system message that lists the tools as JSON and asks for Hermes-style calls,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with earlier calls and results written into the conversation the same way. The call format is
the family's (from the template's text): Hermes/Qwen `<tool_call>`, Llama 3.x bare JSON,
Mistral `[TOOL_CALLS]`; Hermes for the fallback. The grammar admits free text or calls
(tool_choice auto: the call is constrained from its marker on, since free text may not hold
the marker), only calls (required), or only calls of one tool (a named function); arguments
always follow the tool's schema.
"""

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Any

from airouter.errors import FailedPrecondition, InvalidArgument
from airouter.output import (
    Call,
    OutputOptions,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Turn,
    openai_tool,
    tool_parameters,
    turn_json,
    turn_parts,
)
from modelhost.generation import Delta

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"
LLAMA_PYTHON_TAG = "<|python_tag|>"


class CallFormat(enum.Enum):
    HERMES = "hermes"  # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    LLAMA3 = "llama3"  # {"name": ..., "parameters": {...}}, optionally after <|python_tag|>
    MISTRAL = "mistral"  # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]


def call_format(template: str | None) -> CallFormat:
    """The family's call format, read from its chat template; Hermes when it says none."""
    if template:
        if MISTRAL_MARKER in template:
            return CallFormat.MISTRAL
        if LLAMA_PYTHON_TAG in template or "ipython" in template:
            return CallFormat.LLAMA3
    return CallFormat.HERMES


def knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def has_tool_turns(messages: list[Turn]) -> bool:
    return any(len(turn) > 2 for turn in messages)


# --- the prompt ---------------------------------------------------------------------------


def render_with_template(
    template: str, messages: list[Turn], tools: tuple[Tool, ...], bos: str = "", eos: str = ""
) -> str:
    """The conversation through the model's own Jinja template, sandboxed (a template is code
    from a model file): what transformers' apply_chat_template renders."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[turn_json(turn, for_template=True) for turn in messages],
            tools=[openai_tool(tool) for tool in tools] or None,
            add_generation_prompt=True,
            bos_token=bos,
            eos_token=eos,
        )
    except jinja2.TemplateError as exc:
        raise FailedPrecondition(f"the model's chat template failed: {exc}") from None


def fallback_turns(
    messages: list[Turn], tools: tuple[Tool, ...], offer: bool
) -> list[tuple[str, str]]:
    """A conversation with tools as plain turns any template renders: the tools and how to
    call them in a system message (when `offer`), calls and results as Hermes-style text."""
    turns: list[tuple[str, str]] = []
    for turn in messages:
        role, content, _call_id, calls = turn_parts(turn)
        if role == "tool":
            turns.append(("user", f"<tool_response>\n{content}\n</tool_response>"))
        elif calls:
            written = "\n".join(_hermes_call(call) for call in calls)
            turns.append((role, f"{content}\n{written}" if content else written))
        else:
            turns.append((role, content))
    if offer and tools:
        listed = "\n".join(json.dumps(openai_tool(t), ensure_ascii=False) for t in tools)
        instructions = (
            "You may call functions to help answer. The functions, as JSON schemas:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, answer with only\n"
            f'{HERMES_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n'
            f"{HERMES_CLOSE}\n"
            "one block per call. A function's result comes back in <tool_response>."
        )
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{turns[0][1]}\n\n{instructions}")
        else:
            turns.insert(0, ("system", instructions))
    return turns


def _hermes_call(call: Call) -> str:
    _id, name, arguments = call
    body = f'{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}'
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


# --- the grammar --------------------------------------------------------------------------


def call_grammar(options: OutputOptions, form: CallFormat) -> str:
    """llguidance's Lark grammar for the answer: text or calls, calls only, or calls of one
    tool, as options.tool_choice says; arguments follow each tool's schema."""
    import llguidance

    tools = options.tools
    if options.tool_choice is ToolChoice.FUNCTION:
        tools = tuple(t for t in tools if t.name == options.tool_function)
    arguments_key = "parameters" if form is CallFormat.LLAMA3 else "arguments"
    one_call = {
        # One line, as the formats write calls: no room for a small model to ramble.
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    arguments_key: _strict(tool_parameters(t)),
                },
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
            for t in tools
        ],
    }
    several = options.parallel_tool_calls
    if form is CallFormat.HERMES:
        call = f'"{HERMES_OPEN}\\n" %json {json.dumps(one_call)} "\\n{HERMES_CLOSE}"'
        calls = 'call ("\\n" call)*' if several else "call"
        text = f"/(.|\\n)*/ & ~/(.|\\n)*{_lark_regex(HERMES_OPEN)}(.|\\n)*/"
    elif form is CallFormat.MISTRAL:
        array = {"type": "array", "items": one_call, "minItems": 1}
        if not several:
            array["maxItems"] = 1
        call = f'"{_lark_string(MISTRAL_MARKER)}" %json {json.dumps(array)}'
        calls = "call"
        text = f"/(.|\\n)*/ & ~/(.|\\n)*{_lark_regex(MISTRAL_MARKER)}(.|\\n)*/"
    else:  # Llama 3: the call is the whole answer, a JSON object; text never starts with "{"
        call = f"%json {json.dumps(one_call)}"
        calls = 'call (";" call)*' if several else "call"
        text = "/[^{](.|\\n)*/"
    start = "calls" if options.tool_choice is not ToolChoice.AUTO else "TEXT | calls"
    lark = f"start: {start}\ncalls: {calls}\ncall: {call}\nTEXT: {text}\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments hold only the parameters the tool declares (as OpenAI's strict
    mode), unless its schema says otherwise."""
    if "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def _lark_regex(literal: str) -> str:
    return "".join("\\" + c if c in r"\/.^$*+?()[]{}|" else c for c in literal)


def _lark_string(literal: str) -> str:
    return literal.replace("\\", "\\\\").replace('"', '\\"')


# --- the parser ---------------------------------------------------------------------------


@dataclass
class ParsedCall:
    name: str
    arguments: str


class ToolCallParser:
    """Turns one choice's text, delta by delta, into text and tool calls.

    Hermes blocks are found as they stream: text before a block goes out at once (holding back
    what may be the start of `<tool_call>`), each block once it is closed. An answer that opens
    like a call written whole (Llama 3's JSON, Mistral's `[TOOL_CALLS]`, or the generic
    fallback: a bare JSON call or list of calls) is held to its end and parsed there. Anything
    that does not parse as calls of offered tools comes out as text: nothing the model wrote
    is lost."""

    def __init__(self, form: CallFormat, tools: frozenset[str] = frozenset()) -> None:
        self.form = form
        self.tools = tools  # the offered tools' names; empty: any name
        self.calls = 0
        self._held = ""  # text not yet sent: a possible marker, or a call being written
        self._in_call = False
        self._whole: bool | None = None  # None until the answer's opening is known

    def feed(self, delta: Delta) -> list[Delta | ToolCallDelta]:
        self._held += delta.text
        return self._with_counts(self._parse(final=False), delta)

    def finish(self) -> list[Delta | ToolCallDelta]:
        return self._parse(final=True)

    @staticmethod
    def _with_counts(out: list[Delta | ToolCallDelta], delta: Delta) -> list[Delta | ToolCallDelta]:
        """The delta's token count and logprobs go with its first text out (or are kept on an
        empty delta, so no token goes uncounted)."""
        for i, event in enumerate(out):
            if isinstance(event, Delta):
                out[i] = Delta(event.text, delta.token_count, delta.logprobs)
                return out
        out.append(Delta("", delta.token_count, delta.logprobs))
        return out

    def _parse(self, *, final: bool) -> list[Delta | ToolCallDelta]:
        out: list[Delta | ToolCallDelta] = []
        if self._whole is None:
            opening = self._held.lstrip()
            undecided = not opening or _may_open_whole(self.form, opening, partial=True)
            if undecided and not final:
                return out  # not known yet
            self._whole = _may_open_whole(self.form, opening, partial=False)
        if self._whole:
            if final and self._held:
                calls = self._whole_calls(self._held.strip())
                out.extend(self._piece(c) for c in calls) if calls else out.append(
                    Delta(self._held, 0)
                )
                self._held = ""
            return out
        if self.form is CallFormat.HERMES:
            self._hermes(out, final=final)
        elif self._held:
            out.append(Delta(self._held, 0))
            self._held = ""
        return out

    def _hermes(self, out: list[Delta | ToolCallDelta], *, final: bool) -> None:
        while self._held:
            if not self._in_call:
                if self.calls:
                    # Between and after calls: the separators the format allows, not text.
                    self._held = self._held.lstrip()
                    if not self._held:
                        return
                at = self._held.find(HERMES_OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._held, HERMES_OPEN)
                    send = self._held[: len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep :]
                    if send:
                        out.append(Delta(send, 0))
                    return
                if at:
                    out.append(Delta(self._held[:at], 0))
                self._held, self._in_call = self._held[at:], True
            # The call's JSON ends where a decoder says, not at the first closing tag: a string
            # in the arguments may hold one.
            body = len(self._held) - len(self._held[len(HERMES_OPEN) :].lstrip())
            try:
                value, end = _DECODER.raw_decode(self._held, body)
            except ValueError:  # not all written yet, or not JSON: text, once it is over
                if final:
                    out.append(Delta(self._held, 0))
                    self._held = ""
                return
            after = self._held[end:]
            close = len(after) - len(after.lstrip())
            if not after[close:].startswith(HERMES_CLOSE):
                if not final and HERMES_CLOSE.startswith(after[close:]):
                    return  # the closing tag is still being written
                block, self._held = self._held[:end], self._held[end:]
                out.append(Delta(block, 0))  # a block that does not close: text
                self._in_call = False
                continue
            block_end = end + close + len(HERMES_CLOSE)
            block, self._held = self._held[:block_end], self._held[block_end:]
            self._in_call = False
            call = self._offered(_call_of(value, "arguments"))
            out.append(self._piece(call) if call else Delta(block, 0))

    def _whole_calls(self, text: str) -> list[ParsedCall] | None:
        """The calls an answer written whole holds; None unless all of it is calls."""
        text = text.removeprefix(LLAMA_PYTHON_TAG).removeprefix(MISTRAL_MARKER).strip()
        key = "parameters" if self.form is CallFormat.LLAMA3 else "arguments"
        try:
            values = [json.loads(text)]
        except ValueError:
            values = [_json_or_none(part) for part in _split_calls(text)]
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        elif len(values) == 1 and isinstance(values[0], dict) and "tool_calls" in values[0]:
            listed = values[0]["tool_calls"]
            values = listed if isinstance(listed, list) else [None]
        calls = [self._offered(_call_of(value, key)) for value in values]
        return None if not calls or None in calls else calls  # type: ignore[return-value]

    def _offered(self, call: "ParsedCall | None") -> "ParsedCall | None":
        if call is None or (self.tools and call.name not in self.tools):
            return None
        return call

    def _piece(self, call: ParsedCall) -> ToolCallDelta:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        piece = ToolCallDelta(self.calls, call_id, call.name, call.arguments)
        self.calls += 1
        return piece


_DECODER = json.JSONDecoder()


def _may_open_whole(form: CallFormat, opening: str, *, partial: bool) -> bool:
    """Whether an answer that opens so is (partial: may yet turn out to be) a call written
    whole rather than text."""
    markers = {
        CallFormat.HERMES: ("{", "["),  # the generic fallback: a bare JSON call
        CallFormat.LLAMA3: ("{", "[", LLAMA_PYTHON_TAG),
        CallFormat.MISTRAL: (MISTRAL_MARKER,),
    }[form]
    if any(opening.startswith(m) for m in markers):
        return True
    return partial and any(m.startswith(opening) for m in markers)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_call(text: str, arguments_key: str) -> ParsedCall | None:
    """A call written as {"name": ..., "<arguments_key>": {...}}; None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _call_of(value, arguments_key)


def _call_of(value: Any, arguments_key: str) -> ParsedCall | None:
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]  # OpenAI's own shape, {"type": "function", "function": ...}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _split_calls(text: str) -> list[str]:
    """Llama 3's parallel calls: JSON objects one after another, separated by ';' or space."""
    decoder = json.JSONDecoder()
    parts, at = [], 0
    text = text.strip()
    while at < len(text):
        try:
            _value, end = decoder.raw_decode(text, at)
        except ValueError:
            return [text]
        parts.append(text[at:end])
        at = end
        while at < len(text) and text[at] in "; \n\t":
            at += 1
    return parts


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at text's end could begin the marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def check_tool_turns(messages: list[Turn]) -> None:
    """Each tool result answers a call an earlier assistant turn made."""
    made: set[str] = set()
    for i, turn in enumerate(messages):
        role, _content, call_id, calls = turn_parts(turn)
        made.update(c[0] for c in calls)
        if role == "tool" and call_id not in made:
            raise InvalidArgument(
                f"messages[{i}] answers tool call {call_id[:80]!r}, which no earlier assistant "
                "message made"
            )
