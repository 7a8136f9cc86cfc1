"""The OpenAI HTTP protocol, upstream: OpenRouter or any OpenAI-compatible base URL.

One pooled `aiohttp.ClientSession` per gateway process (keep-alive, per-host connection
limits, a DNS cache), opened at start and closed at shutdown. Completions stream over
server-sent events: `data:` lines carry JSON chunks, lines starting with `:` are keep-alive
comments (OpenRouter sends `: OPENROUTER PROCESSING`), `data: [DONE]` ends the stream, and a
chunk holding `error` is a failure in mid-stream. Before the first token, connection errors
and 408/429/502/503 are retried with jittered exponential backoff (honouring `Retry-After`)
within the request's deadline; 400/401/402/403 come back at once with the upstream's message.
The API key is sent only in the Authorization header: never logged, never traced.
"""

import asyncio
import json
import random
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from opentelemetry import trace

from airouter.errors import (
    AirouterError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from airouter.v1 import gateway_pb2, generate_pb2

_log = structlog.get_logger()

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
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
    api_key: str | None
    base_url: str = DEFAULT_BASE_URL
    max_attempts: int = 4
    backoff_s: tuple[float, float] = (0.5, 8.0)  # first retry delay, cap
    connections_per_host: int = 32
    connect_timeout_s: float = 10.0
    ca_file: Path | None = None  # trust this CA (a private upstream); else the system's


@dataclass
class Chunk:
    """One streamed piece of a completion, in the gateway's terms."""

    text: str = ""
    finish_reason: str | None = None
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
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
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
    """The SSE events of a 200 response as Chunks; a dropped connection or an error event
    raises UpstreamStreamError once something was yielded (domain errors before)."""
    yielded = False
    try:
        async for data in sse_data(response.content):
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                message = error.get("message", "") if isinstance(error, dict) else str(error)
                if yielded:
                    raise UpstreamStreamError(f"upstream error mid-stream: {message}")
                raise Unavailable(f"upstream error: {message}")
            yield _chunk(event)
            yielded = True
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        if yielded:
            raise UpstreamStreamError(f"the upstream connection broke mid-stream: {exc}") from exc
        raise


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each server-sent event; comments (keep-alives) and other fields are
    skipped, multi-line data is joined with newlines."""
    lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _chunk(event: dict[str, Any]) -> Chunk:
    chunk = Chunk(model=str(event.get("model", "")), raw=event)
    choices = event.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        chunk.text = delta.get("content") or choice.get("text") or ""
        chunk.finish_reason = choice.get("finish_reason")
    usage = event.get("usage")
    if usage:
        chunk.prompt_tokens = usage.get("prompt_tokens")
        chunk.completion_tokens = usage.get("completion_tokens")
        chunk.cost = usage.get("cost")
    return chunk


# --- downstream: the gateway's OpenAI-compatible HTTP edge ------------------------------

# gRPC status -> (HTTP status, OpenAI error type), as the OpenAI API and its SDKs expect.
HTTP_FOR_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}
# OpenAI's finish reasons; it has none for a cancelled stream, which ends as "stop".
FINISH_REASON_NAMES = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "stop",
    generate_pb2.FINISH_REASON_ERROR: "error",
}
_SAMPLING_FIELDS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "seed": int,
}


def error_json(status_name: str, message: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped error body for a gRPC status name."""
    http_status, kind = HTTP_FOR_STATUS.get(status_name, (500, "server_error"))
    return http_status, {
        "error": {"message": message, "type": kind, "param": None, "code": status_name.lower()}
    }


def parse_request(
    body: Any, *, chat: bool
) -> tuple[gateway_pb2.GatewayGenerateRequest, bool, bool]:
    """A gateway request from an OpenAI chat or text completion body; returns it with whether
    to stream and whether to send usage in the stream. InvalidArgument names the field."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model: required, a model name, alias or capability:<tag>")
    request = gateway_pb2.GatewayGenerateRequest(model=model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages: required, a non-empty list of {role, content}")
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str) or not isinstance(message.get("role"), str):
                raise InvalidArgument(f"messages[{i}]: needs a string role and text content")
            request.chat.messages.add(role=message["role"], content=content)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt: required, a string")
        request.prompt = prompt
    for name, kind in _SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidArgument(f"{name}: must be a number")
            setattr(request.sampling, name, kind(value))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidArgument("max_tokens: must be a positive integer")
        request.stopping.max_tokens = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidArgument("stop: must be a string or a list of strings")
        request.stopping.stop.extend(stops)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return request, stream, include_usage


def chunk_json(
    *, chat: bool, id: str, created: int, model: str, text: str, finish_reason: str | None
) -> dict[str, Any]:
    """One streamed chunk, chat (`delta`) or text completion (`text`) shaped."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if text else {}
    else:
        choice["text"] = text
    return {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_json(finished: Any) -> dict[str, Any]:
    usage = finished.usage
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
    *, chat: bool, id: str, created: int, text: str, finished: Any
) -> dict[str, Any]:
    """A whole (non-streamed) completion."""
    reason = FINISH_REASON_NAMES.get(finished.reason, "stop")
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": finished.model,
        "choices": [choice],
        "usage": usage_json(finished),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


# The OpenAI batch file format: one JSON request per input line, one result per output line.
BATCH_URLS = {"/v1/chat/completions": True, "/v1/completions": False}


def batch_item(line: str, number: int) -> gateway_pb2.BatchItem:
    """One line of an OpenAI batch input file ({custom_id, method, url, body}) as a batch
    item; InvalidArgument names the line and the field."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise InvalidArgument(f"line {number}: must be a JSON object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidArgument(f"line {number}: custom_id: required, a non-empty string")
    if entry.get("method", "POST") != "POST":
        raise InvalidArgument(f"line {number}: method: only POST is supported")
    url = entry.get("url")
    if url not in BATCH_URLS:
        raise InvalidArgument(f"line {number}: url {url!r}: use {' or '.join(BATCH_URLS)}")
    try:
        request, _, _ = parse_request(entry.get("body"), chat=BATCH_URLS[url])
    except InvalidArgument as exc:
        raise InvalidArgument(f"line {number}: body: {exc}") from None
    return gateway_pb2.BatchItem(custom_id=custom_id, request=request)


def batch_output(
    result: gateway_pb2.BatchItemResult, batch_id: str, created: int
) -> dict[str, Any]:
    """One line of an OpenAI batch output file for an item's result."""
    line: dict[str, Any] = {
        "id": f"batch_req_{batch_id}_{result.index}",
        "custom_id": result.custom_id,
        "response": None,
        "error": None,
    }
    request_id = f"{batch_id}-{result.index}-{result.attempts}"
    if result.state == gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED:
        body = completion_json(
            chat=result.chat,
            id=request_id,
            created=created,
            text=result.text,
            finished=result.finished,
        )
        line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    elif result.state == gateway_pb2.BATCH_ITEM_STATE_CANCELLED:
        line["error"] = {"code": "batch_cancelled", "message": result.error_message}
    else:
        status, body = error_json(result.error_code, result.error_message)
        line["response"] = {"status_code": status, "request_id": request_id, "body": body}
    return line
