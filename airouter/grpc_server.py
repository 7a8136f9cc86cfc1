"""What both airouter servers share: the error-to-status table, health, reflection, and a
graceful run loop."""

import asyncio
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from airouter import errors
from airouter.reflection import serve_reflection
from airouter.security import AuthInterceptor, Credentials, KeyValidator

_log = structlog.get_logger()


# HTTP/2 keepalive on both servers: a ping after 20 s without traffic, and a peer that does
# not answer within 10 s is gone (a gateway that vanished stops holding the host's requests);
# clients may ping every 5 s, as the gateway's host channels do every 10 s. grpc enforces the
# answer's deadline through ping_timeout_ms (its default is a minute), so both are set.
SERVER_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs a server's main coroutine to the end on uvloop where it is installed (Linux and
    macOS): its C event loop takes about 8% off the gateway's CPU per request and per
    relayed token, most of which is event-loop wake-ups for grpc's completions. Elsewhere on
    asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def status_for(error: errors.AirouterError) -> grpc.StatusCode:
    """The gRPC status code of a domain error: the status of the same name."""
    return grpc.StatusCode[error.code]


def error_from_rpc(exc: grpc.aio.AioRpcError) -> errors.AirouterError:
    """The domain error for a failed call to another airouter server."""
    return errors.error_for_code(exc.code().name, exc.details() or exc.code().name)


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):
    """Ends an RPC whose handler raised an AirouterError with that error's status and message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: errors.AirouterError) -> None:
    """Ends the call with the error's status; a limit's wait rides in a retry-after trailer
    (whole seconds), as HTTP's header does."""
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(max(math.ceil(exc.retry_after_s), 1))),))
    await context.abort(status_for(exc), str(exc))


def _guard_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except errors.AirouterError as exc:
            await _abort(context, exc)

    return guarded


def _guard_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except errors.AirouterError as exc:
            await _abort(context, exc)

    return guarded


def new_server(
    service_names: Iterable[str],
    credentials: Credentials | None = None,
    admin_methods: Iterable[str] = (),
    max_message_bytes: int | None = None,
    keys: KeyValidator | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with token checks (when credentials carry tokens), the error
    interceptor, health (SERVING at once) and reflection; requests up to max_message_bytes
    (gRPC's default 4 MiB when None)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [DomainErrorInterceptor()]
    if credentials is not None and credentials.authenticates:
        interceptors.insert(0, AuthInterceptor(credentials, set(admin_methods), keys))
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 0), *SERVER_KEEPALIVE]
    if max_message_bytes is not None:
        options.append(("grpc.max_receive_message_length", max_message_bytes))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    serve_reflection(server, [*service_names, health.SERVICE_NAME])
    return server, health_servicer


async def mark_serving(
    health_servicer: health.aio.HealthServicer, service_names: Iterable[str]
) -> None:
    """Reports the whole server and each named service as SERVING."""
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def bind(server: grpc.aio.Server, address: str, tls: grpc.ServerCredentials | None = None) -> int:
    """Listens on address (HOST:PORT, port 0 for any free one), with TLS when given, and
    returns the bound port."""
    why = (
        f"cannot listen on {address}: the address is in use or invalid; pick another with --listen"
    )
    try:
        port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        raise OSError(why) from None
    if port == 0:
        raise OSError(why)
    return port


async def serve_until_signalled(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    grace_s: float,
    on_stopped: Callable[[], Awaitable[None]] | None = None,
    on_draining: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then reports NOT_SERVING, stops accepting RPCs and
    lets in-flight ones finish within grace_s before cancelling them. on_draining runs first,
    so long-lived streams (WatchStatus) can end instead of holding the grace period; when it
    returns an awaitable (the service's own drain), that is awaited within the grace period
    before the server stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("shutdown_started", grace_s=grace_s)
    deadline = loop.time() + grace_s
    await health_servicer.enter_graceful_shutdown()
    if on_draining is not None:
        drained = on_draining()
        if drained is not None:
            try:
                await asyncio.wait_for(drained, grace_s)
            except TimeoutError:
                _log.warning("shutdown_grace_passed", grace_s=grace_s)
    await server.stop(max(deadline - loop.time(), 0))
    if on_stopped is not None:
        await on_stopped()
    _log.info("shutdown_finished")
