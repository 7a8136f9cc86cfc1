"""OpenTelemetry tracing for both services, configured by the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or the servers' `--otlp-endpoint`), unless
`OTEL_SDK_DISABLED=true`. Spans then go over OTLP/gRPC in batches; the service name comes from
`OTEL_SERVICE_NAME` (default: the server's name) and the sampler from `OTEL_TRACES_SAMPLER`.
Off, the request path opens no spans at all (`span`, `request_span`), unless a caller's trace
context passes through, which the API's no-op spans carry on to the hosts.

W3C trace context crosses gRPC in the call metadata (`traceparent`, `tracestate`), so one trace
holds the gateway's request, its routing and attempts, and the host's handling.
"""

import argparse
import logging
import os
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace


class _FinalizerDetach(logging.Filter):
    """Drops OpenTelemetry's "Failed to detach context" when the token belongs to another
    task's context. grpc.aio does not close a streaming handler whose client cancelled: it
    drops the generator, and the event loop closes it later in a task of its own, where the
    request span (already ended by then) cannot reset the context it set. Harmless, and not
    ours to close sooner; our own nested generators are closed by their consumers."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage() == "Failed to detach context"
            and isinstance(error, ValueError)
            and "was created in a different Context" in str(error)
        )


logging.getLogger("opentelemetry.context").addFilter(_FinalizerDetach())

GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE = "gen_ai.request.temperature"


# Set once configure_tracing installed the SDK: spans are recorded and exported.
_on = False
# What `span` and `request_span` return while tracing is off: the API's no-op spans still cost
# about 5 us each (context attach and detach), several per request.
_NO_SPAN = nullcontext(trace.INVALID_SPAN)


def span(tracer: trace.Tracer, name: str, **kwargs: Any) -> AbstractContextManager[trace.Span]:
    """tracer.start_as_current_span(name, **kwargs); nothing while tracing is off and no
    caller's trace context is current."""
    if _on or trace.get_current_span().get_span_context().is_valid:
        return tracer.start_as_current_span(name, **kwargs)
    return _NO_SPAN


def configure_tracing(service_name: str, otlp_endpoint: str | None = None) -> Any:
    """Installs the SDK tracer provider with an OTLP/gRPC exporter when tracing is on; returns
    the provider (call its shutdown() to flush at exit) or None when tracing is off."""
    if otlp_endpoint:
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = otlp_endpoint
    configured = any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not configured or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    # Imported only when on: the SDK and the exporter are heavy and off must cost nothing.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global _on
    _on = True
    return provider


def add_tracing_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-endpoint",
        help="OTLP/gRPC endpoint for traces, e.g. http://localhost:4317 "
        "(default $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no tracing)",
    )


@contextmanager
def tracing_for(service_name: str, otlp_endpoint: str | None) -> Iterator[None]:
    """Tracing for the life of a server process; the spans still buffered are sent at the
    end."""
    provider = configure_tracing(service_name, otlp_endpoint)
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


def inject_metadata(metadata: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the current trace context, after `metadata`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items())


def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The trace context a caller sent in its call metadata (empty when it sent none)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def add_trace_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: trace_id and span_id of the current span on every line inside a
    traced request."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        trace_id, span_id = hex_ids(span_context)
        event.setdefault("trace_id", trace_id)
        event.setdefault("span_id", span_id)
    return event


def hex_ids(span_context: trace.SpanContext) -> tuple[str, str]:
    """The trace and span id as W3C writes them (32 and 16 hex digits)."""
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def request_span(
    tracer: trace.Tracer,
    name: str,
    attributes: Callable[[], dict[str, Any]],
    carrier: Iterable[tuple[str, Any]] | None,
) -> Any:
    """The server span of a generate request, continuing the caller's trace context from
    `carrier` (gRPC metadata or HTTP headers), with its GenAI request attributes (asked for
    only when a span is made)."""
    if not _on and not any(key.lower() == "traceparent" for key, _ in carrier or ()):
        return _NO_SPAN
    return tracer.start_as_current_span(
        name,
        kind=trace.SpanKind.SERVER,
        context=extract_context(carrier),
        attributes=attributes(),
    )


def request_attributes(
    *,
    chat: bool,
    model: str,
    max_tokens: int | None,
    temperature: float | None,
    request_id: str,
) -> dict[str, Any]:
    """GenAI attributes of a generate request."""
    attributes: dict[str, Any] = {
        GEN_AI_OPERATION: "chat" if chat else "text_completion",
        GEN_AI_REQUEST_MODEL: model,
    }
    if max_tokens is not None:
        attributes[GEN_AI_MAX_TOKENS] = max_tokens
    if temperature is not None:
        attributes[GEN_AI_TEMPERATURE] = temperature
    if request_id:  # the id in the logs and in the HTTP edge's x-request-id
        attributes["airouter.request_id"] = request_id
    return attributes


def embed_attributes(*, model: str, inputs: int, request_id: str = "") -> dict[str, Any]:
    """GenAI attributes of an embeddings request."""
    attributes: dict[str, Any] = {
        GEN_AI_OPERATION: "embeddings",
        GEN_AI_REQUEST_MODEL: model,
        "airouter.inputs": inputs,
    }
    if request_id:
        attributes["airouter.request_id"] = request_id
    return attributes


def embedded_attributes(*, model: str, input_tokens: int, host: str = "") -> dict[str, Any]:
    """GenAI attributes of embeddings made."""
    attributes: dict[str, Any] = {GEN_AI_RESPONSE_MODEL: model, GEN_AI_INPUT_TOKENS: input_tokens}
    if host:
        attributes["airouter.host"] = host
    return attributes


def finish_attributes(
    *, model: str, input_tokens: int, output_tokens: int, reason: str, host: str = ""
) -> dict[str, Any]:
    """GenAI attributes of a stream's end; reason as the protocol names it ("stop", ...)."""
    attributes: dict[str, Any] = {
        GEN_AI_RESPONSE_MODEL: model,
        GEN_AI_INPUT_TOKENS: input_tokens,
        GEN_AI_OUTPUT_TOKENS: output_tokens,
        GEN_AI_FINISH_REASONS: [reason],
    }
    if host:
        attributes["airouter.host"] = host
    return attributes
