"""airouter.v1.ModelHost over gRPC: wire messages in, GenerationService, wire messages out."""

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from airouter import tracing
from airouter.output import ToolCallDelta
from airouter.output_wire import (
    infill_from_pb,
    logprob_pb,
    output_from_pb,
    tool_call_pb,
    turn_from_pb,
)
from airouter.v1 import (
    embed_pb2,
    generate_pb2,
    host_status_pb2,
    model_host_pb2,
    model_host_pb2_grpc,
)
from modelhost.embedding import Embeddings, EmbeddingService, EmbedSpec
from modelhost.engines import engine_kind
from modelhost.generation import (
    Delta,
    Finish,
    FinishReason,
    GenerationSpec,
    Sampling,
)
from modelhost.residency import ModelState, Residency, ResidentModel
from modelhost.serving import GenerationService

_tracer = trace.get_tracer("airouter.modelhost")
FINISH_REASON_TO_PB = {
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: generate_pb2.FINISH_REASON_ERROR,
    FinishReason.TOOL_CALLS: generate_pb2.FINISH_REASON_TOOL_CALLS,
}
MODEL_STATE_TO_PB = {
    ModelState.NOT_LOADED: generate_pb2.MODEL_STATE_NOT_LOADED,
    ModelState.LOADING: generate_pb2.MODEL_STATE_LOADING,
    ModelState.READY: generate_pb2.MODEL_STATE_READY,
    ModelState.UNLOADING: generate_pb2.MODEL_STATE_UNLOADING,
    ModelState.ERROR: generate_pb2.MODEL_STATE_ERROR,
}

# The shortest WatchStatus interval a client may ask for.
MIN_WATCH_INTERVAL_MS = 100


def _request_attributes(request: model_host_pb2.GenerateRequest) -> dict[str, object]:
    return tracing.request_attributes(
        chat=request.HasField("chat"),
        model=request.model,
        max_tokens=request.stopping.max_tokens if request.stopping.HasField("max_tokens") else None,
        temperature=(
            request.sampling.temperature if request.sampling.HasField("temperature") else None
        ),
        request_id=request.request_id,
    )


class ModelHostServicer(model_host_pb2_grpc.ModelHostServicer):
    """Translates ModelHost RPCs; all model work happens in GenerationService and the engine."""

    def __init__(self, service: GenerationService, embeddings: EmbeddingService) -> None:
        self._service = service
        self._embeddings = embeddings

    async def Generate(
        self, request: model_host_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_host_pb2.GenerateResponse]:
        metadata = context.invocation_metadata()
        name = f"generate {request.model}"
        attributes = functools.partial(_request_attributes, request)
        with tracing.request_span(_tracer, name, attributes, metadata) as span:
            spec = spec_from_pb(request)
            events = self._service.generate(spec, context.time_remaining())
            async with aclosing(events):
                async for event in events:
                    message = event_to_pb(event)
                    if isinstance(event, Finish):
                        span.set_attributes(
                            tracing.finish_attributes(
                                model=event.model,
                                input_tokens=event.prompt_tokens,
                                output_tokens=event.completion_tokens,
                                reason=event.reason.value,
                            )
                        )
                        _record_phases(event)
                    yield message

    async def CountTokens(
        self, request: model_host_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.CountTokensResponse:
        spec = spec_from_pb(request.request)
        tokens, model = await self._service.count_tokens(spec, context.time_remaining())
        return model_host_pb2.CountTokensResponse(input_tokens=tokens, model=model)

    async def Embed(
        self, request: embed_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embed_pb2.EmbedResponse:
        metadata = context.invocation_metadata()
        attributes = functools.partial(
            tracing.embed_attributes,
            model=request.model,
            inputs=len(request.inputs),
            request_id=request.request_id,
        )
        name = f"embeddings {request.model}"
        with tracing.request_span(_tracer, name, attributes, metadata) as span:
            spec = embed_spec_from_pb(request)
            result = await self._embeddings.embed(spec, context.time_remaining())
            span.set_attributes(
                tracing.embedded_attributes(model=result.model, input_tokens=result.prompt_tokens)
            )
            return embed_response_pb(result)

    async def ListModels(
        self, request: model_host_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.ListModelsResponse:
        return model_host_pb2.ListModelsResponse(
            models=[model_info_pb(m) for m in self._service.models()]
        )

    async def LoadModel(
        self, request: model_host_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.LoadModelResponse:
        residency = self._service.residency
        resident = residency.resolve(request.model)
        await residency.load(resident, context.time_remaining())
        return model_host_pb2.LoadModelResponse(model=model_status_pb(resident))

    async def UnloadModel(
        self, request: model_host_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.UnloadModelResponse:
        residency = self._service.residency
        resident = residency.resolve(request.model)
        await residency.unload(resident)
        return model_host_pb2.UnloadModelResponse(model=model_status_pb(resident))

    async def GetStatus(
        self, request: model_host_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> model_host_pb2.GetStatusResponse:
        return model_host_pb2.GetStatusResponse(status=host_status_pb(self._service.residency))

    async def WatchStatus(
        self, request: model_host_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_host_pb2.WatchStatusResponse]:
        residency = self._service.residency
        # At most 10 updates a second, whatever a client asks for.
        interval_s = max(request.interval_ms or 1000, MIN_WATCH_INTERVAL_MS) / 1000
        while True:
            changed = residency.next_change()
            yield model_host_pb2.WatchStatusResponse(status=host_status_pb(residency))
            if residency.draining:
                return  # the last update says so; the watcher goes elsewhere
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), interval_s)


def _record_phases(finish: Finish) -> None:
    """Queue, prefill and decode as child spans of the request's span, and the first token
    as an event on it, placed from the engine's own timings (they end now)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    t = finish.timings
    end = time.time_ns()
    start = end - int(t.total_ms * 1e6)
    edges = [0.0, t.queue_ms, t.queue_ms + t.prefill_ms, t.queue_ms + t.prefill_ms + t.decode_ms]
    for name, begin_ms, end_ms in zip(
        ("queue", "prefill", "decode"), edges, edges[1:], strict=False
    ):
        phase = _tracer.start_span(name, start_time=start + int(begin_ms * 1e6))
        phase.end(end_time=start + int(end_ms * 1e6))
    if finish.completion_tokens:
        first = start + int(t.time_to_first_token_ms * 1e6)
        span.add_event("first_token", timestamp=first)
    span.set_attributes(
        {
            "airouter.queue_ms": t.queue_ms,
            "airouter.prefill_ms": t.prefill_ms,
            "airouter.decode_ms": t.decode_ms,
            "airouter.time_to_first_token_ms": t.time_to_first_token_ms,
            "airouter.cached_prompt_tokens": finish.cached_prompt_tokens,
            "airouter.engine": finish.engine,
        }
    )


def spec_from_pb(request: model_host_pb2.GenerateRequest) -> GenerationSpec:
    s = request.sampling
    defaults = Sampling()
    sampling = Sampling(
        temperature=s.temperature if s.HasField("temperature") else defaults.temperature,
        top_p=s.top_p if s.HasField("top_p") else defaults.top_p,
        top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
        min_p=s.min_p if s.HasField("min_p") else defaults.min_p,
        repetition_penalty=(
            s.repetition_penalty
            if s.HasField("repetition_penalty")
            else defaults.repetition_penalty
        ),
        seed=s.seed if s.HasField("seed") else None,
    )
    stopping = request.stopping
    return GenerationSpec(
        request_id=request.request_id,
        model=request.model,
        prompt=request.prompt if request.HasField("prompt") else None,
        messages=(
            [turn_from_pb(m) for m in request.chat.messages] if request.HasField("chat") else None
        ),
        infill=infill_from_pb(request.infill) if request.HasField("infill") else None,
        sampling=sampling,
        max_tokens=stopping.max_tokens if stopping.HasField("max_tokens") else None,
        stop=list(stopping.stop),
        ignore_eos=stopping.ignore_eos,
        output=output_from_pb(request.output),
    )


def embed_spec_from_pb(request: embed_pb2.EmbedRequest) -> EmbedSpec:
    inputs: list[str | list[int]] = [
        list(item.tokens.ids) if item.HasField("tokens") else item.text for item in request.inputs
    ]
    return EmbedSpec(
        model=request.model,
        inputs=inputs,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        request_id=request.request_id,
    )


def embed_response_pb(result: Embeddings) -> embed_pb2.EmbedResponse:
    # Python floats, not the numpy row: protobuf took each element as a numpy scalar (7x
    # slower: 1.5 ms of a one-text request on this CPU).
    return embed_pb2.EmbedResponse(
        embeddings=[embed_pb2.Embedding(values=vector.tolist()) for vector in result.vectors],
        prompt_tokens=result.prompt_tokens,
        model=result.model,
    )


def event_to_pb(event: Delta | ToolCallDelta | Finish) -> model_host_pb2.GenerateResponse:
    if isinstance(event, Delta):
        token = generate_pb2.TokenDelta(text=event.text, token_count=event.token_count)
        if event.choice:
            token.choice_index = event.choice
        if event.logprobs:
            token.logprobs.extend(logprob_pb(lp) for lp in event.logprobs)
        return model_host_pb2.GenerateResponse(token=token)
    if isinstance(event, ToolCallDelta):
        return model_host_pb2.GenerateResponse(tool_call=tool_call_pb(event))
    t = event.timings
    return model_host_pb2.GenerateResponse(
        finished=generate_pb2.Finished(
            reason=FINISH_REASON_TO_PB[event.reason],
            usage=generate_pb2.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                cached_prompt_tokens=event.cached_prompt_tokens,
            ),
            timings=generate_pb2.Timings(
                queue_ms=t.queue_ms,
                prefill_ms=t.prefill_ms,
                decode_ms=t.decode_ms,
                time_to_first_token_ms=t.time_to_first_token_ms,
                total_ms=t.total_ms,
            ),
            error_message=event.error,
            model=event.model,
            stop_sequence=event.stop_sequence,
            choices=[
                generate_pb2.ChoiceFinished(
                    index=i, reason=FINISH_REASON_TO_PB[reason], completion_tokens=tokens
                )
                for i, reason, tokens in event.choices
            ],
        )
    )


def model_info_pb(resident: ResidentModel) -> generate_pb2.ModelInfo:
    config = resident.config
    info = generate_pb2.ModelInfo(
        name=config.name,
        aliases=config.aliases,
        capabilities=config.capabilities,
        context_length=config.context_length,
        state=MODEL_STATE_TO_PB[resident.state],
        state_detail=resident.detail,
        slots=config.slots,
    )
    written = config.files_written_at()
    if written is not None:
        info.created_at.FromSeconds(int(written))
    return info


def host_status_pb(residency: Residency) -> host_status_pb2.HostStatus:
    """The host's status now, as GetStatus, WatchStatus and /metrics report it."""
    memory = residency.memory.read()
    stats = residency.stats
    observed_at = Timestamp()
    observed_at.GetCurrentTime()
    return host_status_pb2.HostStatus(
        host_name=socket.gethostname(),
        device=residency.device,
        memory=host_status_pb2.MemoryStatus(
            total_bytes=memory.total,
            used_bytes=memory.used,
            budget_bytes=residency.budget_bytes,
            models_bytes=residency.models_bytes(),
        ),
        models=[model_status_pb(m) for m in residency.models],
        cache=host_status_pb2.CacheStatistics(
            hits=stats.hits,
            misses=stats.misses,
            evictions=stats.evictions,
            loads=stats.loads,
            load_failures=stats.load_failures,
            load_seconds_total=stats.load_seconds,
        ),
        observed_at=observed_at,
        draining=residency.draining,
        gpus=[
            host_status_pb2.GpuStatus(
                index=g.index,
                name=g.name,
                memory_total_bytes=g.memory_total,
                memory_used_bytes=g.memory_used,
                utilization_percent=g.utilization_percent,
                temperature_celsius=g.temperature_celsius,
                power_watts=g.power_watts,
            )
            for g in residency.memory.gpus()
        ],
    )


def model_status_pb(resident: ResidentModel) -> host_status_pb2.ModelStatus:
    config = resident.config
    load = resident.engine.load() if resident.engine is not None else None
    status = host_status_pb2.ModelStatus(
        name=config.name,
        state=MODEL_STATE_TO_PB[resident.state],
        state_detail=resident.detail,
        footprint_bytes=resident.footprint_bytes,
        footprint_measured=bool(resident.measured_bytes),
        slots=config.slots,
        slots_busy=load.slots_busy if load else 0,
        queue_depth=load.queued if load else 0,
        requests_in_flight=resident.in_use,
        recent_tokens_per_second=resident.recent_tokens_per_second(),
        recent_time_to_first_token_ms=resident.recent_ttft_ms(),
        pinned=config.pinned,
        keep_alive_seconds=config.keep_alive,
        load_seconds=resident.load_seconds,
        tokens_generated=resident.tokens_generated,
        cached_prefixes=[
            host_status_pb2.CachedPrefix(hash=h, tokens=t)
            for h, t in (load.cached_prefixes.items() if load else ())
        ],
        engine=engine_kind(config),
    )
    if resident.last_used:
        # last_used is monotonic; the wall-clock time is now less its age.
        status.last_used.FromNanoseconds(
            time.time_ns() - int((time.monotonic() - resident.last_used) * 1e9)
        )
    return status
