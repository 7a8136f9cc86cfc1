"""airouter.v1.Gateway over gRPC: a thin adapter over the gateway's service core and its
batches. Domain errors become statuses in airouter.grpc_server's interceptor."""

import functools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import grpc
import structlog
from opentelemetry import trace

from airouter import tracing
from airouter.errors import InvalidArgument
from airouter.security import presented_token
from airouter.v1 import embed_pb2, gateway_pb2, gateway_pb2_grpc, keys_pb2
from gateway.batches import BatchRunner
from gateway.embeddings import EmbedRequest
from gateway.generation import (
    Finished,
    GenerateRequest,
    finish_attributes,
    request_attributes,
    request_prefix,
)
from gateway.hosts import Host
from gateway.key_store import KeyLimits, KeyRecord
from gateway.keys import KeyRing
from gateway.offload import HEAVY_SIZE, off_loop, off_process
from gateway.service import FIRST_CONTACT_WAIT_S, GatewayService
from gateway.standing import HostState
from gateway.wire import batch_pb, counts_pb, event_pb, item_result_pb, request_from_pb

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")
HOST_STATE_TO_PB = {
    HostState.UP: gateway_pb2.HOST_STATE_UP,
    HostState.DOWN: gateway_pb2.HOST_STATE_DOWN,
    HostState.COOLING_DOWN: gateway_pb2.HOST_STATE_COOLING_DOWN,
    HostState.DRAINING: gateway_pb2.HOST_STATE_DRAINING,
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Routes Generate to a host, merges ListModels across hosts, and takes batches."""

    def __init__(self, service: GatewayService, batches: BatchRunner, keys: KeyRing) -> None:
        self._service = service
        self._batches = batches
        self._keys = keys

    def _key(self, context: grpc.aio.ServicerContext) -> str:
        """The name of the API key the call came with; "" for a token (or none)."""
        presented = presented_token(context.invocation_metadata())
        record = self._keys.identify(presented) if presented else None
        return record.name if record is not None else ""

    def _with_key(
        self, generate: GenerateRequest, context: grpc.aio.ServicerContext
    ) -> GenerateRequest:
        key = self._key(context)
        return replace(generate, routing=replace(generate.routing, key=key)) if key else generate

    async def Generate(
        self, request: gateway_pb2.GatewayGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GatewayGenerateResponse]:
        # A large request (thousands of messages) is translated on a worker thread.
        if request.ByteSize() > HEAVY_SIZE:
            generate = await off_process(large_request, request.SerializeToString())
        else:
            generate = request_from_pb(request)
        generate = self._with_key(generate, context)
        attributes = functools.partial(request_attributes, generate)
        name = f"{'chat' if generate.chat else 'text_completion'} {generate.model}"
        metadata = context.invocation_metadata()
        with tracing.request_span(_tracer, name, attributes, metadata) as span:
            stream = self._service.generate(generate, context.time_remaining())
            async with aclosing(stream):  # a client leaving cancels the host call at once
                async for event in stream:
                    if isinstance(event, Finished):
                        span.set_attributes(finish_attributes(event))
                    yield event_pb(event)

    async def CountTokens(
        self, request: gateway_pb2.GatewayCountTokensRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayCountTokensResponse:
        if request.ByteSize() > HEAVY_SIZE:
            generate = await off_process(large_request, request.request.SerializeToString())
        else:
            generate = request_from_pb(request.request)
        generate = self._with_key(generate, context)
        counted = await self._service.count_tokens(generate, context.time_remaining())
        return gateway_pb2.GatewayCountTokensResponse(
            input_tokens=counted.input_tokens, model=counted.model, host=counted.host
        )

    async def Embed(
        self, request: gateway_pb2.GatewayEmbedRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayEmbedResponse:
        on_host = request.request
        embed = EmbedRequest(
            model=on_host.model,
            inputs=[
                list(item.tokens.ids) if item.HasField("tokens") else item.text
                for item in on_host.inputs
            ],
            dimensions=on_host.dimensions if on_host.HasField("dimensions") else None,
            request_id=on_host.request_id,
            key=self._key(context),
        )
        metadata = context.invocation_metadata()
        made = await self._service.embed(embed, context.time_remaining(), metadata)
        return gateway_pb2.GatewayEmbedResponse(
            response=embed_pb2.EmbedResponse(
                embeddings=[embed_pb2.Embedding(values=vector) for vector in made.vectors],
                prompt_tokens=made.prompt_tokens,
                model=made.model,
            ),
            host=made.host,
        )

    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.CreateKeyResponse:
        limits = key_limits_from_pb(request.limits)
        record, secret = await self._keys.create(request.name, limits)
        _log.info("key_created", key=record.name)  # never the secret
        return keys_pb2.CreateKeyResponse(key=self._key_pb(record), secret=secret)

    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ListKeysResponse:
        return keys_pb2.ListKeysResponse(keys=[self._key_pb(r) for r in self._keys.keys()])

    async def RevokeKey(
        self, request: keys_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.RevokeKeyResponse:
        record = await self._keys.revoke(request.name)
        _log.info("key_revoked", key=record.name)
        return keys_pb2.RevokeKeyResponse(key=self._key_pb(record))

    async def GetKeyUsage(
        self, request: keys_pb2.GetKeyUsageRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.GetKeyUsageResponse:
        rows = await self._keys.store.usage(request.name or None, request.since_day)
        return keys_pb2.GetKeyUsageResponse(
            usage=[
                keys_pb2.KeyUsage(
                    key=r.name,
                    day=r.day,
                    model=r.model,
                    requests=r.requests,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    cloud_cost_usd=r.cloud_cost_usd,
                )
                for r in rows
            ]
        )

    def _key_pb(self, record: KeyRecord) -> keys_pb2.ApiKey:
        key = keys_pb2.ApiKey(
            name=record.name,
            hint=record.hint,
            limits=key_limits_pb(record.limits),
            cloud_spent_usd=self._keys.spend(record.name),
        )
        key.created_at.FromNanoseconds(int(record.created_at * 1e9))
        if record.revoked_at is not None:
            key.revoked_at.FromNanoseconds(int(record.revoked_at * 1e9))
        return key

    async def ListModels(
        self, request: gateway_pb2.GatewayListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayListModelsResponse:
        listing = await self._service.list_models()
        return gateway_pb2.GatewayListModelsResponse(
            models=listing.models, unreachable_hosts=listing.unreachable_hosts
        )

    async def ListHosts(
        self, request: gateway_pb2.ListHostsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListHostsResponse:
        pool = self._service.pool
        await pool.first_contact(FIRST_CONTACT_WAIT_S)
        return gateway_pb2.ListHostsResponse(hosts=[host_info_pb(h) for h in pool.hosts])

    async def SubmitBatch(
        self, request: gateway_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SubmitBatchResponse:
        items = await off_loop(batch_items, request)  # up to 50,000
        metadata = context.invocation_metadata()
        batch = await self._batches.submit(request.batch_id, items, metadata, self._key(context))
        return gateway_pb2.SubmitBatchResponse(batch=batch_pb(batch))

    async def GetBatch(
        self, request: gateway_pb2.GetBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetBatchResponse:
        return gateway_pb2.GetBatchResponse(
            batch=batch_pb(await self._batches.get(request.batch_id))
        )

    async def ListBatches(
        self, request: gateway_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListBatchesResponse:
        return gateway_pb2.ListBatchesResponse(
            batches=[batch_pb(b) for b in await self._batches.all()]
        )

    async def StreamBatchResults(
        self, request: gateway_pb2.StreamBatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.StreamBatchResultsResponse]:
        results = self._batches.results(request.batch_id, request.after_sequence)
        async for result, counts in results:
            yield gateway_pb2.StreamBatchResultsResponse(
                result=item_result_pb(result), counts=counts_pb(counts)
            )

    async def CancelBatch(
        self, request: gateway_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CancelBatchResponse:
        cancelled = await self._batches.cancel(request.batch_id)
        return gateway_pb2.CancelBatchResponse(batch=batch_pb(cancelled))


def key_limits_from_pb(limits: keys_pb2.KeyLimits) -> KeyLimits:
    def given(name: str) -> Any:
        return getattr(limits, name) if limits.HasField(name) else None

    return KeyLimits(
        models=tuple(limits.models),
        rpm=given("rpm"),
        tpm=given("tpm"),
        tokens_per_day=given("tokens_per_day"),
        cloud_budget_usd=given("cloud_budget_usd"),
        expires_at=limits.expires_at.ToNanoseconds() / 1e9
        if limits.HasField("expires_at")
        else None,
    )


def key_limits_pb(limits: KeyLimits) -> keys_pb2.KeyLimits:
    pb = keys_pb2.KeyLimits(
        models=limits.models,
        rpm=limits.rpm,
        tpm=limits.tpm,
        tokens_per_day=limits.tokens_per_day,
        cloud_budget_usd=limits.cloud_budget_usd,
    )
    if limits.expires_at is not None:
        pb.expires_at.FromNanoseconds(int(limits.expires_at * 1e9))
    return pb


def large_request(data: bytes) -> GenerateRequest:
    """A large Generate request in the gateway's terms, its prefix hashed for routing (in the
    heavy-work process)."""
    generate = request_from_pb(gateway_pb2.GatewayGenerateRequest.FromString(data))
    prefix = request_prefix(generate)
    return replace(generate, routing=replace(generate.routing, prefix=prefix))


def batch_items(request: gateway_pb2.SubmitBatchRequest) -> list[tuple[str, GenerateRequest]]:
    """A batch's items in the gateway's terms; InvalidArgument names the item."""
    items = []
    for i, item in enumerate(request.items):
        try:
            items.append((item.custom_id, request_from_pb(item.request)))
        except InvalidArgument as exc:
            raise InvalidArgument(f"items[{i}].request: {exc}") from None
    return items


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
