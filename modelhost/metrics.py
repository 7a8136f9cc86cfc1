"""Prometheus /metrics for the modelhost (`--metrics-listen`): the figures of WatchStatus.

Every scrape takes one status snapshot on the event loop (the only place that reads the
residency state safely) and turns it into metric families, so /metrics and GetStatus can never
disagree.
"""

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from airouter.errors import AirouterError
from airouter.labels import enum_label
from airouter.prometheus import request_histograms
from airouter.v1 import generate_pb2, host_status_pb2
from modelhost.generation import Finish

PREFIX = "airouter_modelhost"
_STATES = {
    value: enum_label(generate_pb2.ModelState, value)
    for value in generate_pb2.ModelState.values()
    if value != generate_pb2.MODEL_STATE_UNSPECIFIED
}


class RequestMetrics:
    """Per-request figures that accumulate (counters, histograms), kept whether or not
    /metrics is served: recording one is a few dictionary updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Generate and Embed requests by model and outcome (a finish reason, 'embedded', or "
            "the status code of a request refused before its first token).",
            ["model", "outcome"],
            registry=registry,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens", "Prompt and generated tokens.", ["model", "kind"], registry=registry
        )
        self.embedded_inputs = Counter(
            f"{PREFIX}_embedded_inputs", "Texts embedded.", ["model"], registry=registry
        )
        self.ttft, self.latency = request_histograms(PREFIX, "host", registry)

    def finished(self, finish: Finish) -> None:
        model = finish.model
        self.requests.labels(model, finish.reason.value).inc()
        self.tokens.labels(model, "prompt").inc(finish.prompt_tokens)
        self.tokens.labels(model, "completion").inc(finish.completion_tokens)
        if finish.completion_tokens:
            self.ttft.labels(model).observe(finish.timings.time_to_first_token_ms / 1000)
        self.latency.labels(model).observe(finish.timings.total_ms / 1000)

    def embedded(self, model: str, inputs: int, prompt_tokens: int) -> None:
        self.requests.labels(model, "embedded").inc()
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.embedded_inputs.labels(model).inc(inputs)

    def refused(self, model: str, error: AirouterError) -> None:
        self.requests.labels(model, error.code.lower()).inc()


class HostCollector(Collector):
    def __init__(self, snapshot: Callable[[], host_status_pb2.HostStatus]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        memory = status.memory
        gauges_of_host: list[tuple[str, float, str]] = [
            ("memory_total_bytes", memory.total_bytes, "Memory of the device holding the models."),
            ("memory_used_bytes", memory.used_bytes, "Memory used on the device, all processes."),
            ("memory_budget_bytes", memory.budget_bytes, "Memory the models may use together."),
            ("memory_models_bytes", memory.models_bytes, "Memory the models take now."),
        ]
        for name, value, text in gauges_of_host:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)

        cache = status.cache
        counters: list[tuple[str, float, str]] = [
            ("cache_hits", cache.hits, "Requests that found their model loaded."),
            ("cache_misses", cache.misses, "Requests that waited for a model load."),
            ("evictions", cache.evictions, "Models unloaded to make room for another."),
            ("loads", cache.loads, "Model loads that succeeded."),
            ("load_failures", cache.load_failures, "Model loads that failed."),
            ("load_seconds", cache.load_seconds_total, "Seconds spent in successful loads."),
        ]
        for name, value, text in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)

        state = GaugeMetricFamily(
            f"{PREFIX}_model_state", "1 for the state each model is in.", labels=["model", "state"]
        )
        per_model = {
            "footprint_bytes": ("Memory the model takes or will take.", "footprint_bytes"),
            "slots": ("Requests the model decodes at once.", "slots"),
            "slots_busy": ("Slots decoding now.", "slots_busy"),
            "queue_depth": ("Requests waiting for a slot.", "queue_depth"),
            "requests_in_flight": ("Requests using the model.", "requests_in_flight"),
            "recent_tokens_per_second": (
                "Tokens generated per second lately.",
                "recent_tokens_per_second",
            ),
            "recent_time_to_first_token_seconds": (
                "Median time to first token of recent requests.",
                "recent_time_to_first_token_ms",
            ),
        }
        gauges = {
            name: GaugeMetricFamily(f"{PREFIX}_model_{name}", text, labels=["model"])
            for name, (text, _) in per_model.items()
        }
        tokens = CounterMetricFamily(
            f"{PREFIX}_model_tokens_generated", "Tokens generated.", labels=["model"]
        )
        engines = GaugeMetricFamily(
            f"{PREFIX}_model_engine",
            "1 for the engine that runs each model.",
            labels=["model", "engine"],
        )
        for model in status.models:
            engines.add_metric([model.name, model.engine], 1.0)
            for value, label in _STATES.items():
                state.add_metric([model.name, label], 1.0 if model.state == value else 0.0)
            for name, (_, field) in per_model.items():
                value = getattr(model, field)
                if field.endswith("_ms"):
                    value /= 1000
                gauges[name].add_metric([model.name], value)
            tokens.add_metric([model.name], model.tokens_generated)
        yield state
        yield engines
        yield from gauges.values()
        yield tokens
        yield from _gpu_gauges(status)


# Per-GPU gauges from NVML: (name, help, the GpuStatus field, scale).
_GPU_GAUGES = [
    ("memory_total_bytes", "The GPU's memory.", "memory_total_bytes", 1.0),
    ("memory_used_bytes", "The GPU's memory in use, all processes.", "memory_used_bytes", 1.0),
    (
        "utilization_ratio",
        "How busy the GPU's cores were lately, 0-1.",
        "utilization_percent",
        0.01,
    ),
    ("temperature_celsius", "The GPU's core temperature.", "temperature_celsius", 1.0),
    ("power_watts", "The power the GPU draws.", "power_watts", 1.0),
]


def _gpu_gauges(status: host_status_pb2.HostStatus) -> Iterator[Metric]:
    for name, text, field, scale in _GPU_GAUGES:
        gauge = GaugeMetricFamily(f"{PREFIX}_gpu_{name}", text, labels=["gpu", "name"])
        for gpu in status.gpus:
            gauge.add_metric([str(gpu.index), gpu.name], getattr(gpu, field) * scale)
        yield gauge


@dataclass
class MetricsServer:
    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(
    listen: str,
    loop: asyncio.AbstractEventLoop,
    snapshot: Callable[[], host_status_pb2.HostStatus],
    registry: CollectorRegistry,
) -> MetricsServer:
    """Serves /metrics on listen (HOST:PORT, port 0 for any free one) from its own thread:
    the registry's request metrics and the status snapshot's figures."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise OSError(f"--metrics-listen {listen!r}: use HOST:PORT, such as 127.0.0.1:9464")

    def on_loop() -> host_status_pb2.HostStatus:
        async def take() -> host_status_pb2.HostStatus:
            return snapshot()

        return asyncio.run_coroutine_threadsafe(take(), loop).result(timeout=10)

    registry.register(HostCollector(on_loop))
    server, _thread = start_http_server(int(port), host.strip("[]"), registry=registry)
    return MetricsServer(server, server.server_port)
