"""The upstream client: OpenRouter or any OpenAI-compatible base URL, streamed into the
gateway's messages.

One pooled `aiohttp.ClientSession` per gateway process (keep-alive, per-host connection
limits, a DNS cache), opened at start and closed at shutdown. Completions stream over
server-sent events: `data:` lines carry JSON chunks, lines starting with `:` are keep-alive
comments (OpenRouter sends `: OPENROUTER PROCESSING`), `data: [DONE]` ends the stream, a
chunk holding `error` is a failure in mid-stream, and so is a stream that ends without
`[DONE]` or a finish reason, or an event that is not JSON: the stream then ends with an `error`
finish naming the cause, never a silent `stop`. Before the first token, connection errors
and 408/429/502/503 are retried with jittered exponential backoff (honouring `Retry-After`)
within the request's deadline; 400/401/402/403 come back at once with the upstream's message.
The API key is sent only in the Authorization header: never logged, never traced.
"""

import asyncio
import json
import random
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import trace

from airouter import tracing
from airouter.errors import (
    AirouterError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from airouter.output import (
    PLAIN,
    ConstraintKind,
    OutputOptions,
    TokenLogprob,
    ToolChoice,
    openai_tool,
    turn_json,
)
from gateway.config import OPENROUTER_PREFIX
from gateway.generation import (
    SAMPLING_FIELDS,
    ChoiceEnd,
    Event,
    Finished,
    FinishReason,
    GenerateRequest,
    Token,
    ToolCallDelta,
    finish_attributes,
)
from gateway.offload import heavy, off_loop

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
# The most data one server-sent event may carry (a chunk is a few hundred bytes).
MAX_EVENT_CHARS = 1 << 20
# Transient: a timeout, rate limiting, or a server-side failure (5xx).
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
# Statuses that are the request's (or the account's) own: no retry.
_ERROR_FOR_STATUS: dict[int, type[AirouterError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    402: ResourceExhausted,  # out of credits
    403: PermissionDenied,  # e.g. moderation
    404: NotFound,
}


class UpstreamStreamError(Exception):
    """The upstream failed after the first token; the stream must end with an error."""


@dataclass(frozen=True)
class UpstreamSettings:
    api_key: str | None = field(repr=False)  # a secret: never in a repr or a log
    base_url: str = DEFAULT_BASE_URL
    max_attempts: int = 4
    backoff_s: tuple[float, float] = (0.5, 8.0)  # first retry delay, cap
    connections_per_host: int = 32
    connect_timeout_s: float = 10.0
    ca_file: Path | None = None  # trust this CA (a private upstream); else the system's


@dataclass
class Chunk:
    """One streamed piece of a completion, in the gateway's terms: text of the first choice
    (`text`), every choice's text and call pieces (`events`) and how choices ended."""

    text: str = ""
    finish_reason: str | None = None
    events: list[Token | ToolCallDelta] = field(default_factory=list)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    model: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class OpenAIUpstream:
    """Streams completions from an OpenAI-compatible API over one pooled session."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.retries = 0  # calls retried before their first token, for /metrics

    async def start(self) -> None:
        tls: ssl.SSLContext | bool = True
        if self.settings.ca_file is not None:
            tls = ssl.create_default_context(cafile=str(self.settings.ca_file))
        connector = aiohttp.TCPConnector(
            ssl=tls,
            limit=0,  # no global cap; the per-host one bounds a single upstream
            limit_per_host=self.settings.connections_per_host,
            ttl_dns_cache=300,
            keepalive_timeout=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def stream(
        self, path: str, body: dict[str, Any], deadline: float | None
    ) -> AsyncIterator[Chunk]:
        """POSTs body (streaming) to base_url + path and yields its chunks. Raises a domain
        error before the first chunk, UpstreamStreamError after it."""
        if self._session is None:
            raise Unavailable("the upstream client is not started")
        if not self.settings.api_key:
            raise Unauthenticated(
                "no API key for the upstream: set OPENROUTER_API_KEY or openrouter_api_key_file"
            )
        url = self.settings.base_url.rstrip("/") + path
        # usage.include: OpenRouter's usage accounting, whose `cost` keys' budgets count.
        payload = {
            **body,
            "stream": True,
            "stream_options": {"include_usage": True},
            "usage": {"include": True},
        }
        headers = {"Authorization": f"Bearer {self.settings.api_key}"}
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                timeout = aiohttp.ClientTimeout(total=_left(deadline))
                async with self._session.post(
                    url, json=payload, headers=headers, timeout=timeout
                ) as response:
                    if response.status != 200:
                        message = await _error_message(response)
                        if response.status not in RETRY_STATUSES:
                            cls = _ERROR_FOR_STATUS.get(response.status, Unavailable)
                            raise cls(f"upstream answered {response.status}: {message}")
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                        why = f"{response.status}: {message}"
                    else:
                        async for chunk in _chunks(response):
                            yield chunk
                        return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the deadline passed waiting for the upstream ({url})"
                ) from None
            except aiohttp.ClientConnectionError as exc:
                why = f"connection failed: {exc}"
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            left = _left(deadline)
            if attempt >= self.settings.max_attempts or (left is not None and delay >= left):
                raise Unavailable(f"upstream {url} failed after {attempt} attempts; last: {why}")
            _log.warning("upstream_retry", attempt=attempt, reason=why, delay_s=round(delay, 2))
            trace.get_current_span().add_event(
                "retry", {"attempt": attempt, "reason": why, "delay_s": delay}
            )
            self.retries += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        first, cap = self.settings.backoff_s
        return min(first * 2 ** (attempt - 1), cap) * random.uniform(0.5, 1.5)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds form; an HTTP date counts as unknown)."""
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        error = json.loads(text).get("error", {})
        return str(error.get("message") or text)
    except (ValueError, AttributeError):
        return text.strip()[:500] or response.reason or "no message"


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[Chunk]:
    """The SSE events of a 200 response as Chunks, up to `[DONE]`. A dropped connection, an
    error event, an event that is not a JSON object, or an end without `[DONE]` raises
    UpstreamStreamError once something was yielded (a domain error before)."""
    yielded = False

    def failed(why: str) -> Exception:
        if yielded:
            return UpstreamStreamError(f"{why} mid-stream")
        return Unavailable(f"upstream {why}")

    try:
        async for data in sse_data(response.content):
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                raise failed(f"sent an event that is not a JSON object ({data[:80]!r})")
            if "error" in event:
                error = event["error"]
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                raise failed(f"error: {str(message)[:500]};")
            try:
                chunk = _chunk(event)
            except ValueError as exc:
                raise failed(f"sent an event not of OpenAI's shape ({exc})") from None
            yield chunk
            yielded = True
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        if yielded:
            raise UpstreamStreamError(f"the upstream connection broke mid-stream: {exc}") from exc
        raise
    except (ValueError, HttpProcessingError):  # a line past the reader's limit, or an event
        raise failed("sent more in one line or event than the gateway reads") from None
    raise failed("ended the stream without [DONE]")


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each server-sent event; comments (keep-alives) and other fields are
    skipped, multi-line data is joined with newlines."""
    lines: list[str] = []
    size = 0
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines, size = [], 0
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
            size += len(line)
            if size > MAX_EVENT_CHARS:
                raise ValueError("an event too large")
    if lines:
        yield "\n".join(lines)


def _chunk(event: dict[str, Any]) -> Chunk:
    """A chunk of an event; ValueError says what in the event is not of OpenAI's shape."""
    model = event.get("model", "")
    chunk = Chunk(model=model if isinstance(model, str) else "", raw=event)
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise ValueError("choices is not a list")
    for position, choice in enumerate(choices):
        _choice_pieces(chunk, position, choice)
    usage = event.get("usage")
    if usage:
        if not isinstance(usage, dict):
            raise ValueError("usage is not an object")
        chunk.prompt_tokens = _count(usage, "prompt_tokens")
        chunk.completion_tokens = _count(usage, "completion_tokens")
        cost = usage.get("cost")
        if cost is not None and (not isinstance(cost, int | float) or isinstance(cost, bool)):
            raise ValueError("usage.cost is not a number")
        chunk.cost = None if cost is None else float(cost)
    return chunk


def _choice_pieces(chunk: Chunk, position: int, choice: Any) -> None:
    """One choice of a chunk: its text, log probabilities, call pieces and finish reason."""
    where = f"choices[{position}]"
    if not isinstance(choice, dict):
        raise ValueError(f"{where} is not an object")
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 16:
        raise ValueError(f"{where}.index is not a choice's index")
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise ValueError(f"{where}.delta is not an object")
    text = delta.get("content") or choice.get("text") or ""
    if not isinstance(text, str):
        raise ValueError("the content is not a string")
    logprobs = _logprobs(choice.get("logprobs"), where)
    if text or logprobs:
        chunk.events.append(Token(text, 1, index, logprobs))
        if index == 0:
            chunk.text += text
    calls = delta.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ValueError(f"{where}.delta.tool_calls is not a list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ValueError(f"{where}.delta.tool_calls has a call without a function")
        fields = (call.get("index", 0), call.get("id") or "", function.get("name") or "")
        arguments = function.get("arguments") or ""
        if not isinstance(fields[0], int) or not all(
            isinstance(f, str) for f in (*fields[1:], arguments)
        ):
            raise ValueError(f"{where}.delta.tool_calls has a call of the wrong shape")
        chunk.events.append(ToolCallDelta(fields[0], fields[1], fields[2], arguments, index))
    reason = choice.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("finish_reason is not a string")
    if reason is not None:
        chunk.finish_reasons[index] = reason
        if index == 0:
            chunk.finish_reason = reason


def _logprobs(value: Any, where: str) -> tuple[TokenLogprob, ...]:
    """A chat choice's logprobs.content, as the gateway's; () when absent."""
    if not value:
        return ()
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list):
        return ()  # legacy completions' shape: not relayed
    try:
        return tuple(
            TokenLogprob(
                bytes(entry.get("bytes") or entry["token"].encode()),
                float(entry["logprob"]),
                tuple(
                    TokenLogprob(bytes(t.get("bytes") or t["token"].encode()), float(t["logprob"]))
                    for t in entry.get("top_logprobs") or ()
                ),
            )
            for entry in content
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{where}.logprobs is not of OpenAI's shape") from None


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
        raise ValueError(f"usage.{name} is not a token count")
    return value


# What Finished.host says of a request the upstream served.
UPSTREAM_HOST = "openrouter"
_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "error": FinishReason.ERROR,
    "tool_calls": FinishReason.TOOL_CALLS,
}


async def relay_upstream(
    upstream: OpenAIUpstream, request: GenerateRequest, deadline: float | None
) -> AsyncGenerator[Event, None]:
    """Streams an `openrouter/<vendor>/<model>` request from the OpenAI-compatible upstream,
    in the gateway's messages. Errors before the first token are raised (mapped from the
    upstream's status); after it the stream ends with FINISH_REASON_ERROR."""
    path, body = await off_loop(openai_body, request) if heavy(request) else openai_body(request)
    where = f"upstream {upstream.settings.base_url}"
    with tracing.span(
        _tracer,
        f"openrouter {body['model']}",
        kind=trace.SpanKind.CLIENT,
        attributes={"server.address": upstream.settings.base_url, "url.path": path},
    ) as span:
        stream = _upstream_stream(upstream, request, deadline, path, body, where)
        async with aclosing(stream):  # a client leaving closes the upstream response at once
            async for event in stream:
                if isinstance(event, Finished):
                    span.set_attributes(finish_attributes(event))
                    if event.error_message:
                        span.set_status(trace.StatusCode.ERROR, event.error_message)
                yield event


async def _upstream_stream(
    upstream: OpenAIUpstream,
    request: GenerateRequest,
    deadline: float | None,
    path: str,
    body: dict[str, Any],
    where: str,
) -> AsyncGenerator[Event, None]:
    started = time.monotonic()
    first_token_ms = 0.0
    finish = Finished(FinishReason.STOP, host=UPSTREAM_HOST)
    reasons: dict[int, FinishReason] = {}
    sent = False
    try:
        async for chunk in upstream.stream(path, body, deadline):
            if chunk.model:
                finish.model = chunk.model
            for event in chunk.events:
                if not sent:
                    first_token_ms = (time.monotonic() - started) * 1e3
                sent = True
                yield event
            for index, name in chunk.finish_reasons.items():
                reasons[index] = _FINISH_REASONS.get(name, FinishReason.STOP)
            if chunk.prompt_tokens is not None:
                finish.usage.prompt_tokens = chunk.prompt_tokens
                finish.usage.completion_tokens = chunk.completion_tokens or 0
                finish.usage.cost_usd = chunk.cost or 0.0
        if 0 not in reasons:
            raise UpstreamStreamError("the stream ended without a finish reason")
        finish.reason = reasons[0]
        if request.output.n > 1:
            finish.choices = tuple(ChoiceEnd(i, r) for i, r in sorted(reasons.items()))
    except (UpstreamStreamError, AirouterError) as exc:
        if not sent:
            if isinstance(exc, AirouterError):
                raise
            raise Unavailable(f"{where}: {exc}") from None
        finish.reason = FinishReason.ERROR
        finish.error_message = f"{where} failed mid-stream: {exc}"
    except Exception as exc:  # never a traceback to the client: a bug here ends the stream
        _log.error("upstream_relay_failed", error_type=type(exc).__name__)
        if not sent:
            raise Unavailable(f"{where}: its answer could not be read") from None
        finish.reason = FinishReason.ERROR
        finish.error_message = f"{where}: its stream could not be read past this point"
    total_ms = (time.monotonic() - started) * 1e3
    finish.timings.time_to_first_token_ms = first_token_ms
    finish.timings.total_ms = total_ms
    yield finish


def openai_body(request: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """The OpenAI API path and JSON body for a gateway request: chat messages go to
    /chat/completions, a raw prompt to /completions."""
    body: dict[str, Any] = {"model": request.model.removeprefix(OPENROUTER_PREFIX)}
    if request.infill is not None:
        raise FailedPrecondition(
            "fill-in-the-middle (suffix, /infill) runs on local hosts only (it needs the "
            "model's FIM tokens); ask for routing_policy local_only"
        )
    if request.messages is not None:
        path = "/chat/completions"
        body["messages"] = [turn_json(turn) for turn in request.messages]
    else:
        path = "/completions"
        body["prompt"] = request.prompt
    if request.output is not PLAIN:
        _output_json(body, request.output, chat=request.messages is not None)
    for name in SAMPLING_FIELDS:
        value = getattr(request.sampling, name)
        if value is not None:
            body[name] = value
    if request.stopping.max_tokens is not None:
        body["max_tokens"] = request.stopping.max_tokens
    if request.stopping.stop:
        body["stop"] = list(request.stopping.stop)
    return path, body


def _output_json(body: dict[str, Any], output: OutputOptions, *, chat: bool) -> None:
    """What the answer carries beyond text, in OpenAI's fields. Regular expressions and
    grammars have no OpenAI field: such a request runs on local hosts only."""
    constraint = output.constraint
    if constraint is not None:
        if constraint.kind is ConstraintKind.JSON_OBJECT:
            body["response_format"] = {"type": "json_object"}
        elif constraint.kind is ConstraintKind.JSON_SCHEMA:
            schema = json.loads(constraint.text)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema},
            }
        else:
            raise FailedPrecondition(
                f"a {constraint.kind.value} constraint runs on local hosts only (OpenAI's API has "
                "no such field); ask for routing_policy local_only"
            )
    if output.tools:
        body["tools"] = [openai_tool(tool) for tool in output.tools]
        if output.tool_choice is ToolChoice.FUNCTION:
            body["tool_choice"] = {"type": "function", "function": {"name": output.tool_function}}
        else:
            body["tool_choice"] = output.tool_choice.value
        if not output.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    if output.logprobs:
        if chat:
            body["logprobs"] = True
            if output.top_logprobs:
                body["top_logprobs"] = output.top_logprobs
        else:
            body["logprobs"] = output.top_logprobs
    if output.n != 1:
        body["n"] = output.n
