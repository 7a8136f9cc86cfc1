"""airouter.v1.Gateway over gRPC."""

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry import trace

from airouter import tracing
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from gateway.batches import BatchRunner
from gateway.hosts import Host, HostPool, HostState
from gateway.metrics import GatewayMetrics
from gateway.relay import CloudRouting, HostError

# When hosts disagree on a model's state, the merged entry shows the most usable one.
_STATE_RANK = {
    state: rank
    for rank, state in enumerate(
        [
            generate_pb2.MODEL_STATE_READY,
            generate_pb2.MODEL_STATE_LOADING,
            generate_pb2.MODEL_STATE_NOT_LOADED,
            generate_pb2.MODEL_STATE_UNLOADING,
            generate_pb2.MODEL_STATE_ERROR,
        ]
    )
}


_tracer = trace.get_tracer("airouter.gateway")
# How long a listing right after start waits for hosts to be tried.
FIRST_CONTACT_WAIT_S = 3.0
HOST_STATE_TO_PB = {
    HostState.UP: gateway_pb2.HOST_STATE_UP,
    HostState.DOWN: gateway_pb2.HOST_STATE_DOWN,
    HostState.COOLING_DOWN: gateway_pb2.HOST_STATE_COOLING_DOWN,
    HostState.DRAINING: gateway_pb2.HOST_STATE_DRAINING,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Routes Generate to a host, merges ListModels across hosts, and takes batches."""

    def __init__(
        self, pool: HostPool, cloud: CloudRouting, metrics: GatewayMetrics, batches: BatchRunner
    ) -> None:
        self._pool = pool
        self._cloud = cloud
        self._metrics = metrics
        self._batches = batches

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        with tracing.request_span(_tracer, request, context.invocation_metadata()) as span:
            stream = self._metrics.relayed(
                self._pool, request, context.time_remaining(), self._cloud
            )
            async with aclosing(stream):
                try:
                    async for response in stream:
                        if response.HasField("finished"):
                            span.set_attributes(tracing.finish_attributes(response.finished))
                        yield response
                except HostError as exc:
                    span.set_status(trace.StatusCode.ERROR, exc.details)
                    await context.abort(exc.code, exc.details)

    async def ListModels(
        self, request: gateway_pb2.GatewayListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayListModelsResponse:
        return await list_models(self._pool)

    async def ListHosts(
        self, request: gateway_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListHostsResponse:
        await self._pool.first_contact(FIRST_CONTACT_WAIT_S)
        return gateway_pb2.ListHostsResponse(hosts=[host_info_pb(h) for h in self._pool.hosts])

    async def SubmitBatch(
        self, request: gateway_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SubmitBatchResponse:
        batch = await self._batches.submit(request, context.invocation_metadata())
        return gateway_pb2.SubmitBatchResponse(batch=batch)

    async def GetBatch(
        self, request: gateway_pb2.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetBatchResponse:
        return gateway_pb2.GetBatchResponse(batch=self._batches.get(request.batch_id))

    async def ListBatches(
        self, request: gateway_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListBatchesResponse:
        return gateway_pb2.ListBatchesResponse(batches=self._batches.all())

    async def StreamBatchResults(
        self, request: gateway_pb2.StreamBatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.StreamBatchResultsResponse]:
        results = self._batches.results(request.batch_id, request.after_sequence)
        async for result, counts in results:
            yield gateway_pb2.StreamBatchResultsResponse(result=result, counts=counts)

    async def CancelBatch(
        self, request: gateway_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CancelBatchResponse:
        return gateway_pb2.CancelBatchResponse(batch=await self._batches.cancel(request.batch_id))


async def list_models(pool: HostPool) -> gateway_pb2.GatewayListModelsResponse:
    """The models of the available hosts, merged by name with their live state."""
    await pool.first_contact(FIRST_CONTACT_WAIT_S)
    merged: dict[str, generate_pb2.ModelInfo] = {}
    for host in pool.routable():
        for model in host.models:
            state = host.state_of(model.name) or model.state
            detail = _model_detail(host, model.name)
            entry = merged.get(model.name)
            if entry is None:
                entry = merged[model.name] = generate_pb2.ModelInfo()
                entry.CopyFrom(model)
                del entry.hosts[:]
                entry.state, entry.state_detail = state, detail
            elif _STATE_RANK.get(state, 9) < _STATE_RANK.get(entry.state, 9):
                entry.state, entry.state_detail = state, detail
            entry.hosts.append(host.address)
            if state == generate_pb2.MODEL_STATE_READY:
                entry.resident_hosts.append(host.address)
    return gateway_pb2.GatewayListModelsResponse(
        models=[merged[name] for name in sorted(merged)],
        unreachable_hosts=[h.address for h in pool.hosts if not h.routable],
    )


def _model_detail(host: Host, name: str) -> str:
    status = host.model_status(name)
    return status.state_detail if status else ""


def host_info_pb(host: Host) -> gateway_pb2.HostInfo:
    info = gateway_pb2.HostInfo(
        address=host.address,
        state=HOST_STATE_TO_PB[host.state],
        state_detail=host.detail,
        requests_in_flight=sum(host.in_flight.values()),
    )
    if host.status is not None:
        info.status.CopyFrom(host.status)
    info.state_since.FromNanoseconds(int(host.state_since * 1e9))
    return info
