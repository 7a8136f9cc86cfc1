"""Assembles and runs the gateway gRPC server."""

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from airouter import grpc_server
from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.hosts import HostPool
from gateway.servicer import GatewayServicer

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
DEFAULT_LISTEN = "127.0.0.1:50050"
DEFAULT_MODELHOST = "127.0.0.1:50051"


@dataclass
class RunningGateway:
    """A started gateway: its server, bound port and host pool."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    pool: HostPool

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.pool.close()


async def start_gateway(listen: str, modelhosts: list[str]) -> RunningGateway:
    pool = HostPool(modelhosts)
    pool.start()
    server, health_servicer = grpc_server.new_server([SERVICE_NAME])
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(pool), server)
    port = grpc_server.bind(server, listen)
    await server.start()
    await grpc_server.mark_serving(health_servicer, [SERVICE_NAME])
    return RunningGateway(server, health_servicer, port, pool)
