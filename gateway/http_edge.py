"""The gateway's OpenAI-compatible HTTP edge (aiohttp): /v1/chat/completions, /v1/completions
and /v1/models, streaming (SSE) or not, a thin adapter over the gateway's service core, like
the gRPC Generate: local hosts, OpenRouter models, failover. Same tokens as gRPC; errors in
OpenAI's JSON shape. Each request has a deadline (request_timeout_s), and a client that leaves
cancels its request on the host, streamed or not.
"""

import asyncio
import functools
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from airouter import tracing
from airouter.errors import AirouterError, InvalidArgument, NotFound, Unauthenticated, shown
from airouter.openai_api import (
    ChatCompletionRequest,
    ChoiceJson,
    CompletionRequest,
    chunk_json,
    completion_json,
    error_json,
    logprobs_json,
    openai_message,
    parse_request,
    sse,
    tool_call_json,
    usage_json,
)
from airouter.security import Credentials, accepts_token
from airouter.v1 import generate_pb2
from gateway.generation import (
    MAX_GENERATE_BYTES,
    ChoiceEnd,
    Event,
    Finished,
    GenerateRequest,
    Outputs,
    Routing,
    Sampling,
    Stopping,
    Token,
    finish_attributes,
    request_attributes,
    request_prefix,
    validate,
)
from gateway.metrics import GatewayMetrics
from gateway.offload import HEAVY_SIZE, heavy, off_process
from gateway.service import GatewayService

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 75.0
REQUEST_ID = web.RequestKey("request_id", str)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _Connection(RequestHandler):
    """aiohttp's connection handler, with what a request that its parser refused (headers
    over 8 KB, a bad Content-Length or chunked encoding) gets: an OpenAI-shaped JSON 400 instead
    of text/plain, and at most one log line (RefusalLog) instead of a traceback."""

    got_request = False  # set once a request's headers have all arrived (the middleware)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        self.logger.warning("http_request_refused", exc_info=exc)
        if request.writer.output_size > 0:  # a response has begun: the connection just ends
            raise ConnectionError("the response has begun; it cannot become an error")
        if status >= 500:
            status_name, text = "INTERNAL", "the gateway failed to answer this request"
        else:
            reason = str(getattr(exc, "message", "") or message or "malformed request")
            status_name, text = "INVALID_ARGUMENT", f"the HTTP request is malformed: {reason}"
        http_status, body = error_json(status_name, text[:300])
        response = web.json_response(body, status=http_status)
        response.force_close()
        return response


class RefusalLog(logging.Logger):
    """aiohttp's server logger for the HTTP edge: every refusal or failure aiohttp itself
    handles is one JSON line with no traceback, and at most one a second (anyone who reaches
    the port, before authentication, can cause them), counting the ones left out."""

    EVERY_S = 1.0

    def __init__(self) -> None:
        super().__init__("airouter.http_edge")
        self._next = 0.0
        self._left_out = 0

    def _event(self, event: str, exc_info: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + self.EVERY_S
        error = exc_info if isinstance(exc_info, BaseException) else None
        _log.warning(
            event,
            error_type=type(error).__name__ if error else "",
            error=str(error)[:200] if error else "",
            left_out=self._left_out,
        )
        self._left_out = 0

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._event(
            str(msg) if msg == "http_request_refused" else "http_edge_error", kwargs.get("exc_info")
        )

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        self._event("http_edge_error", exc_info)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._event("http_edge_error", kwargs.get("exc_info"))

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        pass  # aiohttp's debug lines (non-HTTP bytes on the port) are noise here


def _close_if_no_request(handler: _Connection) -> None:
    if not handler.got_request and handler.transport is not None:
        handler.transport.close()


def _error(status_name: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error, in OpenAI's field names, naming the field (`param`)."""
    text, param = openai_message(message)
    status, body = error_json(status_name, text, param)
    return web.json_response(body, status=status, headers=headers)


class HttpEdge:
    def __init__(
        self,
        service: GatewayService,
        credentials: Credentials,
        metrics: GatewayMetrics,
        request_timeout_s: float = 600.0,
        header_timeout_s: float = 10.0,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._credentials = credentials
        self._request_timeout_s = request_timeout_s
        self._header_timeout_s = header_timeout_s
        self._listener: asyncio.Server | None = None
        self._refusals = RefusalLog()
        self._first_seen: dict[str, int] = {}  # model name -> when /v1/models first listed it
        self.app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=MAX_GENERATE_BYTES
        )
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/v1/models/{model:.+}", self._model)
        self.app.router.add_get("/metrics", self._prometheus)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, listen: str, tls: ssl.SSLContext | None) -> int:
        host, _, port = listen.rpartition(":")
        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # host's generation (aiohttp lets handlers run on by default). An idle keep-alive
        # connection closes after KEEPALIVE_S (aiohttp's default is an hour).
        # Connections are made by _connection, with these same settings.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_S,
            logger=self._refusals,
        )
        await self._runner.setup()
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self._connection, host.strip("[]"), int(port), ssl=tls, reuse_address=True
            )
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                f"cannot listen on {listen} for the HTTP edge ({exc.strerror}); pick another "
                "address with --http-listen (http_listen in gateway.toml)"
            ) from exc
        self.port = self._listener.sockets[0].getsockname()[1]
        return self.port

    def _connection(self) -> asyncio.Protocol:
        """A new connection's protocol, closed if its first request's headers have not all
        arrived within the header timeout: aiohttp itself would wait for them forever, so a
        client sending a byte at a time (slowloris) could hold connections open at will."""
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        handler = _Connection(
            self._runner.server,
            loop=loop,
            keepalive_timeout=KEEPALIVE_S,
            access_log=None,  # type: ignore[arg-type]  # no access log, as AppRunner takes it
            logger=self._refusals,
        )
        loop.call_later(self._header_timeout_s, _close_if_no_request, handler)
        return handler

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The id that the gateway's and the hosts' logs and traces use; a client's own
        # x-request-id is kept when it is a sane one.
        if isinstance(request.protocol, _Connection):
            request.protocol.got_request = True
        given = request.headers.get("x-request-id", "")
        request[REQUEST_ID] = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        try:
            return await handler(request)
        except AirouterError as exc:
            return _error(exc.code, str(exc), {"x-request-id": request[REQUEST_ID]})
        except web.HTTPRequestEntityTooLarge:
            limit = MAX_GENERATE_BYTES >> 20
            return _error("INVALID_ARGUMENT", f"the body is larger than {limit} MiB; send less")
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            _, body = error_json(
                "INVALID_ARGUMENT", f"{request.method} is not allowed here; use {allowed}"
            )
            return web.json_response(body, status=405, headers={"Allow": allowed})
        except web.HTTPException as exc:
            return _error("NOT_FOUND" if exc.status == 404 else "INVALID_ARGUMENT", exc.reason)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._credentials.authenticates:
            header = request.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
            if token is None:
                raise Unauthenticated("send your token as `Authorization: Bearer <token>`")
            if not accepts_token(self._credentials, token):
                raise Unauthenticated("the bearer token is not valid")
        return await handler(request)

    async def _prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        listed = await self._service.list_models()
        data = [self._model_json(m) for m in listed.models]
        return web.json_response({"object": "list", "data": data})

    def _model_json(self, model: generate_pb2.ModelInfo) -> dict[str, Any]:
        """A model as OpenAI lists it: `created` is when its files were written, else when
        this gateway first saw it (openrouter/ models, hosts that do not say)."""
        seen = self._first_seen.setdefault(model.name, int(time.time()))
        created = model.created_at.seconds if model.HasField("created_at") else seen
        return {"id": model.name, "object": "model", "created": created, "owned_by": "airouter"}

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: a model by name or alias (openrouter/ names included)."""
        wanted = request.match_info["model"]
        listed = await self._service.list_models()
        for model in listed.models:
            if wanted == model.name or wanted in model.aliases:
                return web.json_response(self._model_json(model))
        raise NotFound(f"no model {shown(wanted)}; GET /v1/models lists them")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        # A large body is parsed and validated on a worker thread: the loop serves the rest.
        if len(raw) > HEAVY_SIZE:
            generate, stream, include_usage = await off_process(_parse, raw, chat)
        else:
            generate, stream, include_usage = _parse(raw, chat)
        # A conversation's affinity hint; OpenAI's `user` says the same for an end user.
        conversation = request.headers.get("x-conversation-id")
        routing = (
            generate.routing if conversation is None else Routing(conversation_id=conversation)
        )
        generate = replace(generate, request_id=request[REQUEST_ID], routing=routing)
        headers = {"x-request-id": generate.request_id}
        attributes = functools.partial(request_attributes, generate)
        name = f"{'chat' if chat else 'text_completion'} {generate.model}"
        with tracing.request_span(_tracer, name, attributes, request.headers.items()) as span:
            responses = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(responses):
                ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
                created = int(time.time())
                first = await anext(responses)  # errors before the first token raise here
                if not stream:
                    return await self._whole(
                        responses, first, chat, ident, created, generate, span, headers
                    )
                out = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        **headers,
                    }
                )
                await out.prepare(request)
                await self._stream(
                    out, responses, first, chat, ident, created, generate, span, include_usage
                )
                return out

    async def _whole(
        self,
        responses: AsyncIterator[Event],
        event: Event,
        chat: bool,
        ident: str,
        created: int,
        generate: GenerateRequest,
        span: Any,
        headers: dict[str, str],
    ) -> web.Response:
        outputs = Outputs()
        while not isinstance(event, Finished):
            outputs.add(event)
            event = await anext(responses)
        span.set_attributes(finish_attributes(event))
        choices = [
            ChoiceJson(c.index, c.text, c.reason.value, c.tool_calls, c.logprobs)
            for c in outputs.choices(event)
        ]
        body = completion_json(
            chat=chat,
            id=ident,
            created=created,
            model=event.model,
            choices=choices,
            usage=event.usage,
            logprobs=generate.output.logprobs,
        )
        return web.json_response(body, headers=headers)

    async def _stream(
        self,
        out: web.StreamResponse,
        responses: AsyncIterator[Event],
        event: Event,
        chat: bool,
        ident: str,
        created: int,
        generate: GenerateRequest,
        span: Any,
        include_usage: bool,
    ) -> None:
        model = generate.model
        chunk = functools.partial(chunk_json, chat=chat, id=ident, created=created)
        opened: set[int] = set()  # choices whose first chunk (with the role) went out
        offsets: dict[int, int] = {}  # text sent per choice: legacy logprobs' text_offset
        while True:
            if isinstance(event, Finished):
                span.set_attributes(finish_attributes(event))
                if event.error_message:
                    error = {"error": {"message": event.error_message, "type": "server_error"}}
                    await out.write(sse(error))
                ends = event.choices or (ChoiceEnd(0, event.reason),)
                for end in ends:
                    last = chunk(
                        model=event.model or model,
                        choice=end.index,
                        finish_reason=end.reason.value,
                        first=end.index not in opened,
                    )
                    await out.write(sse(last))
                if include_usage:
                    usage = {**last, "choices": [], "usage": usage_json(event.usage)}
                    await out.write(sse(usage))
                await out.write(sse("[DONE]"))
                return
            choice = event.choice
            if isinstance(event, Token):
                if not event.text and not event.logprobs:
                    event = await anext(responses)
                    continue
                logprobs = None
                if event.logprobs:
                    logprobs = logprobs_json(chat, event.logprobs, offsets.get(choice, 0))
                offsets[choice] = offsets.get(choice, 0) + len(event.text)
                body = chunk(
                    model=model,
                    choice=choice,
                    text=event.text,
                    first=choice not in opened,
                    logprobs=logprobs,
                )
            else:
                call = tool_call_json(
                    event.call_index, event.id, event.name, event.arguments, streamed=True
                )
                body = chunk(model=model, choice=choice, first=choice not in opened, tool_call=call)
            opened.add(choice)
            await out.write(sse(body))
            event = await anext(responses)


def _parse(raw: bytes, chat: bool) -> tuple[GenerateRequest, bool, bool]:
    """The body as the gateway's request, validated, with whether to stream and whether to
    send usage in the stream; InvalidArgument says what is wrong. Nothing else of the parsed
    body is kept (a chat of 20,000 messages is 40,000 objects for the cycle collector)."""
    try:
        body: Any = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the body is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not JSON: {exc}") from None
    parsed = parse_request(body, chat=chat)
    generate = generate_request(parsed)
    validate(generate)
    if heavy(generate):  # hashed here, where it costs the event loop nothing
        prefix = request_prefix(generate)
        generate = replace(generate, routing=replace(generate.routing, prefix=prefix))
    return generate, parsed.stream, parsed.include_usage


def generate_request(parsed: ChatCompletionRequest | CompletionRequest) -> GenerateRequest:
    """The gateway's request for an OpenAI body (the caller adds its id)."""
    messages = None
    if isinstance(parsed, ChatCompletionRequest):
        messages = tuple(m.turn() for m in parsed.messages)
    return GenerateRequest(
        model=parsed.model,
        prompt=None if messages is not None else parsed.text,  # type: ignore[union-attr]
        messages=messages,
        sampling=Sampling(**parsed.sampling()),
        stopping=Stopping(parsed.token_limit, tuple(parsed.stops), parsed.ignore_eos),
        routing=Routing(conversation_id=parsed.user or ""),
        output=parsed.output(),
    )
