"""airouter.v1.Gateway over gRPC: a thin adapter over the gateway's service core and its
batches. Domain errors become statuses in airouter.grpc_server's interceptor."""

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry import trace

from airouter import tracing
from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.batches import BatchRunner
from gateway.hosts import Host
from gateway.service import FIRST_CONTACT_WAIT_S, GatewayService
from gateway.standing import HostState

_tracer = trace.get_tracer("airouter.gateway")
HOST_STATE_TO_PB = {
    HostState.UP: gateway_pb2.HOST_STATE_UP,
    HostState.DOWN: gateway_pb2.HOST_STATE_DOWN,
    HostState.COOLING_DOWN: gateway_pb2.HOST_STATE_COOLING_DOWN,
    HostState.DRAINING: gateway_pb2.HOST_STATE_DRAINING,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Routes Generate to a host, merges ListModels across hosts, and takes batches."""

    def __init__(self, service: GatewayService, batches: BatchRunner) -> None:
        self._service = service
        self._batches = batches

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        with tracing.request_span(_tracer, request, context.invocation_metadata()) as span:
            stream = self._service.generate(request, context.time_remaining())
            async with aclosing(stream):  # a client leaving cancels the host call at once
                async for response in stream:
                    if response.HasField("finished"):
                        span.set_attributes(tracing.finish_attributes(response.finished))
                    yield response

    async def ListModels(
        self, request: gateway_pb2.GatewayListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayListModelsResponse:
        return await self._service.list_models()

    async def ListHosts(
        self, request: gateway_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListHostsResponse:
        pool = self._service.pool
        await pool.first_contact(FIRST_CONTACT_WAIT_S)
        return gateway_pb2.ListHostsResponse(hosts=[host_info_pb(h) for h in pool.hosts])

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
