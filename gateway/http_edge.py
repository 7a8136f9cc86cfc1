"""The gateway's HTTP edge (aiohttp): OpenAI's /v1/chat/completions, /v1/completions (with
`suffix`: fill-in-the-middle), /v1/models and /v1/responses, Anthropic's /v1/messages
(gateway.anthropic), llama-server's /infill (gateway.infill_api), streaming (SSE) or not; each
a thin adapter over the gateway's service core, like the gRPC Generate: local hosts,
OpenRouter models, failover. Same tokens as gRPC; errors in the shape of each door's API.
Each request has a deadline (request_timeout_s), and a client that leaves cancels its request
on the host, streamed or not.
"""

import asyncio
import functools
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from airouter import tracing
from airouter.errors import (
    AirouterError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    shown,
)
from airouter.openai_api import (
    ChatCompletionRequest,
    ChoiceJson,
    CompletionRequest,
    chunk_json,
    completion_json,
    error_json,
    json_body,
    logprobs_json,
    openai_message,
    parse_request,
    sse,
    tool_call_json,
    usage_json,
)
from airouter.output import Turn
from airouter.security import Credentials, accepts_token, is_admin_token
from airouter.v1 import generate_pb2
from gateway import anthropic, embeddings_api, infill_api, responses
from gateway.database import Database
from gateway.embeddings import EmbedRequest
from gateway.generation import (
    MAX_GENERATE_BYTES,
    ChoiceEnd,
    ChoiceOutput,
    Event,
    Finished,
    FinishReason,
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
from gateway.keys import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.offload import HEAVY_SIZE, heavy, off_loop, off_process
from gateway.openai_batches import BatchDoor
from gateway.response_store import ResponseStore, StoredResponse
from gateway.service import GatewayService
from gateway.status import StatusBoard

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 75.0
REQUEST_ID = web.RequestKey("request_id", str)
CORS_ORIGIN = web.RequestKey("cors_origin", str)
# Answered without a token: load balancers' and container runtimes' probes carry none.
_OPEN_PATHS = frozenset({"/health", "/ready", "/"})
# Every key's usage shows there: a token's, not a key's.
_ADMIN_PATHS = frozenset({"/metrics", "/status.json"})
# The cluster's whole state: only the admin token, where there is one.
_ADMIN_TOKEN_PATHS = frozenset({"/status.json"})
# The status page itself holds no data (it asks /status.json, with the admin token).
_PAGE = (Path(__file__).parent / "static" / "index.html").read_bytes()
API_KEY = web.RequestKey("api_key", str)  # the name of the key a request came with
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_T = TypeVar("_T")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


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


def _error(
    request: web.Request, status_name: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the shape of the API the request was for: Anthropic's on its paths, else
    OpenAI's, in OpenAI's field names, naming the field (`param`)."""
    if _is_anthropic(request):
        status, body = anthropic.error_json(status_name, message)
    else:
        text, param = openai_message(message)
        status, body = error_json(status_name, text, param)
    return web.json_response(body, status=status, headers=headers)


async def _add_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Every answer names its request (x-request-id), and the origin CORS allowed."""
    if REQUEST_ID in request:
        response.headers.setdefault("x-request-id", request[REQUEST_ID])
    origin = request.get(CORS_ORIGIN)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "x-request-id, request-id, retry-after"
        response.headers["Vary"] = "Origin"


def _is_anthropic(request: web.Request) -> bool:
    return request.path.startswith("/v1/messages")


def _id_headers(request: web.Request) -> dict[str, str]:
    """The request's id, as OpenAI's clients (x-request-id) and Anthropic's (request-id) read
    it."""
    headers = {"x-request-id": request[REQUEST_ID]}
    if _is_anthropic(request):
        headers["request-id"] = request[REQUEST_ID]
    return headers


class HttpEdge:
    def __init__(
        self,
        service: GatewayService,
        credentials: Credentials,
        metrics: GatewayMetrics,
        request_timeout_s: float = 600.0,
        header_timeout_s: float = 10.0,
        cors_origins: list[str] | None = None,
        stored_responses: ResponseStore | None = None,
        batch_door: BatchDoor | None = None,
        keys: KeyRing | None = None,
        status: StatusBoard | None = None,
        store: Database | None = None,
    ) -> None:
        self._database = store
        self._service = service
        self._metrics = metrics
        self._credentials = credentials
        self._request_timeout_s = request_timeout_s
        self._header_timeout_s = header_timeout_s
        self._listener: asyncio.Server | None = None
        self._refusals = RefusalLog()
        self._first_seen: dict[str, int] = {}  # model name -> when /v1/models first listed it
        self._cors_origins = set(cors_origins or ())
        self._keys = keys
        self._status = status
        self._sampler: asyncio.Task[None] | None = None
        self._stored = stored_responses
        self.app = web.Application(
            middlewares=[self._errors, self._cors, self._auth], client_max_size=MAX_GENERATE_BYTES
        )
        self.app.on_response_prepare.append(_add_request_id)
        self.app.router.add_get("/", self._page)
        self.app.router.add_get("/status.json", self._status_json)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/ready", self._ready)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/v1/models/{model:.+}", self._model)
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/v1/messages", self._messages)
        self.app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self.app.router.add_post("/infill", self._infill)
        self.app.router.add_post("/v1/responses", self._responses)
        self.app.router.add_get("/v1/responses/{id}", self._stored_response)
        self.app.router.add_get("/v1/responses/{id}/input_items", self._input_items)
        self.app.router.add_delete("/v1/responses/{id}", self._delete_response)
        self.app.router.add_get("/metrics", self._prometheus)
        self._batch_door = batch_door  # owned: its file store closes with the edge
        if batch_door is not None:
            batch_door.key_of = lambda request: request.get(API_KEY, "")
            batch_door.add_routes(self.app)
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
        if self._status is not None:
            self._sampler = asyncio.create_task(self._status.run())
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
        if self._sampler is not None:
            self._sampler.cancel()
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
            headers = _id_headers(request)
            if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
                headers["Retry-After"] = str(max(math.ceil(exc.retry_after_s), 1))
            return _error(request, exc.code, str(exc), headers)
        except web.HTTPRequestEntityTooLarge:
            limit = MAX_GENERATE_BYTES >> 20
            message = f"the body is larger than {limit} MiB; send less"
            return _error(request, "INVALID_ARGUMENT", message)
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            _, body = error_json(
                "INVALID_ARGUMENT", f"{request.method} is not allowed here; use {allowed}"
            )
            return web.json_response(body, status=405, headers={"Allow": allowed})
        except web.HTTPNotFound:
            message = (
                f"no such path: {request.method} {shown(request.path)}; the API is under /v1 "
                "(chat/completions, completions, embeddings, models, responses, messages), with "
                "/infill, "
                "/health, /ready and /metrics"
            )
            return _error(request, "NOT_FOUND", message)
        except web.HTTPException as exc:
            return _error(request, "INVALID_ARGUMENT", exc.reason)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Browser pages of the configured origins may call the edge: a preflight (OPTIONS,
        which carries no token) is answered here, and answers name the origin they allow."""
        origin = request.headers.get("Origin")
        allowed = origin is not None and (origin in self._cors_origins or "*" in self._cors_origins)
        if request.method == "OPTIONS":
            headers = {"Allow": "GET, POST, DELETE, OPTIONS"}
            if allowed:
                asked = request.headers.get("Access-Control-Request-Headers", "")
                headers |= {
                    "Access-Control-Allow-Origin": origin or "",
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": asked or "authorization, content-type",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                }
            return web.Response(status=204, headers=headers)
        if allowed:
            request[CORS_ORIGIN] = origin or ""
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A token or an API key (as a bearer token, or Anthropic's x-api-key) where the
        gateway has tokens; a key presented anywhere is checked and counts its usage."""
        if request.path in _OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        if token is None:  # Anthropic's clients send x-api-key
            token = request.headers.get("x-api-key")
        key = self._keys.identify(token) if token and self._keys is not None else None
        if key is not None:
            self._keys.check_valid(key)  # type: ignore[union-attr]  # raises for revoked keys
            if request.path in _ADMIN_PATHS:
                raise PermissionDenied(f"{request.path} needs the admin token, not an API key")
            request[API_KEY] = key.name
        elif request.path in _ADMIN_TOKEN_PATHS and self._credentials.admin_token:
            if not is_admin_token(self._credentials, token):
                raise Unauthenticated(f"{request.path} needs the admin token")
        elif self._credentials.authenticates:
            if token is None:
                raise Unauthenticated(
                    "send your key or token as `Authorization: Bearer <key>` (or "
                    "`x-api-key: <key>`)"
                )
            if not accepts_token(self._credentials, token):
                raise Unauthenticated("the key or token is not valid")
        return await handler(request)

    async def _page(self, request: web.Request) -> web.Response:
        """The status page for people (gateway/static/index.html): it draws /status.json."""
        return web.Response(body=_PAGE, content_type="text/html", charset="utf-8")

    async def _status_json(self, request: web.Request) -> web.Response:
        """The cluster's state (gateway.status), as the page and scripts read it."""
        if self._status is None:
            raise NotFound("this gateway keeps no status board")
        return web.json_response(await self._status.snapshot())

    async def _health(self, request: web.Request) -> web.Response:
        """Live: the gateway answers (for load balancers' and containers' health checks)."""
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        """Ready: some host is serving and the gateway is not shutting down; else 503."""
        serving = len(self._service.pool.routable())
        ready = serving > 0 and not self._service.draining
        body: dict[str, Any] = {
            "status": "ready" if ready else "not ready",
            "hosts_serving": serving,
        }
        if self._database is not None:
            # Shown, not a reason to take the gateway out of rotation: requests still run
            # while the store is away; batches, files and stored responses wait for it.
            body["store"] = self._database.state()
        if self._service.draining:
            body["reason"] = "the gateway is shutting down"
        elif not serving:
            body["reason"] = "no model host is serving; `airouter hosts` says why"
        return web.json_response(body, status=200 if ready else 503)

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
        generate, stream, include_usage = await _read(request, _parse, chat)
        generate = _routed(request, generate)
        headers = _id_headers(request)
        with _span(request, "chat" if chat else "text_completion", generate) as span:
            responses = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(responses):
                ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
                created = int(time.time())
                first = await anext(responses)  # errors before the first token raise here
                if not stream:
                    return await self._whole(
                        responses, first, chat, ident, created, generate, span, headers
                    )
                out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
                await out.prepare(request)
                await self._stream(
                    out, responses, first, chat, ident, created, generate, span, include_usage
                )
                return out

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API (gateway.anthropic), on the same request path."""
        generate, stream = await _read(request, _parse_messages)
        generate = _routed(request, generate)
        headers = _id_headers(request)
        with _span(request, "messages", generate) as span:
            responses = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(responses):
                ident, model = anthropic.message_id(), generate.model
                event = await anext(responses)  # errors before the first token raise here
                if not stream:
                    outputs = Outputs()
                    while not isinstance(event, Finished):
                        outputs.add(event)
                        event = await anext(responses)
                    span.set_attributes(finish_attributes(event))
                    if event.reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                        # The host failed mid-answer: a server error, which clients retry.
                        why = event.error_message or "the request was cancelled"
                        body = {"type": "error", "error": {"type": "api_error", "message": why}}
                        return web.json_response(body, status=502, headers=headers)
                    (output,) = outputs.choices(event)
                    body = anthropic.message_json(ident, model, output, event)
                    return web.json_response(body, headers=headers)
                out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
                await out.prepare(request)
                events = anthropic.MessageEvents(ident, model)
                for item in events.start():
                    await out.write(anthropic.sse(item))
                while True:
                    for item in events.on(event):
                        await out.write(anthropic.sse(item))
                    if isinstance(event, Finished):
                        span.set_attributes(finish_attributes(event))
                        return out
                    event = await anext(responses)

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings (gateway.embeddings_api), made on a host by load."""
        embed, as_base64 = await _read(request, _parse_embeddings)
        embed = replace(embed, request_id=request[REQUEST_ID], key=request.get(API_KEY, ""))
        carrier = request.headers.items()
        made = await self._service.embed(embed, self._request_timeout_s, carrier)
        # Rendering many vectors as JSON takes milliseconds: off the loop.
        render = functools.partial(embeddings_api.response_body, made, as_base64)
        body = await off_loop(render) if len(made.vectors) > 8 else render()
        return web.Response(
            body=body, content_type="application/json", headers=_id_headers(request)
        )

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """Anthropic's count_tokens: the prompt as a host would render and tokenize it."""
        generate = _routed(request, await _read(request, _parse_count))
        with _span(request, "count_tokens", generate):
            counted = await self._service.count_tokens(generate, self._request_timeout_s)
        body = {"input_tokens": counted.input_tokens}
        return web.json_response(body, headers=_id_headers(request))

    async def _infill(self, request: web.Request) -> web.StreamResponse:
        """llama-server's /infill (gateway.infill_api), for its editor plugins."""
        generate, stream = await _read(request, _parse_infill)
        generate = _routed(request, generate)
        headers = _id_headers(request)
        with _span(request, "infill", generate) as span:
            answers = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(answers):
                event = await anext(answers)  # errors before the first token raise here
                out: web.StreamResponse | None = None
                if stream:
                    out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
                    await out.prepare(request)
                texts: list[str] = []
                while not isinstance(event, Finished):
                    if isinstance(event, Token) and event.text:
                        texts.append(event.text)
                        if out is not None:
                            await out.write(infill_api.chunk(event.text))
                    event = await anext(answers)
                span.set_attributes(finish_attributes(event))
                failed = event.reason in (FinishReason.ERROR, FinishReason.CANCELLED)
                error = {"code": 502, "message": event.error_message, "type": "server_error"}
                if out is not None:
                    final = {"error": error} if failed else infill_api.final_json("", event, True)
                    await out.write(sse(final))
                    return out
                if failed:
                    return web.json_response({"error": error}, status=502, headers=headers)
                body = infill_api.final_json("".join(texts), event, False)
                return web.json_response(body, headers=headers)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (gateway.responses), on the same request path; a stored
        response's conversation continues with `previous_response_id`."""
        parsed = await _read(request, _parse_responses)
        ident = responses.response_id()
        history: tuple[Turn, ...] = ()
        root = ident
        if parsed.previous_response_id is not None:
            previous = await self._stored_or_404(parsed.previous_response_id)
            history, root = previous.conversation, previous.root
        prepared = responses.prepare(parsed, history)
        generate = prepared.request
        if not generate.routing.conversation_id:  # the chain's hosts hold its prefix
            routing = replace(generate.routing, conversation_id=f"response:{root}")
            generate = replace(generate, routing=routing)
        generate = await off_loop(_ready, generate) if heavy(generate) else _ready(generate)
        generate = _routed(request, generate)
        headers = _id_headers(request)
        shape = responses.ResponseShape(ident, parsed)
        with _span(request, "responses", generate) as span:
            answers = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(answers):
                event = await anext(answers)  # errors before the first token raise here
                outputs = Outputs()
                out: web.StreamResponse | None = None
                events = responses.ResponseEvents(shape)
                if parsed.stream:
                    out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
                    await out.prepare(request)
                    for item in events.start():
                        await out.write(responses.sse(item))
                while not isinstance(event, Finished):
                    outputs.add(event)
                    if out is not None:
                        for item in events.on(event):
                            await out.write(responses.sse(item))
                    event = await anext(answers)
                span.set_attributes(finish_attributes(event))
                (output,) = outputs.choices(event)
                if out is not None:
                    ending = events.finish(output, event)
                    final = ending[-1]["response"]
                    await self._store(parsed, ident, root, history, prepared, output, final)
                    for item in ending:
                        await out.write(responses.sse(item))
                    return out
                final = shape.final(output, event)
                if final["status"] == "failed":
                    # The host failed mid-answer: a server error, which clients retry.
                    message = final["error"]["message"]
                    body = {"error": {"message": message, "type": "server_error"}}
                    return web.json_response(body, status=502, headers=headers)
                await self._store(parsed, ident, root, history, prepared, output, final)
                return web.json_response(final, headers=headers)

    async def _store(
        self,
        parsed: responses.ResponsesRequest,
        ident: str,
        root: str,
        history: tuple[Turn, ...],
        prepared: responses.Prepared,
        output: ChoiceOutput,
        final: dict[str, Any],
    ) -> None:
        if not parsed.store or self._stored is None or final["status"] == "failed":
            return
        conversation = history + prepared.turns + responses.output_turns(output)
        stored = StoredResponse(ident, root, conversation, final)
        await self._stored.put(stored)

    async def _stored_or_404(self, ident: str) -> StoredResponse:
        found = None
        if self._stored is not None:
            found = await self._stored.get(ident)
        if found is None:
            raise NotFound(
                f"no stored response {shown(ident)}: responses are kept only when created with "
                "store true (the default), and for response_retention_s (30 days by default)"
            )
        return found

    async def _stored_response(self, request: web.Request) -> web.Response:
        found = await self._stored_or_404(request.match_info["id"])
        return web.json_response(found.body, headers=_id_headers(request))

    async def _input_items(self, request: web.Request) -> web.Response:
        """What a stored response read: its conversation before its answer, as input items
        (newest first unless `order=asc`), paged by `limit` and `after`."""
        found = await self._stored_or_404(request.match_info["id"])
        conversation = found.conversation
        if found.body.get("output"):
            conversation = conversation[:-1]  # its own answer, stored as the last turn
        items = responses.input_items(conversation)
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidArgument("order: asc or desc")
        if order == "desc":
            items.reverse()
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise InvalidArgument("limit: a number from 1 to 100") from None
        if not 1 <= limit <= 100:
            raise InvalidArgument("limit: a number from 1 to 100")
        after = request.query.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        body = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
        return web.json_response(body, headers=_id_headers(request))

    async def _delete_response(self, request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        deleted = self._stored is not None and await self._stored.delete(ident)
        if not deleted:
            raise NotFound(f"no stored response {shown(ident)}")
        body = {"id": ident, "object": "response.deleted", "deleted": True}
        return web.json_response(body, headers=_id_headers(request))

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
        opened: set[int] = set()  # choices whose role chunk went out
        offsets: dict[int, int] = {}  # text sent per choice: legacy logprobs' text_offset

        async def open_choice(choice: int, model: str) -> None:
            if chat and choice not in opened:
                await out.write(sse(chunk(model=model, choice=choice, role=True)))
            opened.add(choice)

        while True:
            if isinstance(event, Finished):
                span.set_attributes(finish_attributes(event))
                if event.error_message:
                    error = {"error": {"message": event.error_message, "type": "server_error"}}
                    await out.write(sse(error))
                ends = event.choices or (ChoiceEnd(0, event.reason),)
                for end in ends:
                    await open_choice(end.index, event.model or model)
                    last = chunk(
                        model=event.model or model,
                        choice=end.index,
                        finish_reason=end.reason.value,
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
                body = chunk(model=model, choice=choice, text=event.text, logprobs=logprobs)
            else:
                call = tool_call_json(
                    event.call_index, event.id, event.name, event.arguments, streamed=True
                )
                body = chunk(model=model, choice=choice, tool_call=call)
            await open_choice(choice, model)
            await out.write(sse(body))
            event = await anext(responses)


def _span(request: web.Request, kind: str, generate: GenerateRequest) -> Any:
    """The request's server span, named by its kind and model, continuing a caller's trace."""
    attributes = functools.partial(request_attributes, generate)
    name = f"{kind} {generate.model}"
    return tracing.request_span(_tracer, name, attributes, request.headers.items())


async def _read(request: web.Request, parse: Callable[..., _T], *args: Any) -> _T:
    """The body parsed and validated; a large one on a worker process, so the loop serves
    the rest meanwhile."""
    raw = await request.read()
    if len(raw) > HEAVY_SIZE:
        return await off_process(parse, raw, *args)
    return parse(raw, *args)


def _routed(request: web.Request, generate: GenerateRequest) -> GenerateRequest:
    """The request with its id, and a conversation's affinity hint from X-Conversation-Id
    (where a body's own hint, OpenAI's `user` or Anthropic's metadata.user_id, is overridden)."""
    routing = replace(generate.routing, key=request.get(API_KEY, ""))
    conversation = request.headers.get("x-conversation-id")
    if conversation is not None:
        routing = replace(routing, conversation_id=conversation)
    return replace(generate, request_id=request[REQUEST_ID], routing=routing)


def _parse(raw: bytes, chat: bool) -> tuple[GenerateRequest, bool, bool]:
    """The body as the gateway's request, validated, with whether to stream and whether to
    send usage in the stream; InvalidArgument says what is wrong. Nothing else of the parsed
    body is kept (a chat of 20,000 messages is 40,000 objects for the cycle collector)."""
    parsed = parse_request(json_body(raw), chat=chat)
    return _ready(generate_request(parsed)), parsed.stream, parsed.include_usage


def _parse_messages(raw: bytes) -> tuple[GenerateRequest, bool]:
    """An Anthropic Messages body as the gateway's request, validated; whether to stream."""
    parsed = anthropic.parse_messages(json_body(raw))
    return _ready(anthropic.generate_request(parsed)), parsed.stream


def _parse_responses(raw: bytes) -> responses.ResponsesRequest:
    """A Responses body, validated against its schema (the conversation it continues is read
    from the store before the request is built)."""
    return responses.parse(json_body(raw))


def _parse_infill(raw: bytes) -> tuple[GenerateRequest, bool]:
    parsed = infill_api.parse(json_body(raw))
    return _ready(infill_api.generate_request(parsed)), parsed.stream


def _parse_embeddings(raw: bytes) -> tuple[EmbedRequest, bool]:
    return embeddings_api.parse(json_body(raw))


def _parse_count(raw: bytes) -> GenerateRequest:
    """An Anthropic count_tokens body as the gateway's request, validated."""
    return _ready(anthropic.generate_request(anthropic.parse_count(json_body(raw))))


def _ready(generate: GenerateRequest) -> GenerateRequest:
    """Validated, and a heavy request's prefix hashed here, where it costs the loop nothing."""
    validate(generate)
    if heavy(generate):
        prefix = request_prefix(generate)
        generate = replace(generate, routing=replace(generate.routing, prefix=prefix))
    return generate


def generate_request(parsed: ChatCompletionRequest | CompletionRequest) -> GenerateRequest:
    """The gateway's request for an OpenAI body (the caller adds its id)."""
    messages, prompt, infill = None, None, None
    if isinstance(parsed, ChatCompletionRequest):
        messages = tuple(m.turn() for m in parsed.messages)
    elif (infill := parsed.infill()) is None:
        prompt = parsed.text
    return GenerateRequest(
        model=parsed.model,
        prompt=prompt,
        messages=messages,
        infill=infill,
        sampling=Sampling(**parsed.sampling()),
        stopping=Stopping(parsed.token_limit, tuple(parsed.stops), parsed.ignore_eos),
        routing=Routing(conversation_id=parsed.user or ""),
        output=parsed.output(),
    )
