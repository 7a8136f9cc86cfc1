"""Prometheus metrics of the gateway, served at /metrics on its HTTP listener."""

import time
from collections import Counter as Tally
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from airouter.errors import AirouterError
from airouter.grpc_server import status_for
from airouter.labels import enum_label
from airouter.prometheus import request_histograms
from airouter.v1 import gateway_pb2, generate_pb2
from gateway.config import OPENROUTER_PREFIX
from gateway.hosts import HostPool, HostState
from gateway.openai_protocol import OpenAIUpstream
from gateway.relay import UPSTREAM_HOST, CloudRouting, relay_generate

PREFIX = "airouter_gateway"


class GatewayMetrics:
    """Per-request figures and the hosts' states, in one registry."""

    def __init__(self, pool: HostPool, upstream: OpenAIUpstream) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Generate requests by model, serving host and outcome (a finish reason, or the "
            "status code of a request refused before its first token).",
            ["model", "host", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens",
            "Prompt and generated tokens.",
            ["model", "kind"],
            registry=self.registry,
        )
        self.ttft, self.latency = request_histograms(PREFIX, "gateway", self.registry)
        self.failovers = Counter(
            f"{PREFIX}_failovers",
            "Attempts that failed before the first token and moved to the next host.",
            ["host"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream (OpenRouter) calls that failed, by the status code they became.",
            ["code"],
            registry=self.registry,
        )
        self.registry.register(_Live(pool, upstream))

    def watch_batches(
        self, item_states: Callable[[], Tally[str]], retries: Callable[[], int]
    ) -> None:
        """Batch items by state and retried attempts, read at each scrape."""
        self.registry.register(_BatchItems(item_states, retries))

    def relayed(
        self,
        pool: HostPool,
        request: gateway_pb2.GatewayGenerateRequest,
        time_left_s: float | None,
        cloud: CloudRouting | None,
    ) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
        """relay_generate, counted."""
        relayed = relay_generate(pool, request, time_left_s, cloud, on_failover=self._failed_over)
        return self._measure(request.model, relayed)

    def _failed_over(self, host: str) -> None:
        self.failovers.labels(host).inc()

    async def _measure(
        self, model: str, stream: AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]
    ) -> AsyncGenerator[gateway_pb2.GatewayGenerateResponse, None]:
        started = time.perf_counter()
        first = True
        try:
            async with aclosing(stream):  # a client leaving cancels the host call at once
                async for response in stream:
                    if first and response.HasField("token"):
                        self.ttft.labels(model).observe(time.perf_counter() - started)
                        first = False
                    if response.HasField("finished"):
                        self._finished(model, response.finished, started)
                    yield response
        except AirouterError as exc:
            code = status_for(exc).name.lower()
            self.requests.labels(model, "", code).inc()
            if model.startswith(OPENROUTER_PREFIX):
                self.upstream_errors.labels(code).inc()
            raise

    def _finished(self, model: str, f: generate_pb2.Finished, started: float) -> None:
        outcome = enum_label(generate_pb2.FinishReason, f.reason)
        self.requests.labels(model, f.host, outcome).inc()
        self.tokens.labels(model, "prompt").inc(f.usage.prompt_tokens)
        self.tokens.labels(model, "completion").inc(f.usage.completion_tokens)
        self.latency.labels(model).observe(time.perf_counter() - started)
        if f.host == UPSTREAM_HOST and f.reason == generate_pb2.FINISH_REASON_ERROR:
            self.upstream_errors.labels("mid_stream").inc()


class _Live(Collector):
    """Figures read at scrape time: hosts by state, upstream retries."""

    def __init__(self, pool: HostPool, upstream: OpenAIUpstream) -> None:
        self._pool = pool
        self._upstream = upstream

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_retries",
            "Upstream (OpenRouter) calls retried before their first token.",
            value=self._upstream.retries,
        )
        hosts = GaugeMetricFamily(f"{PREFIX}_hosts", "Known hosts by state.", labels=["state"])
        states = [h.state for h in list(self._pool.hosts)]
        for state in HostState:
            hosts.add_metric([state.value], states.count(state))
        yield hosts


class _BatchItems(Collector):
    def __init__(self, item_states: Callable[[], Tally[str]], retries: Callable[[], int]) -> None:
        self._item_states = item_states
        self._retries = retries

    def collect(self) -> Iterator[Metric]:
        items = GaugeMetricFamily(
            f"{PREFIX}_batch_items", "Items of the stored batches by state.", labels=["state"]
        )
        for state, count in self._item_states().items():
            items.add_metric([state], count)
        yield items
        yield CounterMetricFamily(
            f"{PREFIX}_batch_item_retries",
            "Batch item attempts that failed and were tried again.",
            value=self._retries(),
        )
