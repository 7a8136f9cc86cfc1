"""The OpenAI HTTP API as airouter speaks it: request schemas (pydantic, so a wrong type is a
400 naming the field) and the JSON shapes of completions, chunks, usage and errors. Used by the
gateway's HTTP edge and by batch files; it knows nothing of transports.
"""

import json
import re
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from airouter.errors import InvalidArgument
from airouter.v1 import generate_pb2

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
    """response_format: plain text only (no JSON mode or schemas yet)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


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
    # What airouter cannot do is refused, never silently ignored: one choice per request, and
    # no log probabilities yet.
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    echo: Literal[False] | None = None
    # OpenAI's, at their neutral values only (what clients such as LangChain send by default).
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    response_format: _TextFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None
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


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[str, Field(strict=True, min_length=1)]
    content: str

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


class CompletionRequest(_CompletionParams):
    # A string, or a list of exactly one (the legacy API allowed several prompts per call).
    prompt: str | list[StrictText]

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
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    schema = ChatCompletionRequest if chat else CompletionRequest
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise InvalidArgument(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """The first problem of a validation error as `field.path[0]: what is wrong`."""
    error = exc.errors(include_url=False)[0]
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]", "function-before[_text_of_parts(), str]") or str(
            part
        ).startswith("literal["):
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
        message = (
            "not a field airouter knows (OpenAI's, or the extensions top_k, min_p, "
            "repetition_penalty, ignore_eos); check its spelling"
        )
    elif error["type"] == "too_long" and path in ("tools", "logit_bias"):
        message = f"{path} are not supported yet; leave {path} out or empty"
    return f"{path}: {message}" if path else message


# Why a parameter airouter does not support is refused (never ignored).
_UNSUPPORTED = {
    "n": "only n = 1 is supported; send one request per choice",
    "presence_penalty": "only 0 is supported; use repetition_penalty (an extension) instead",
    "frequency_penalty": "only 0 is supported; use repetition_penalty (an extension) instead",
    "response_format.type": "only {'type': 'text'} is supported (no JSON mode yet)",
    "tool_choice": "tools are not supported yet; leave tool_choice out or 'none'",
    "logprobs": "log probabilities are not supported yet; leave logprobs out",
    "top_logprobs": "log probabilities are not supported yet; leave top_logprobs out",
    "echo": "echo is not supported; the prompt is not returned",
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


def chunk_json(
    *,
    chat: bool,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk, chat (`delta`) or text completion (`text`) shaped; a chat's first
    delta carries the role, as OpenAI's do."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text
    return {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
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


def completion_json(
    *,
    chat: bool,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: TokenUsage,
) -> dict[str, Any]:
    """A whole (non-streamed) completion."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(usage),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
