"""The modelhosts the gateway knows: a channel each and a cached view of their models."""

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import structlog

from airouter.v1 import gateway_pb2, generate_pb2, model_host_pb2

_log = structlog.get_logger()

# How long a host's model list is trusted before a request refreshes it.
CATALOG_TTL_S = 5.0
# How long a host gets to answer ListModels before it counts as unreachable.
LIST_TIMEOUT_S = 2.0


@dataclass
class Host:
    """One modelhost and what it last said it serves."""

    address: str
    channel: grpc.aio.Channel
    models: list[generate_pb2.ModelInfo] = field(default_factory=list)
    reachable: bool = False
    last_error: str = "not contacted yet"
    refreshed_at: float = float("-inf")
    refreshing: "asyncio.Future[None] | None" = None

    def __post_init__(self) -> None:
        # The gateway's request and response messages mirror the host's field for field, so
        # the host's stream is parsed straight into the gateway's response type (no copy).
        self.generate = self.channel.unary_stream(
            "/airouter.v1.ModelHost/Generate",
            request_serializer=gateway_pb2.GatewayGenerateRequest.SerializeToString,
            response_deserializer=gateway_pb2.GatewayGenerateResponse.FromString,
        )
        self.list_models = self.channel.unary_unary(
            "/airouter.v1.ModelHost/ListModels",
            request_serializer=model_host_pb2.ListModelsRequest.SerializeToString,
            response_deserializer=model_host_pb2.ListModelsResponse.FromString,
        )

    def serves(self, model: str) -> bool:
        return any(model == m.name or model in m.aliases for m in self.models)


class HostPool:
    """All configured hosts, with their catalogs refreshed on demand."""

    def __init__(self, addresses: list[str]) -> None:
        self.hosts = [Host(a, grpc.aio.insecure_channel(a)) for a in dict.fromkeys(addresses)]

    def start_refresh(self, *, max_age_s: float = CATALOG_TTL_S) -> list["asyncio.Future[None]"]:
        """Asks every host whose catalog is older than max_age_s for its models, concurrently,
        without waiting; a host's call in flight is shared rather than sent again."""
        now = time.monotonic()
        pending = []
        for host in self.hosts:
            if now - host.refreshed_at < max_age_s:
                continue
            if host.refreshing is None or host.refreshing.done():
                host.refreshing = asyncio.ensure_future(self._refresh_host(host))
            pending.append(host.refreshing)
        return pending

    async def refresh(self, *, max_age_s: float = CATALOG_TTL_S) -> None:
        """Like start_refresh, then waits for the answers (at most LIST_TIMEOUT_S)."""
        pending = self.start_refresh(max_age_s=max_age_s)
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending))

    async def _refresh_host(self, host: Host) -> None:
        try:
            response = await host.list_models(
                model_host_pb2.ListModelsRequest(), timeout=LIST_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if host.reachable:
                _log.warning("host_down", host=host.address, code=exc.code().name)
            host.reachable, host.models = False, []
            host.last_error = f"{exc.code().name}: {exc.details()}"
        else:
            if not host.reachable:
                _log.info("host_up", host=host.address, models=[m.name for m in response.models])
            host.reachable, host.models, host.last_error = True, list(response.models), ""
        host.refreshed_at = time.monotonic()

    def reachable(self) -> list[Host]:
        return [h for h in self.hosts if h.reachable]

    async def close(self) -> None:
        for host in self.hosts:
            if host.refreshing is not None:
                host.refreshing.cancel()
        await asyncio.gather(*(h.channel.close() for h in self.hosts))
