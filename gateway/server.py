"""Assembles and runs the gateway gRPC server."""

import ssl
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health

from airouter import grpc_server
from airouter.security import Credentials, channel_credentials, read_secret
from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.batch_store import BatchStore
from gateway.batches import BatchRunner
from gateway.config import MODELHOST_TOKEN_ENV, OPENROUTER_KEY_ENV, GatewayConfig
from gateway.database import Database, open_database
from gateway.file_store import FileStore
from gateway.hosts import CHANNEL_OPTIONS, HostPool
from gateway.http_edge import HttpEdge
from gateway.key_store import KeyStore
from gateway.keys import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.openai_batches import BatchDoor
from gateway.prefixes import PrefixPolicy
from gateway.response_store import ResponseStore
from gateway.schema import VERSION as SCHEMA_VERSION
from gateway.schema import migrate
from gateway.service import CloudRouting, GatewayService
from gateway.servicer import GatewayServicer
from gateway.status import StatusBoard
from gateway.upstream import OpenAIUpstream, UpstreamSettings

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
# RPCs only the admin token opens: the keys' administration.
ADMIN_METHODS = frozenset(
    f"/{SERVICE_NAME}/{name}" for name in ("CreateKey", "ListKeys", "RevokeKey", "GetKeyUsage")
)
# A batch arrives in one message: room for 50000 items of a few hundred bytes each.
MAX_MESSAGE_BYTES = 64 << 20

_log = structlog.get_logger()


@dataclass
class RunningGateway:
    """A started gateway: its server, bound port and host pool."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    pool: HostPool
    upstream: OpenAIUpstream
    service: GatewayService
    batches: BatchRunner
    database: Database
    http: HttpEdge | None = None

    async def drain(self) -> None:
        """Shutdown begins: batches stop taking items, new requests are refused on both
        listeners, and this returns once the accepted ones have finished."""
        self.batches.drain()
        self.service.drain()
        _log.info("draining", in_flight=self.service.in_flight)
        await self.batches.stop_items()  # they run again at the next start
        await self.service.drained()

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.close()

    async def close(self) -> None:
        """Closes the HTTP edge, the batches (items still running run again at the next
        start), the host channels and the upstream session, once the gRPC server has
        stopped."""
        if self.http is not None:
            await self.http.close()
        await self.batches.close()
        await self.pool.close()
        await self.upstream.close()
        await self.service.close()  # the last usage rows are written
        if self.service.keys is not None:
            await self.service.keys.close()
        await self.database.close()


def host_pool(config: GatewayConfig) -> HostPool:
    """The pool of modelhosts, over TLS when a CA for them is configured."""
    token = read_secret(config.modelhost_token_file, MODELHOST_TOKEN_ENV)
    if config.modelhost_ca is None:
        if config.modelhost_cert is not None:
            _log.warning("modelhost_cert_ignored", reason="modelhost_ca is not set: no TLS")
        return HostPool(config.modelhosts, dns_refresh_s=config.dns_refresh_s, token=token)
    tls = channel_credentials(config.modelhost_ca, config.modelhost_cert, config.modelhost_key)

    def secure(address: str, server_name: str | None = None) -> grpc.aio.Channel:
        # Hosts behind one DNS name are dialled by address; their certificates name the name.
        options: list[tuple[str, str | int]] = [*CHANNEL_OPTIONS]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        return grpc.aio.secure_channel(address, tls, options=options)

    return HostPool(
        config.modelhosts, channel=secure, dns_refresh_s=config.dns_refresh_s, token=token
    )


async def start_gateway(config: GatewayConfig) -> RunningGateway:
    """Starts serving; hosts are contacted in the background."""
    credentials = Credentials(config)
    # Both listeners are checked before anything starts, so a refusal leaves nothing running.
    warnings = [credentials.check_exposure(config.listen, "gateway")]
    if config.http_listen:
        warnings.append(credentials.check_exposure(config.http_listen, "gateway HTTP edge"))
    for warning in filter(None, warnings):
        _log.warning("serving_without_protection", detail=warning)
    database = await open_database(config.store)
    try:
        version = await migrate(database)
        if version != SCHEMA_VERSION:
            _log.info("store_migrated", store=database.described, to=SCHEMA_VERSION, was=version)
        return await _start(config, credentials, database)
    except BaseException:
        await database.close()
        raise


async def _start(
    config: GatewayConfig, credentials: Credentials, database: Database
) -> RunningGateway:
    pool = host_pool(config)
    upstream = OpenAIUpstream(
        UpstreamSettings(
            api_key=read_secret(config.openrouter_api_key_file, OPENROUTER_KEY_ENV),
            base_url=config.openrouter_base_url,
        )
    )
    await upstream.start()
    cloud = CloudRouting(
        upstream,
        config.default_policy,
        dict(config.model_policies),
        dict(config.cloud_models),
        tuple(config.cloud_allowed_models),
        config.allow_policy_override,
    )
    keys = await KeyRing.load(KeyStore(database))
    server, health_servicer = grpc_server.new_server(
        [SERVICE_NAME],
        credentials,
        admin_methods=ADMIN_METHODS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        keys=keys,
    )
    metrics = GatewayMetrics(pool, upstream)
    prefix_policy = PrefixPolicy(
        config.prefix_routing, config.prefix_min_tokens, config.prefix_max_queue_gap
    )
    service = GatewayService(
        pool, cloud, metrics, config.first_message_timeout_s, prefix_policy, keys
    )
    batches = BatchRunner(
        BatchStore(database),
        service,
        metrics,
        max_attempts=config.batch_max_attempts,
        item_timeout_s=config.batch_item_timeout_s,
        retention_s=config.batch_retention_s,
        lease_s=config.batch_lease_s,
    )
    try:
        await batches.start()
    except BaseException:
        await upstream.close()
        raise
    servicer = GatewayServicer(service, batches, keys)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    try:
        port = grpc_server.bind(server, config.listen, credentials.tls)
    except OSError:
        await batches.close()
        await upstream.close()
        raise
    await server.start()
    await grpc_server.mark_serving(health_servicer, [SERVICE_NAME])
    await pool.start()
    gateway = RunningGateway(
        server, health_servicer, port, pool, upstream, service, batches, database
    )
    if config.http_listen:
        sqlite_path = config.sqlite_path
        files = FileStore(database, sqlite_path.parent / "files" if sqlite_path else None)
        gateway.http = HttpEdge(
            service,
            credentials,
            metrics,
            config.http_request_timeout_s,
            config.http_header_timeout_s,
            config.cors_origins,
            ResponseStore(database, config.response_retention_s),
            BatchDoor(
                files,
                batches,
                config.max_upload_bytes,
            ),
            keys,
            StatusBoard(service, metrics, batches, keys, database),
            database,
        )
        try:
            await files.start()
            await gateway.http.start(config.http_listen, http_tls(config))
        except OSError:
            await gateway.stop(0)
            raise
    return gateway


def http_tls(config: GatewayConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP edge: the gRPC server's certificate (clients' certificates are not
    asked for on HTTP: tokens authenticate there)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
