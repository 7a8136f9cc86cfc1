"""Assembles and runs the modelhost gRPC server."""

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from airouter import grpc_server
from airouter.v1 import model_host_pb2, model_host_pb2_grpc
from modelhost.config import HostConfig
from modelhost.llama import default_threads
from modelhost.residency import Residency
from modelhost.servicer import ModelHostServicer
from modelhost.serving import GenerationService

SERVICE_NAME = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name


@dataclass
class RunningHost:
    """A started modelhost: its server, bound port and the models it keeps."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    residency: Residency

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.residency.close()


async def start_host(config: HostConfig, device: str) -> RunningHost:
    """Starts serving at once (health answers SERVING) while the models load in the background."""
    residency = Residency(
        config.models,
        device=device,
        threads=config.threads or default_threads(),
        cache_dir=config.cache_dir,
    )
    server, health_servicer = grpc_server.new_server([SERVICE_NAME])
    model_host_pb2_grpc.add_ModelHostServicer_to_server(
        ModelHostServicer(GenerationService(residency)), server
    )
    port = grpc_server.bind(server, config.listen)
    await server.start()
    await grpc_server.mark_serving(health_servicer, [SERVICE_NAME])
    residency.start_loading_all()
    return RunningHost(server, health_servicer, port, residency)
