"""Prometheus metrics of the gateway, served at /metrics on its HTTP listener."""

import functools
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from airouter.errors import AirouterError
from airouter.prometheus import request_histograms
from gateway.config import OPENROUTER_PREFIX
from gateway.generation import Finished, FinishReason, Usage
from gateway.hosts import HostPool
from gateway.standing import HostState
from gateway.upstream import UPSTREAM_HOST, OpenAIUpstream

PREFIX = "airouter_gateway"


class GatewayMetrics:
    """Per-request figures and the hosts' states, in one registry. It observes the request
    path (gateway.service's RequestObserver); model labels are names the gateway resolved,
    so a client cannot create series by inventing names."""

    def __init__(self, pool: HostPool, upstream: OpenAIUpstream) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Generate and Embed requests by model, serving host and outcome (a finish reason, "
            "'embedded', or the status code of a request refused before its first token).",
            ["model", "host", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens",
            "Prompt and generated tokens.",
            ["model", "kind"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens by serving host: reused (their KV cells were left by an earlier "
            "request, which prefix-aware routing aims for) or computed.",
            ["host", "kind"],
            registry=self.registry,
        )
        self.ttft, self.latency = request_histograms(PREFIX, "gateway", self.registry)
        self.failovers = Counter(
            f"{PREFIX}_failovers",
            "Attempts that failed before the first token and moved to the next host.",
            ["host"],
            registry=self.registry,
        )
        self.cloud_fallbacks = Counter(
            f"{PREFIX}_cloud_fallbacks",
            "Requests for a local model sent to its cloud model because no host could serve.",
            ["model"],
            registry=self.registry,
        )
        self.cloud_cost = Counter(
            f"{PREFIX}_cloud_cost_usd",
            "What cloud requests cost, as the upstream reported it.",
            ["model"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream (OpenRouter) calls that failed, by the status code they became.",
            ["code"],
            registry=self.registry,
        )
        # Per API key: its name, never its secret; keys are the operator's, so few.
        self.key_requests = Counter(
            f"{PREFIX}_key_requests",
            "Requests let in under each API key, by model.",
            ["key", "model"],
            registry=self.registry,
        )
        self.key_tokens = Counter(
            f"{PREFIX}_key_tokens",
            "Prompt and completion tokens of each API key.",
            ["key", "kind"],
            registry=self.registry,
        )
        self.key_cost = Counter(
            f"{PREFIX}_key_cloud_cost_usd",
            "What each API key's cloud requests cost, as the upstream reported it.",
            ["key"],
            registry=self.registry,
        )
        self.registry.register(_Live(pool, upstream))
        # A metric's child for its label values, looked up once: prometheus_client's labels()
        # validates and locks on every call, and a request records seven. The values are
        # bounded (resolved model names, hosts, outcomes).
        self._child = functools.cache(lambda metric, *values: metric.labels(*values))

    def watch_batches(
        self, item_states: Callable[[], Tally[str]], retries: Callable[[], int]
    ) -> None:
        """Batch items by state and retried attempts, read at each scrape."""
        self.registry.register(_BatchItems(item_states, retries))

    # --- RequestObserver (gateway.service) ---------------------------------------------

    def first_token(self, model: str, seconds: float) -> None:
        self._child(self.ttft, model).observe(seconds)

    def finished(self, model: str, f: Finished, seconds: float) -> None:
        child = self._child
        outcome = f.reason.value
        child(self.requests, model, f.host, outcome).inc()
        child(self.tokens, model, "prompt").inc(f.usage.prompt_tokens)
        child(self.tokens, model, "completion").inc(f.usage.completion_tokens)
        reused = min(f.usage.cached_prompt_tokens, f.usage.prompt_tokens)
        child(self.prompt_tokens, f.host, "reused").inc(reused)
        child(self.prompt_tokens, f.host, "computed").inc(f.usage.prompt_tokens - reused)
        child(self.latency, model).observe(seconds)
        if f.usage.cost_usd:
            child(self.cloud_cost, model).inc(f.usage.cost_usd)
        if f.host == UPSTREAM_HOST and f.reason is FinishReason.ERROR:
            self.upstream_errors.labels("mid_stream").inc()

    def embedded(self, model: str, host: str, prompt_tokens: int, seconds: float) -> None:
        child = self._child
        child(self.requests, model, host, "embedded").inc()
        child(self.tokens, model, "prompt").inc(prompt_tokens)
        child(self.latency, model).observe(seconds)

    def key_used(self, key: str, model: str, usage: Usage) -> None:
        child = self._child
        child(self.key_requests, key, model).inc()
        child(self.key_tokens, key, "prompt").inc(usage.prompt_tokens)
        child(self.key_tokens, key, "completion").inc(usage.completion_tokens)
        if usage.cost_usd:
            child(self.key_cost, key).inc(usage.cost_usd)

    def refused(self, model: str, error: AirouterError) -> None:
        code = error.code.lower()
        self.requests.labels(model, "", code).inc()
        if model.startswith(OPENROUTER_PREFIX):
            self.upstream_errors.labels(code).inc()

    def cloud_fallback(self, model: str) -> None:
        self._child(self.cloud_fallbacks, model).inc()

    def failed_over(self, host: str) -> None:
        self.failovers.labels(host).inc()


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
