"""Assembles and runs the modelhost gRPC server."""

import asyncio
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from airouter import grpc_server
from airouter.labels import format_bytes
from airouter.security import Credentials, check_unprotected_listener
from airouter.v1 import model_host_pb2, model_host_pb2_grpc
from modelhost.config import HostConfig
from modelhost.device import default_threads
from modelhost.embedding import EmbeddingService
from modelhost.engines import ENGINES, backend
from modelhost.memory import MemoryProbe, parse_size, reserve_bytes
from modelhost.metrics import MetricsServer, RequestMetrics, start_metrics_server
from modelhost.residency import Residency
from modelhost.servicer import ModelHostServicer, host_status_pb
from modelhost.serving import GenerationService

_log = structlog.get_logger()

SERVICE_NAME = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name
# RPCs that change what the host holds: only the admin token may call them.
ADMIN_METHODS = {f"/{SERVICE_NAME}/LoadModel", f"/{SERVICE_NAME}/UnloadModel"}


@dataclass
class RunningHost:
    """A started modelhost: its server, bound port and the models it keeps."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    residency: Residency
    metrics: MetricsServer | None = None

    async def stop(self, grace_s: float | None = None) -> None:
        self.residency.drain()
        await self.server.stop(grace_s)
        await self.close()

    async def close(self) -> None:
        """Frees the models and stops /metrics, once the gRPC server has stopped."""
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        await self.residency.close()


async def start_host(config: HostConfig, device: str) -> RunningHost:
    """Starts serving at once (health answers SERVING) while the models marked preload load
    in the background."""
    credentials = Credentials(config)
    warning = credentials.check_exposure(config.listen, "modelhost")
    if config.metrics_listen:
        check_unprotected_listener(config.metrics_listen, "/metrics", config.insecure)
    if warning:
        _log.warning("serving_without_protection", detail=warning)
    for name in ENGINES:
        _log.info("engine_build", engine=name, **backend(name).build())
    probe = MemoryProbe(device)
    budget = memory_budget(config, probe)
    _log.info("memory_budget", device=device, budget=format_bytes(budget))
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    residency = Residency(
        config.models,
        device=device,
        threads=config.threads or default_threads(),
        cache_dir=config.cache_dir,
        budget_bytes=budget,
        memory=probe,
    )
    server, health_servicer = grpc_server.new_server(
        [SERVICE_NAME], credentials, admin_methods=ADMIN_METHODS
    )
    model_host_pb2_grpc.add_ModelHostServicer_to_server(
        ModelHostServicer(
            GenerationService(residency, metrics), EmbeddingService(residency, metrics)
        ),
        server,
    )
    port = grpc_server.bind(server, config.listen, credentials.tls)
    await server.start()
    await grpc_server.mark_serving(health_servicer, [SERVICE_NAME])
    residency.start()
    host = RunningHost(server, health_servicer, port, residency)
    if config.metrics_listen:
        try:
            host.metrics = start_metrics_server(
                config.metrics_listen,
                asyncio.get_running_loop(),
                lambda: host_status_pb(residency),
                registry,
            )
        except OSError:
            await host.stop(0)
            raise
    return host


def memory_budget(config: HostConfig, probe: MemoryProbe) -> int:
    """Bytes the models may use: memory_budget if set, else the device's memory less the
    reserve."""
    if config.memory_budget is not None:
        return parse_size(config.memory_budget)
    total = probe.read().total
    return total - reserve_bytes(config.memory_reserve, total)
