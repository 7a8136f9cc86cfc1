"""The OpenAI HTTP API as airouter speaks it: request schemas (pydantic, so a wrong type is a
400 naming the field) and the JSON shapes of completions, chunks, usage and errors. Used by the
gateway's HTTP edge and by batch files; it knows nothing of transports.
"""

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from airouter import installed_version
from airouter.errors import InvalidArgument
from airouter.infill import Infill
from airouter.output import (
    MAX_CHOICES,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    PLAIN,
    Call,
    Constraint,
    ConstraintKind,
    OutputOptions,
    TokenLogprob,
    Tool,
    ToolChoice,
    Turn,
    make_turn,
)
from airouter.v1 import generate_pb2

# What OpenAI's answers name as the configuration that produced them (system_fingerprint).
SYSTEM_FINGERPRINT = f"fp_airouter_{installed_version()}"
# Strict: JSON true is no number and 1.0 no integer. Bounds are the protocol's field sizes.
_UINT32 = (1 << 32) - 1
StrictText = Annotated[str, Field(strict=True)]
Probability = Annotated[float, Field(strict=True, ge=0, le=1)]


# The sampling parameters of a body, as the protocol's SamplingParameters names them.
SAMPLING_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[bool, Field(strict=True)] = False


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class _JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(strict=True)] = "response"
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(
        default_factory=lambda: {"type": "object"}
    )
    strict: Annotated[bool, Field(strict=True)] | None = None


class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: _JsonSchema


class _RegexFormat(BaseModel):
    """An extension: the whole answer matches a regular expression (Rust regex syntax)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["regex"]
    regex: Annotated[str, Field(strict=True, min_length=1)]


class _GrammarFormat(BaseModel):
    """An extension: the answer follows a grammar, llguidance's Lark or llama.cpp's GBNF."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["grammar"]
    grammar: Annotated[str, Field(strict=True, min_length=1)]
    syntax: Literal["lark", "gbnf"] = "lark"


ResponseFormat = Annotated[
    _TextFormat | _JsonObjectFormat | _JsonSchemaFormat | _RegexFormat | _GrammarFormat,
    Field(discriminator="type"),
]


class _FunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(strict=True, min_length=1)]
    description: Annotated[str, Field(strict=True)] | None = None
    parameters: dict[str, Any] | None = None
    strict: Annotated[bool, Field(strict=True)] | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _FunctionIn


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(strict=True, min_length=1)]


class _NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _FunctionName


class _CompletionParams(BaseModel):
    """What chat and text completions share: OpenAI's fields, the sampling extensions that
    llama-server and vLLM users send (top_k, min_p, repetition_penalty, ignore_eos), and
    OpenAI fields airouter cannot honour, accepted only at their neutral value. Any other field
    is a 400 naming it: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(strict=True, min_length=1)]
    temperature: Annotated[float, Field(strict=True, ge=0)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(strict=True, ge=0, le=_UINT32)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(strict=True, gt=0)] | None = None
    seed: Annotated[int, Field(strict=True, ge=0, le=(1 << 64) - 1)] | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=_UINT32)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=_UINT32)] | None = None
    stop: str | list[StrictText] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    # The caller's end user: a conversation's affinity hint for routing.
    user: Annotated[str, Field(strict=True)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] | None = None
    response_format: ResponseFormat | None = None
    # What airouter cannot do is refused, never silently ignored.
    echo: Literal[False] | None = None
    # OpenAI's, at their neutral values only (what clients such as LangChain send by default).
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    # OpenAI's bookkeeping, which changes nothing here.
    metadata: dict[str, Any] | None = None
    store: Annotated[bool, Field(strict=True)] | None = None
    service_tier: Annotated[str, Field(strict=True)] | None = None
    # An extension: keep generating past end-of-generation tokens (benchmarks).
    ignore_eos: Annotated[bool, Field(strict=True)] = False

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters the client set, by the protocol's names."""
        values = {name: getattr(self, name) for name in SAMPLING_NAMES}
        return {name: value for name, value in values.items() if value is not None}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def constraint(self) -> Constraint | None:
        fmt = self.response_format
        if fmt is None or isinstance(fmt, _TextFormat):
            return None
        if isinstance(fmt, _JsonObjectFormat):
            return Constraint(ConstraintKind.JSON_OBJECT)
        if isinstance(fmt, _JsonSchemaFormat):
            return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(fmt.json_schema.schema_))
        if isinstance(fmt, _RegexFormat):
            return Constraint(ConstraintKind.REGEX, fmt.regex)
        return Constraint(ConstraintKind(fmt.syntax), fmt.grammar)

    def output(self) -> OutputOptions:
        """What the answer carries beyond text, as the protocol's OutputOptions says it."""
        return OutputOptions(constraint=self.constraint(), n=self.n or 1)


class _FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(strict=True)]
    arguments: Annotated[str, Field(strict=True)] = ""


class _ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(strict=True, min_length=1)]
    type: Literal["function"] = "function"
    function: _FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[str, Field(strict=True, min_length=1)]
    content: str | None = None
    tool_calls: list[_ToolCallIn] | None = None
    tool_call_id: Annotated[str, Field(strict=True)] | None = None

    def turn(self) -> Turn:
        """The message as both services hold a turn; OpenAI's `developer` is the system."""
        role = "system" if self.role == "developer" else self.role
        calls = tuple((c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return make_turn(role, self.content or "", self.tool_call_id or "", calls)

    @field_validator("content", mode="before")
    @classmethod
    def _text_of_parts(cls, value: Any) -> Any:
        """A list of content parts becomes its text; other part types cannot be served."""
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"part {i}: only text parts ({{'type': 'text'}}) are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: text must be a string")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_CompletionParams):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    tools: Annotated[list[ToolIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def output(self) -> OutputOptions:
        choice = self.tool_choice
        if isinstance(choice, _NamedToolChoice):
            mode, function = ToolChoice.FUNCTION, choice.function.name
        else:
            mode, function = ToolChoice(choice or "auto"), ""
        tools = tuple(
            Tool(
                t.function.name,
                t.function.description or "",
                json.dumps(t.function.parameters) if t.function.parameters is not None else "",
            )
            for t in self.tools or ()
        )
        if not tools and choice is None:
            mode = ToolChoice.AUTO
        options = OutputOptions(
            constraint=self.constraint(),
            tools=tools,
            tool_choice=mode,
            tool_function=function,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            n=self.n or 1,
        )
        return PLAIN if options == PLAIN else options


class CompletionRequest(_CompletionParams):
    # A string, or a list of exactly one (the legacy API allowed several prompts per call).
    prompt: str | list[StrictText]
    # The legacy API's logprobs: how many alternatives to report at each step (0 to 5 there).
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # The text after the insertion point: the prompt is then the text before it, and the
    # model fills in the middle (with its FIM tokens), as code editors ask.
    suffix: StrictText | None = None
    # OpenAI's best-of-n (several drawn, the likeliest returned), at its neutral value only.
    best_of: Literal[1] | None = None

    def infill(self) -> Infill | None:
        return None if self.suffix is None else Infill(self.text, self.suffix)

    def output(self) -> OutputOptions:
        options = OutputOptions(
            constraint=self.constraint(),
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            n=self.n or 1,
        )
        return PLAIN if options == PLAIN else options

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_not_token_ids(cls, value: Any) -> Any:
        # OpenAI's API also takes token ids here, which only the model's own vocabulary
        # reads: refused by name rather than as "not a valid string".
        if (
            isinstance(value, list)
            and value
            and all(
                isinstance(item, list) or (isinstance(item, int) and not isinstance(item, bool))
                for item in value
            )
        ):
            raise ValueError("token ids are not accepted here; send the prompt as text")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(
                f"a list of {len(value)} prompts; send one prompt per request (as a string, or "
                "a list of one)"
            )
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse_request(body: Any, *, chat: bool) -> "ChatCompletionRequest | CompletionRequest":
    """An OpenAI chat or text completion body, validated; InvalidArgument names the field."""
    if chat:
        return validated(ChatCompletionRequest, body)
    return validated(CompletionRequest, body)


_Schema = TypeVar("_Schema", bound=BaseModel)


def json_body(raw: bytes) -> Any:
    """A request body as JSON; InvalidArgument says where it is not UTF-8 or not JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the body is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not JSON: {exc}") from None


def validated(schema: type[_Schema], body: Any, unknown: str | None = None) -> _Schema:
    """A JSON body as `schema`; InvalidArgument names the first wrong field (see describe)."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise InvalidArgument(describe(exc, unknown)) from None


def describe(exc: ValidationError, unknown: str | None = None) -> str:
    """The first problem of a validation error as `field.path[0]: what is wrong`; `unknown`
    says what an unknown field is not (OpenAI's fields, by default)."""
    error = exc.errors(include_url=False)[0]
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_BRANCHES or "[" in str(part):
            continue  # pydantic's name for a branch of a union, not a field
        else:
            path += f".{part}" if path else str(part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "required"
    elif error["type"] == "too_short":
        message = "required, with at least one item"
    elif error["type"] == "literal_error" and path in _UNSUPPORTED:
        message = _UNSUPPORTED[path]
    elif error["type"] == "extra_forbidden":
        message = unknown or (
            "not a field airouter knows (OpenAI's, or the extensions top_k, min_p, "
            "repetition_penalty, ignore_eos); check its spelling"
        )
    elif error["type"] == "too_long" and path == "logit_bias":
        message = "logit_bias is not supported; leave it out or empty"
    elif error["type"] == "too_long" and path == "tools":
        message = f"at most {MAX_TOOLS} tools are allowed in one request"
    elif error["type"] == "union_tag_invalid" and path == "response_format":
        message = (
            "type must be one of text, json_object, json_schema, or the extensions regex and "
            "grammar"
        )
    return f"{path}: {message}" if path else message


# pydantic's names for the branches of a union, which are no fields.
_UNION_BRANCHES = {"str", "int", "float", "bool"}
# Why a parameter airouter does not support is refused (never ignored).
_UNSUPPORTED = {
    "presence_penalty": "only 0 is supported; use repetition_penalty (an extension) instead",
    "frequency_penalty": "only 0 is supported; use repetition_penalty (an extension) instead",
    "tool_choice": "must be none, auto, required or {'type': 'function', 'function': {...}}",
    "echo": "echo is not supported; the prompt is not returned",
    "best_of": "only 1 is supported; use n for several completions",
}
# gRPC status name -> (HTTP status, OpenAI error type), as the OpenAI API and its SDKs expect.
HTTP_FOR_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}
# Finish reasons as OpenAI's clients read them: OpenAI's own, and for a stream that was
# cancelled (a shutdown) or failed, "cancelled" and "error": never a "stop" that did not happen.
FINISH_REASON_NAMES = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "cancelled",
    generate_pb2.FINISH_REASON_ERROR: "error",
    generate_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


# The gRPC request's field names as OpenAI's API names them, for messages that reach an HTTP
# client (a host's "sampling.temperature is 9.0" is "temperature is 9.0" there).
_OPENAI_NAMES = [
    ("sampling.", ""),
    ("stopping.max_tokens", "max_tokens"),
    ("stopping.stop", "stop"),
    ("chat.messages", "messages"),
]
_FIELD = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)(?::| is )")


def openai_message(message: str) -> tuple[str, str | None]:
    """A message in OpenAI's field names, and the field it is about (OpenAI's `param`)."""
    for ours, theirs in _OPENAI_NAMES:
        message = message.replace(ours, theirs)
    field = _FIELD.match(message)
    return message, field.group(1) if field else None


def error_json(
    status_name: str, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped error body for a status name."""
    http_status, kind = HTTP_FOR_STATUS.get(status_name, (500, "server_error"))
    return http_status, {
        "error": {"message": message, "type": kind, "param": param, "code": status_name.lower()}
    }


def logprobs_json(
    chat: bool, logprobs: "list[TokenLogprob] | tuple[TokenLogprob, ...]", offset: int = 0
) -> dict[str, Any]:
    """Log probabilities as OpenAI reports them: chat's `content` list, or the legacy
    completions' parallel lists (text offsets counted from `offset`)."""
    if chat:
        return {"content": [_token_json(lp, top=True) for lp in logprobs], "refusal": None}
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.text: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _token_json(logprob: TokenLogprob, *, top: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token": logprob.text,
        "logprob": logprob.logprob,
        "bytes": list(logprob.token),
    }
    if top:
        body["top_logprobs"] = [_token_json(t) for t in logprob.top]
    return body


def tool_call_json(
    call_index: int, id: str, name: str, arguments: str, *, streamed: bool
) -> dict[str, Any]:
    """A tool call as a message holds it, or as a stream's delta (with its index)."""
    call: dict[str, Any] = {
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return {"index": call_index, **call} if streamed else call


def chunk_json(
    *,
    chat: bool,
    id: str,
    created: int,
    model: str,
    text: str = "",
    finish_reason: str | None = None,
    role: bool = False,
    choice: int = 0,
    logprobs: dict[str, Any] | None = None,
    tool_call: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk of one choice, chat (`delta`) or text completion (`text`) shaped.
    A chat choice opens with a chunk of its role alone (`role`), as OpenAI's streams do."""
    body: dict[str, Any] = {"index": choice}
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        body["delta"] = delta
    else:
        body["text"] = text
    body["logprobs"] = logprobs
    body["finish_reason"] = finish_reason
    return {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [body],
    }


class TokenUsage(Protocol):
    """Token counts as the protocol's Usage and the gateway's own both hold them."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    cost_usd: float


def usage_json(usage: TokenUsage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_prompt_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    if usage.cost_usd:
        body["cost"] = usage.cost_usd
    return body


@dataclass(frozen=True)
class ChoiceJson:
    """What one choice of a whole completion holds."""

    index: int
    text: str
    finish_reason: str
    tool_calls: tuple[Call, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


def completion_json(
    *,
    chat: bool,
    id: str,
    created: int,
    model: str,
    choices: list[ChoiceJson],
    usage: "TokenUsage",
    logprobs: bool = False,
) -> dict[str, Any]:
    """A whole (non-streamed) completion."""
    bodies = []
    for choice in choices:
        body: dict[str, Any] = {"index": choice.index}
        if chat:
            calls = [
                tool_call_json(i, *call, streamed=False) for i, call in enumerate(choice.tool_calls)
            ]
            # OpenAI's content is null beside calls and no text.
            message: dict[str, Any] = {
                "role": "assistant",
                "content": choice.text or (None if calls else ""),
            }
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["text"] = choice.text
        body["logprobs"] = logprobs_json(chat, choice.logprobs) if logprobs else None
        body["finish_reason"] = choice.finish_reason
        bodies.append(body)
    return {
        "id": id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": bodies,
        "usage": usage_json(usage),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
