"""Relays a generation stream from the best host, failing over while no token was sent."""

import time
import uuid
from collections.abc import AsyncGenerator

import grpc
import structlog

from airouter.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from airouter.v1 import gateway_pb2, generate_pb2
from gateway import router
from gateway.hosts import HostPool

_log = structlog.get_logger()

# Codes after which another host may well succeed; any other error is the request's own.
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class HostError(Exception):
    """A host rejected the request with a status that is the caller's to see."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


async def relay_generate(
    pool: HostPool, request: gateway_pb2.GatewayGenerateRequest, time_left_s: float | None
) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
    """Yields the chosen host's stream. Before the first message a host that is down or full
    is skipped for the next candidate; after it, a failure ends the stream with
    FINISH_REASON_ERROR."""
    deadline = None if time_left_s is None else time.monotonic() + time_left_s
    if not request.model:
        raise InvalidArgument("model is empty; name a model (`airouter models` lists them)")
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    # Stale catalogs refresh in the background while a known host serves the request; only
    # when none is known does the request wait for the hosts' answers.
    pool.start_refresh()
    if not any(h.serves(request.model) for h in pool.reachable()):
        await pool.refresh(max_age_s=0)
    hosts = router.candidates(pool.hosts, request.model)
    log = _log.bind(request_id=request.request_id, model=request.model)
    failures: list[str] = []
    last_code = grpc.StatusCode.UNAVAILABLE
    for host in hosts:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        call = host.generate(request, timeout=timeout)
        started = finished = False
        try:
            async for response in call:
                if response.HasField("finished"):
                    response.finished.host = host.address
                    finished = True
                started = True
                yield response
            if not finished:
                yield _error_finish(host.address, "the host ended the stream without a result")
            return
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if started:
                log.warning("host_failed_mid_stream", host=host.address, code=code.name)
                yield _error_finish(host.address, f"failed mid-stream: {exc.details()}")
                return
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"the deadline passed while waiting for host {host.address}: {exc.details()}"
                ) from None
            if code not in _FAILOVER_CODES:
                raise HostError(code, exc.details() or code.name) from None
            log.warning("host_failover", host=host.address, code=code.name)
            failures.append(f"{host.address} ({code.name}: {exc.details()})")
            last_code = code
            if code == grpc.StatusCode.UNAVAILABLE:
                host.refreshed_at = float("-inf")  # re-check it on the next request
        finally:
            call.cancel()  # no-op once finished; stops the host's decoding if we were cancelled
    if last_code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise ResourceExhausted(
            f"every host that serves {request.model!r} is full: {'; '.join(failures)}"
        )
    raise Unavailable(f"no host could serve {request.model!r}; tried: {'; '.join(failures)}")


def _error_finish(host: str, why: str) -> gateway_pb2.GatewayGenerateResponse:
    return gateway_pb2.GatewayGenerateResponse(
        finished=generate_pb2.Finished(
            reason=generate_pb2.FINISH_REASON_ERROR, error_message=f"host {host} {why}", host=host
        )
    )
