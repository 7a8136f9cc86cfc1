"""The gateway's OpenAI-compatible HTTP edge (aiohttp): /v1/chat/completions, /v1/completions
and /v1/models, streaming (SSE) or not, a thin adapter over the gateway's service core, like
the gRPC Generate: local hosts, OpenRouter models, failover. Same tokens as gRPC; errors in
OpenAI's JSON shape. Each request has a deadline (request_timeout_s), and a client that leaves
cancels its request on the host, streamed or not.
"""

import asyncio
import json
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import structlog
from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from airouter import tracing
from airouter.errors import AirouterError, NotFound, Unauthenticated
from airouter.openai_api import (
    FINISH_REASON_NAMES,
    chunk_json,
    completion_json,
    error_json,
    openai_message,
    parse_request,
    sse,
    usage_json,
)
from airouter.security import Credentials, accepts_token
from gateway.metrics import GatewayMetrics
from gateway.service import MAX_GENERATE_BYTES, GatewayService

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 75.0
REQUEST_ID = web.RequestKey("request_id", str)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _model_json(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "airouter"}


def _close_if_no_request(handler: Any) -> None:
    # _request_count: requests whose headers the connection has parsed (aiohttp's own count).
    if getattr(handler, "_request_count", 1) == 0 and handler.transport is not None:
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
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_S
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
        handler = self._runner.server()
        asyncio.get_running_loop().call_later(self._header_timeout_s, _close_if_no_request, handler)
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
        data = [_model_json(m.name) for m in listed.models]
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: a model by name or alias (openrouter/ names included)."""
        wanted = request.match_info["model"]
        listed = await self._service.list_models()
        for model in listed.models:
            if wanted == model.name or wanted in model.aliases:
                return web.json_response(_model_json(model.name))
        raise NotFound(f"no model {wanted!r}; GET /v1/models lists them")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body: Any = json.loads((await request.read()).decode("utf-8"))
        except UnicodeDecodeError as exc:
            return _error("INVALID_ARGUMENT", f"the body is not UTF-8 (byte {exc.start})")
        except json.JSONDecodeError as exc:
            return _error("INVALID_ARGUMENT", f"the body is not JSON: {exc}")
        generate, stream, include_usage = parse_request(body, chat=chat)
        generate.request_id = request[REQUEST_ID]
        # A conversation's affinity hint; OpenAI's `user` field says the same for an end user.
        generate.conversation_id = request.headers.get(
            "x-conversation-id", generate.conversation_id
        )
        headers = {"x-request-id": generate.request_id}
        with tracing.request_span(_tracer, generate, request.headers.items()) as span:
            responses = self._service.generate(generate, self._request_timeout_s)
            async with aclosing(responses):
                ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
                created = int(time.time())
                first = await anext(responses)  # errors before the first token raise here
                if not stream:
                    texts: list[str] = []
                    message = first
                    while not message.HasField("finished"):
                        texts.append(message.token.text)
                        message = await anext(responses)
                    span.set_attributes(tracing.finish_attributes(message.finished))
                    return web.json_response(
                        completion_json(
                            chat=chat,
                            id=ident,
                            created=created,
                            text="".join(texts),
                            finished=message.finished,
                        ),
                        headers=headers,
                    )
                out = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        **headers,
                    }
                )
                await out.prepare(request)
                message, model, opening = first, generate.model, True
                while True:
                    if message.HasField("finished"):
                        finished = message.finished
                        span.set_attributes(tracing.finish_attributes(finished))
                        reason = FINISH_REASON_NAMES.get(finished.reason, "stop")
                        if finished.error_message:
                            error = {
                                "error": {"message": finished.error_message, "type": "server_error"}
                            }
                            await out.write(sse(error))
                        last = chunk_json(
                            chat=chat,
                            id=ident,
                            created=created,
                            model=finished.model or model,
                            text="",
                            finish_reason=reason,
                            first=opening,
                        )
                        await out.write(sse(last))
                        if include_usage:
                            usage = {**last, "choices": [], "usage": usage_json(finished)}
                            await out.write(sse(usage))
                        await out.write(sse("[DONE]"))
                        return out
                    chunk = chunk_json(
                        chat=chat,
                        id=ident,
                        created=created,
                        model=model,
                        text=message.token.text,
                        finish_reason=None,
                        first=opening,
                    )
                    await out.write(sse(chunk))
                    opening = False
                    message = await anext(responses)
