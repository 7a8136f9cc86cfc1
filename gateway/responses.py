"""OpenAI's Responses API as the gateway speaks it (POST /v1/responses, what Codex, opencode
and the `openai` SDK's `client.responses` send): the request schema (pydantic: a wrong type is
a 400 naming the field), its translation into the gateway's GenerateRequest, and the answer as
a whole response object or as the Responses stream's events. A thin translation onto the one
request path; stored responses (gateway.response_store) let `previous_response_id` continue a
conversation. Knows nothing of aiohttp; the HTTP edge serves it.

What has no local equivalent: `reasoning` and `include` are accepted and produce no reasoning
items (the local models answer directly), and reasoning items sent back as input are dropped;
`truncation: "auto"` is refused (a conversation too long for the model's context is a 400, as
with `"disabled"`); images, files and OpenAI's hosted tools are refused with a 400 naming
them.
"""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from airouter.errors import InvalidArgument
from airouter.openai_api import validated
from airouter.output import (
    MAX_TOOLS,
    Call,
    Constraint,
    ConstraintKind,
    OutputOptions,
    Tool,
    ToolChoice,
    Turn,
    make_turn,
    turn_parts,
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
_Name = Annotated[str, Field(strict=True, min_length=1)]
_UINT32 = (1 << 32) - 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")  # annotations, logprobs

    type: Literal["input_text", "output_text", "text", "refusal"]
    text: _Text = ""
    refusal: _Text = ""


class _UnsupportedPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_image", "input_file", "input_audio"]


def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    return "unsupported" if kind in ("input_image", "input_file", "input_audio") else "part"


Part = Annotated[
    Annotated[_Part, Tag("part")] | Annotated[_UnsupportedPart, Tag("unsupported")],
    Discriminator(_part_kind),
]


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: _Text | list[Part]


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["function_call"]
    call_id: _Name
    name: _Name
    arguments: _Text


class FunctionOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status

    type: Literal["function_call_output"]
    call_id: _Name
    output: _Text | list[Part]


class ReasoningItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else "message"
    return kind if kind in _ITEMS else "unknown"


class _UnknownItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: _Text


_ITEMS = ("message", "function_call", "function_call_output", "reasoning")
InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[_UnknownItem, Tag("unknown")],
    Discriminator(_item_kind),
]


class FunctionToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: _Text
    name: _Name | None = None
    description: _Text | None = None
    parameters: dict[str, Any] | None = None
    strict: Annotated[bool, Field(strict=True)] | None = None


class _NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: _Name


class TextFormatIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: _Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: _Text | None = None
    strict: Annotated[bool, Field(strict=True)] | None = None


class TextIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # verbosity

    format: TextFormatIn | None = None


class ResponsesRequest(BaseModel):
    """A Responses body; any field it does not know is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    model: _Name
    input: _Text | list[InputItem]
    instructions: _Text | None = None
    tools: Annotated[list[FunctionToolIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedFunction | None = None
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None
    text: TextIn | None = None
    temperature: Annotated[float, Field(strict=True, ge=0)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    max_output_tokens: Annotated[int, Field(strict=True, ge=1, le=_UINT32)] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    store: Annotated[bool, Field(strict=True)] = True
    previous_response_id: _Name | None = None
    metadata: dict[str, _Text] | None = None
    user: _Text | None = None
    prompt_cache_key: _Text | None = None  # a conversation hint, like `user`
    safety_identifier: _Text | None = None
    truncation: Literal["disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[_Text] | None = None
    service_tier: _Text | None = None
    stream_options: dict[str, Any] | None = None

    def turns(self) -> list[Turn]:
        """The input as the gateway's turns: messages, calls (an assistant turn holding the
        calls in a row) and their outputs (`tool` turns)."""
        if isinstance(self.input, str):
            return [make_turn("user", self.input)]
        turns: list[Turn] = []
        calls: list[Call] = []
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            if isinstance(item, FunctionCallItem):
                calls.append((item.call_id, item.name, item.arguments))
                continue
            if calls:
                turns.append(make_turn("assistant", "", "", tuple(calls)))
                calls = []
            if isinstance(item, _UnknownItem):
                raise InvalidArgument(
                    f"{where}.type: {item.type!r} items are not supported; send messages, "
                    "function_call and function_call_output items"
                )
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                turns.append(make_turn(role, _text(item.content, f"{where}.content")))
            elif isinstance(item, FunctionOutputItem):
                output = _text(item.output, f"{where}.output")
                turns.append(make_turn("tool", output, item.call_id))
        if calls:
            turns.append(make_turn("assistant", "", "", tuple(calls)))
        return turns

    def output(self) -> OutputOptions:
        tools = []
        for i, tool in enumerate(self.tools or ()):
            if tool.type != "function":
                raise InvalidArgument(
                    f"tools[{i}].type: {tool.type!r} is one of OpenAI's hosted tools; only "
                    "function tools run here"
                )
            if not tool.name:
                raise InvalidArgument(f"tools[{i}].name: required")
            parameters = json.dumps(tool.parameters) if tool.parameters is not None else ""
            tools.append(Tool(tool.name, tool.description or "", parameters))
        choice = self.tool_choice
        if isinstance(choice, _NamedFunction):
            mode, function = ToolChoice.FUNCTION, choice.name
        else:
            mode, function = ToolChoice(choice or "auto"), ""
        if not tools and mode in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
            raise InvalidArgument("tool_choice: a required or named call needs tools")
        constraint = None
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_object":
            constraint = Constraint(ConstraintKind.JSON_OBJECT)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise InvalidArgument("text.format.schema: required for json_schema")
            constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(fmt.schema_))
        return OutputOptions(
            constraint=constraint,
            tools=tuple(tools),
            tool_choice=mode if tools else ToolChoice.AUTO,
            tool_function=function,
            parallel_tool_calls=self.parallel_tool_calls is not False,
        )


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, _UnsupportedPart):
            raise InvalidArgument(
                f"{where}[{j}]: {part.type} parts are not supported (the local models read "
                "text); send input_text"
            )
        texts.append(part.text or part.refusal)
    return "".join(texts)


_UNKNOWN = "not a field of OpenAI's Responses API that airouter knows; check its spelling"


def parse(body: Any) -> ResponsesRequest:
    return validated(ResponsesRequest, body, _UNKNOWN)


@dataclass(frozen=True)
class Prepared:
    """A parsed request's own turns and the gateway's request for it (the caller puts the
    earlier conversation in front when it continues one)."""

    parsed: ResponsesRequest
    turns: tuple[Turn, ...]  # this request's input, without instructions
    request: GenerateRequest


def prepare(parsed: ResponsesRequest, history: tuple[Turn, ...] = ()) -> Prepared:
    """The gateway's request for a Responses body after `history` (the stored conversation
    `previous_response_id` names; its instructions are not carried over, as OpenAI's are
    not)."""
    turns = tuple(parsed.turns())
    system = (make_turn("system", parsed.instructions),) if parsed.instructions else ()
    hint = parsed.user or parsed.prompt_cache_key or ""
    request = GenerateRequest(
        model=parsed.model,
        messages=system + history + turns,
        sampling=Sampling(temperature=parsed.temperature, top_p=parsed.top_p),
        stopping=Stopping(parsed.max_output_tokens),
        routing=Routing(conversation_id=hint),
        output=parsed.output(),
    )
    return Prepared(parsed, turns, request)


# --- the answer ---------------------------------------------------------------------------


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def input_items(conversation: tuple[Turn, ...]) -> list[dict[str, Any]]:
    """The turns a response read (its conversation before its answer) as Responses input
    items, oldest first: messages, function calls and their outputs."""
    items: list[dict[str, Any]] = []
    for i, turn in enumerate(conversation):
        role, content, call_id, calls = turn_parts(turn)
        if role == "tool":
            items.append(
                {"type": "function_call_output", "id": f"fco_{i}", "call_id": call_id,
                 "output": content, "status": "completed"}
            )  # fmt: skip
            continue
        if content or not calls:
            kind = "output_text" if role == "assistant" else "input_text"
            items.append(
                {"type": "message", "id": f"msg_{i}", "role": role, "status": "completed",
                 "content": [{"type": kind, "text": content}]}
            )  # fmt: skip
        items += [ResponseShape.call_item(call) for call in calls]
    return items


def output_turns(output: ChoiceOutput) -> tuple[Turn, ...]:
    """What the model answered, as turns a next request continues after."""
    if not output.text and not output.tool_calls:
        return ()
    return (make_turn("assistant", output.text, "", output.tool_calls),)


class ResponseShape:
    """The response object of one request, in the states a stream shows it in."""

    def __init__(self, id: str, parsed: ResponsesRequest) -> None:
        self.id = id
        self.created_at = int(time.time())
        self._parsed = parsed
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        error: str = "",
        incomplete: bool = False,
    ) -> dict[str, Any]:
        parsed = self._parsed
        fmt = parsed.text.format if parsed.text and parsed.text.format else None
        text_format: dict[str, Any] = {"type": "text"}
        if fmt is not None:
            text_format = fmt.model_dump(by_alias=True, exclude_none=True)
        choice = parsed.tool_choice
        tool_choice = choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": {"code": "server_error", "message": error} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": parsed.instructions,
            "max_output_tokens": parsed.max_output_tokens,
            "model": parsed.model,
            "output": output,
            "parallel_tool_calls": parsed.parallel_tool_calls is not False,
            "previous_response_id": parsed.previous_response_id,
            "store": parsed.store,
            "temperature": parsed.temperature,
            "text": {"format": text_format},
            "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in parsed.tools or ()],
            "top_p": parsed.top_p,
            "truncation": "disabled",
            "usage": usage_json(usage) if usage is not None else None,
            "user": parsed.user,
            "metadata": parsed.metadata or {},
        }

    def message_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content if status == "completed" else [],
        }

    @staticmethod
    def call_item(call: Call, status: str = "completed") -> dict[str, Any]:
        call_id, name, arguments = call
        return {
            "type": "function_call",
            "id": f"fc_{call_id}",
            "call_id": call_id,
            "name": name,
            "arguments": arguments if status == "completed" else "",
            "status": status,
        }

    def final(self, output: ChoiceOutput, finished: Finished) -> dict[str, Any]:
        """The response as it ended."""
        items = [self.message_item(output.text)] if output.text else []
        items += [self.call_item(call) for call in output.tool_calls]
        if finished.reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            why = (
                finished.error_message
                or "the request was cancelled (the gateway or a host stopped)"
            )
            return self.body("failed", items, finished.usage, error=why)
        incomplete = finished.reason is FinishReason.LENGTH
        status = "incomplete" if incomplete else "completed"
        return self.body(status, items, finished.usage, incomplete=incomplete)


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseEvents:
    """The gateway's events of one response as the Responses stream's events, numbered:
    response.created and response.in_progress; each output item added, filled (text deltas,
    or a call's argument deltas) and done; then response.completed (or .incomplete, or
    .failed naming why)."""

    def __init__(self, shape: ResponseShape) -> None:
        self._shape = shape
        self._sequence = 0
        self._items = 0  # output items added
        self._text: str | None = None  # the open message item's text
        self._call: list[str] | None = None  # the open call: [call_id, name, arguments]
        self._call_index = -1

    def _event(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        body = self._shape.body("in_progress", [])
        return [
            self._event("response.created", response=body),
            self._event("response.in_progress", response=body),
        ]

    def on(self, event: Token | ToolCallDelta) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        index = self._items - 1
        if isinstance(event, Token):
            if not event.text:
                return out
            if self._text is None:
                out += self._close()
                self._text = ""
                index = self._items
                self._items += 1
                item = self._shape.message_item("", "in_progress")
                out.append(self._event("response.output_item.added", output_index=index, item=item))
                part = {"type": "output_text", "text": "", "annotations": []}
                out.append(
                    self._event(
                        "response.content_part.added",
                        item_id=self._shape.message_id,
                        output_index=index,
                        content_index=0,
                        part=part,
                    )
                )
            self._text += event.text
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._shape.message_id,
                    output_index=index,
                    content_index=0,
                    delta=event.text,
                    logprobs=[],
                )
            )
            return out
        if self._call is None or event.call_index != self._call_index:
            out += self._close()
            self._call = [event.id, event.name, ""]
            self._call_index = event.call_index
            index = self._items
            self._items += 1
            item = self._shape.call_item((event.id, event.name, ""), "in_progress")
            out.append(self._event("response.output_item.added", output_index=index, item=item))
        if event.arguments:
            self._call[2] += event.arguments
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=f"fc_{self._call[0]}",
                    output_index=index,
                    delta=event.arguments,
                )
            )
        return out

    def finish(self, output: ChoiceOutput, finished: Finished) -> list[dict[str, Any]]:
        out = self._close()
        final = self._shape.final(output, finished)
        kind = {"completed": "completed", "incomplete": "incomplete", "failed": "failed"}
        return [*out, self._event(f"response.{kind[final['status']]}", response=final)]

    def _close(self) -> list[dict[str, Any]]:
        index = self._items - 1
        if self._text is not None:
            text, self._text = self._text, None
            message_id = self._shape.message_id
            part = {"type": "output_text", "text": text, "annotations": []}
            return [
                self._event(
                    "response.output_text.done",
                    item_id=message_id,
                    output_index=index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done",
                    item_id=message_id,
                    output_index=index,
                    content_index=0,
                    part=part,
                ),
                self._event(
                    "response.output_item.done",
                    output_index=index,
                    item=self._shape.message_item(text),
                ),
            ]
        if self._call is not None:
            call, self._call = self._call, None
            return [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=f"fc_{call[0]}",
                    output_index=index,
                    name=call[1],
                    arguments=call[2],
                ),
                self._event(
                    "response.output_item.done",
                    output_index=index,
                    item=self._shape.call_item((call[0], call[1], call[2])),
                ),
            ]
        return []


def sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()
