"""Anthropic's Messages API as the gateway speaks it (POST /v1/messages and
/v1/messages/count_tokens, what Claude Code and the `anthropic` SDK send): the request schema
(pydantic: a wrong type is a 400 naming the field), its translation into the gateway's
GenerateRequest, and the answer as a whole message or as Anthropic's streamed events. A thin
translation: routing, failover, the cloud fallback, tracing and metrics are the one request
path's. Knows nothing of aiohttp; the HTTP edge serves it.

What the translation does with what has no local equivalent:
- `thinking` is accepted and produces no thinking blocks (the local models answer directly),
  and thinking blocks sent back in a conversation are dropped, as Anthropic itself drops those
  of earlier turns;
- `cache_control` is accepted anywhere and changes nothing: hosts reuse a prompt's KV cells
  without being asked, and report what they reused as `cache_read_input_tokens`; so are
  `output_config.effort`, `speed`, `inference_geo`, `diagnostics` and the account ids;
- `output_config.format` (a JSON Schema) constrains the answer, as structured output does on
  the OpenAI doors;
- images, documents and Anthropic's own server tools are refused with a 400 naming them.
"""

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from airouter.errors import InvalidArgument
from airouter.openai_api import validated
from airouter.output import (
    MAX_TOOLS,
    PLAIN,
    Call,
    Constraint,
    ConstraintKind,
    OutputOptions,
    Tool,
    ToolChoice,
    make_turn,
)
from gateway.generation import (
    ChoiceOutput,
    Finished,
    FinishReason,
    GenerateRequest,
    Routing,
    Sampling,
    Stopping,
    Token,
    ToolCallDelta,
    Usage,
)

_Text = Annotated[str, Field(strict=True)]
_UINT32 = (1 << 32) - 1


class _Block(BaseModel):
    # Blocks carry cache_control and citations, which change nothing here.
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Block):
    type: Literal["text"]
    text: _Text


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: Annotated[str, Field(strict=True, min_length=1)]
    name: Annotated[str, Field(strict=True, min_length=1)]
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(strict=True, min_length=1)]
    content: _Text | list[TextBlock] | None = None
    is_error: Annotated[bool, Field(strict=True)] = False

    @property
    def text(self) -> str:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(b.text for b in content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Block):
    type: Literal["thinking", "redacted_thinking"]


class _Unsupported(_Block):
    type: Literal["image", "document", "search_result", "server_tool_use", "container_upload"]


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | _Unsupported,
    Field(discriminator="type"),
]


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: _Text | list[Block]


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control

    # Custom tools only: Anthropic's own (bash_20250124, web_search_...) run on its servers.
    type: _Text | None = None
    name: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    description: _Text | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: Annotated[str, Field(strict=True, min_length=1)] | None = None
    disable_parallel_tool_use: Annotated[bool, Field(strict=True)] = False


class MetadataIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: _Text | None = None


class ThinkingIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled", "adaptive"]


class JsonFormatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: _Text | None = None  # how hard a reasoning model thinks: no effect here
    format: JsonFormatIn | None = None


class _Conversation(BaseModel):
    """What a message request and a token count share."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True, min_length=1)]
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: _Text | list[TextBlock] | None = None
    tools: Annotated[list[ToolIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    output_config: OutputConfigIn | None = None
    # Anthropic's account, caching and placement settings, which change nothing here.
    cache_control: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    inference_geo: _Text | None = None
    speed: _Text | None = None
    user_profile_id: _Text | None = None
    workspace_id: _Text | None = None
    container: None = None  # Anthropic's code-execution containers: none here

    def turns(self) -> tuple[Any, ...]:
        """The conversation as the gateway's turns: the system prompt first; a user message's
        tool results as `tool` turns (in order, before its text); an assistant's tool_use
        blocks as its calls."""
        turns = []
        if self.system:
            system = self.system
            text = system if isinstance(system, str) else "\n\n".join(b.text for b in system)
            turns.append(make_turn("system", text))
        for i, message in enumerate(self.messages):
            blocks = message.content
            if isinstance(blocks, str):
                turns.append(make_turn(message.role, blocks))
                continue
            texts: list[str] = []
            calls: list[Call] = []
            for j, block in enumerate(blocks):
                where = f"messages[{i}].content[{j}]"
                if isinstance(block, _Unsupported):
                    raise InvalidArgument(
                        f"{where}: {block.type} blocks are not supported (the local models "
                        "read text); send text blocks"
                    )
                if isinstance(block, TextBlock):
                    texts.append(block.text)
                elif isinstance(block, ToolUseBlock):
                    if message.role != "assistant":
                        raise InvalidArgument(f"{where}: tool_use blocks belong to assistant turns")
                    calls.append((block.id, block.name, json.dumps(block.input)))
                elif isinstance(block, ToolResultBlock):
                    if message.role != "user":
                        raise InvalidArgument(f"{where}: tool_result blocks belong to user turns")
                    turns.append(make_turn("tool", block.text, block.tool_use_id))
            if texts or calls or not blocks:
                turns.append(make_turn(message.role, "".join(texts), "", tuple(calls)))
        return tuple(turns)

    def output(self) -> OutputOptions:
        for i, tool in enumerate(self.tools or ()):
            if tool.type not in (None, "custom"):
                raise InvalidArgument(
                    f"tools[{i}]: {tool.type} is one of Anthropic's server tools, which run on "
                    "its servers; only custom tools (name, description, input_schema) run here"
                )
            if tool.input_schema is None:
                raise InvalidArgument(f"tools[{i}].input_schema: required")
        tools = tuple(
            Tool(t.name, t.description or "", json.dumps(t.input_schema)) for t in self.tools or ()
        )
        choice = self.tool_choice
        mode, function, parallel = ToolChoice.AUTO, "", True
        if choice is not None:
            mode = {
                "auto": ToolChoice.AUTO,
                "any": ToolChoice.REQUIRED,
                "tool": ToolChoice.FUNCTION,
                "none": ToolChoice.NONE,
            }[choice.type]
            if choice.type == "tool":
                if not choice.name:
                    raise InvalidArgument("tool_choice.name: required when type is tool")
                function = choice.name
            parallel = not choice.disable_parallel_tool_use
        constraint = None
        if self.output_config is not None and self.output_config.format is not None:
            schema = json.dumps(self.output_config.format.schema_)
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, schema)
        if not tools:
            if mode in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
                raise InvalidArgument(f"tool_choice: {choice and choice.type} needs tools")
            return PLAIN if constraint is None else OutputOptions(constraint=constraint)
        return OutputOptions(
            constraint=constraint,
            tools=tools,
            tool_choice=mode,
            tool_function=function,
            parallel_tool_calls=parallel,
        )


class MessagesRequest(_Conversation):
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=_UINT32)]
    stop_sequences: list[_Text] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    metadata: MetadataIn | None = None
    service_tier: _Text | None = None  # Anthropic's capacity tiers; one tier here
    # Sampling, as clients of Anthropic's API up to 2025 send it.
    temperature: Annotated[float, Field(strict=True, ge=0)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0, le=_UINT32)] | None = None


class CountTokensRequest(_Conversation):
    pass


_UNKNOWN = "not a field of Anthropic's Messages API that airouter knows; check its spelling"


def parse_messages(body: Any) -> MessagesRequest:
    return validated(MessagesRequest, body, _UNKNOWN)


def parse_count(body: Any) -> CountTokensRequest:
    return validated(CountTokensRequest, body, _UNKNOWN)


def generate_request(parsed: MessagesRequest | CountTokensRequest) -> GenerateRequest:
    """The gateway's request for a Messages body (the caller adds its id)."""
    if isinstance(parsed, CountTokensRequest):
        return GenerateRequest(model=parsed.model, messages=parsed.turns(), output=parsed.output())
    user = parsed.metadata.user_id if parsed.metadata else None
    return GenerateRequest(
        model=parsed.model,
        messages=parsed.turns(),
        sampling=Sampling(temperature=parsed.temperature, top_p=parsed.top_p, top_k=parsed.top_k),
        stopping=Stopping(parsed.max_tokens, tuple(parsed.stop_sequences or ())),
        routing=Routing(conversation_id=user or ""),
        output=parsed.output(),
    )


# --- the answer ---------------------------------------------------------------------------


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(finished: Finished) -> str:
    if finished.reason is FinishReason.TOOL_CALLS:
        return "tool_use"
    if finished.reason is FinishReason.LENGTH:
        return "max_tokens"
    return "stop_sequence" if finished.stop_sequence else "end_turn"


def usage_json(usage: Usage) -> dict[str, Any]:
    """Anthropic counts prompt tokens read from a cache apart from the rest."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
    }


def call_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as tool_use's `input` object. The hosts constrain arguments to JSON
    objects; anything else is kept as text under "arguments" rather than lost."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def message_json(id: str, model: str, output: ChoiceOutput, finished: Finished) -> dict[str, Any]:
    """A whole (non-streamed) message."""
    content: list[dict[str, Any]] = []
    if output.text:
        content.append({"type": "text", "text": output.text})
    for call_id, name, arguments in output.tool_calls:
        content.append(
            {"type": "tool_use", "id": call_id, "name": name, "input": call_input(arguments)}
        )
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finished),
        "stop_sequence": finished.stop_sequence or None,
        "usage": usage_json(finished.usage),
    }


class MessageEvents:
    """The gateway's events of one message as Anthropic's stream events: message_start and a
    ping, then each content block (text, or a tool_use whose input arrives as JSON fragments)
    opened, filled and closed in turn, then message_delta with the stop reason and usage, and
    message_stop. A stream that fails after it began ends with an `error` event naming why."""

    def __init__(self, id: str, model: str) -> None:
        self._id = id
        self._model = model
        self._blocks = 0  # content blocks opened
        self._open: str | None = None  # the open block's kind: "text", "tool_use"
        self._call = -1  # the call index of the open tool_use block

    def start(self) -> list[dict[str, Any]]:
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def on(self, event: Token | ToolCallDelta | Finished) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(event, Token):
            if event.text:
                out += self._switch("text")
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            return out
        if isinstance(event, ToolCallDelta):
            if self._open != "tool_use" or event.call_index != self._call:
                out += self._switch("tool_use", event)
                self._call = event.call_index
            if event.arguments:
                delta = {"type": "input_json_delta", "partial_json": event.arguments}
                out.append(self._delta(delta))
            return out
        out += self._close()
        if event.reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            why = event.error_message or "the request was cancelled (the gateway or a host stopped)"
            out.append({"type": "error", "error": {"type": "api_error", "message": why}})
            return out
        ending = {"stop_reason": stop_reason(event), "stop_sequence": event.stop_sequence or None}
        out.append({"type": "message_delta", "delta": ending, "usage": usage_json(event.usage)})
        out.append({"type": "message_stop"})
        return out

    def _switch(self, kind: str, call: ToolCallDelta | None = None) -> list[dict[str, Any]]:
        if self._open == kind == "text":
            return []
        out = self._close()
        if call is None:
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        out.append({"type": "content_block_start", "index": self._blocks, "content_block": block})
        self._open = kind
        self._blocks += 1
        return out

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": self._blocks - 1}]


def sse(event: dict[str, Any]) -> bytes:
    """One event as Anthropic streams it: its type on the `event:` line as well."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


# gRPC status name -> (HTTP status, Anthropic error type), as Anthropic's API answers.
HTTP_FOR_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "ALREADY_EXISTS": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "api_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "UNAVAILABLE": (529, "overloaded_error"),
}


def error_json(status_name: str, message: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and Anthropic-shaped error body for a status name."""
    status, kind = HTTP_FOR_STATUS.get(status_name, (500, "api_error"))
    return status, {"type": "error", "error": {"type": kind, "message": message}}
