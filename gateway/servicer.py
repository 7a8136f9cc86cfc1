"""airouter.v1.Gateway over gRPC."""

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from gateway.hosts import HostPool
from gateway.relay import HostError, relay_generate

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


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Routes Generate to a host and merges ListModels across hosts."""

    def __init__(self, pool: HostPool) -> None:
        self._pool = pool

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        stream = relay_generate(self._pool, request, context.time_remaining())
        async with aclosing(stream):
            try:
                async for response in stream:
                    yield response
            except HostError as exc:
                await context.abort(exc.code, exc.details)

    async def ListModels(
        self, request: gateway_pb2.GatewayListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayListModelsResponse:
        await self._pool.refresh(max_age_s=0)
        merged: dict[str, generate_pb2.ModelInfo] = {}
        for host in self._pool.reachable():
            for model in host.models:
                entry = merged.get(model.name)
                if entry is None:
                    entry = merged[model.name] = generate_pb2.ModelInfo()
                    entry.CopyFrom(model)
                    del entry.hosts[:]
                elif _STATE_RANK.get(model.state, 9) < _STATE_RANK.get(entry.state, 9):
                    entry.state, entry.state_detail = model.state, model.state_detail
                entry.hosts.append(host.address)
        return gateway_pb2.GatewayListModelsResponse(
            models=[merged[name] for name in sorted(merged)],
            unreachable_hosts=[h.address for h in self._pool.hosts if not h.reachable],
        )
