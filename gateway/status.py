"""The cluster's state for people and scripts: what `GET /status.json` answers and the page at
`/` draws. Hosts (up, down, cooling down and why; device, memory, GPUs) and their models,
throughput and time to first token over the last minutes, prefix-cache reuse, cloud requests
and spend, batches, and each API key's use today. Nothing secret is in it: keys by name.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from airouter import installed_version
from airouter.labels import enum_label
from airouter.v1 import generate_pb2, host_status_pb2
from gateway.batches import BatchRunner
from gateway.database import Database, StoreUnavailable
from gateway.hosts import Host
from gateway.keys import KeyRing, utc_day
from gateway.metrics import GatewayMetrics
from gateway.service import GatewayService

# The charts' span and resolution.
HISTORY_S = 15 * 60
SAMPLE_S = 5.0
# Batches shown: the running ones and the latest others.
SHOWN_BATCHES = 20


class StatusBoard:
    def __init__(
        self,
        service: GatewayService,
        metrics: GatewayMetrics,
        batches: BatchRunner | None,
        keys: KeyRing | None,
        store: Database | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._service = service
        self._metrics = metrics
        self._batches = batches
        self._keys = keys
        self._clock = clock
        self._started = clock()
        self._history: deque[dict[str, float]] = deque(maxlen=int(HISTORY_S / SAMPLE_S))
        self._last: tuple[float, float] | None = None  # (when, completion tokens so far)

    async def run(self) -> None:
        """Samples the history every SAMPLE_S until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def sample(self) -> None:
        now = self._clock()
        tokens = _total(self._metrics.tokens, kind="completion")
        if self._last is not None and now > self._last[0]:
            rate = (tokens - self._last[1]) / (now - self._last[0])
            self._history.append({"t": now, "tokens_per_second": rate, "ttft_ms": self._ttft()})
        self._last = (now, tokens)

    def _ttft(self) -> float:
        """The hosts' recent median time to first token, the slowest model's (0: none)."""
        recent = [
            m.recent_time_to_first_token_ms
            for h in self._service.pool.hosts
            if h.status is not None
            for m in h.status.models
            if m.recent_time_to_first_token_ms > 0
        ]
        return max(recent, default=0.0)

    async def snapshot(self) -> dict[str, Any]:
        metrics = self._metrics
        try:
            usage, batches = await self._key_usage(), await self._batch_list()
        except StoreUnavailable:
            usage, batches = [], []  # the page says the store is unreachable
        return {
            "store": self._store.state() if self._store is not None else None,
            "gateway": {
                "version": installed_version(),
                "uptime_s": round(self._clock() - self._started, 1),
                "draining": self._service.draining,
                "requests_in_flight": self._service.in_flight,
            },
            "hosts": [_host(h) for h in self._service.pool.hosts],
            "history": {"interval_s": SAMPLE_S, "points": list(self._history)},
            "prefix_cache": {
                "reused_tokens": _total(metrics.prompt_tokens, kind="reused"),
                "computed_tokens": _total(metrics.prompt_tokens, kind="computed"),
            },
            "cloud": {
                "requests": _total(metrics.requests, host="openrouter"),
                "fallbacks": _total(metrics.cloud_fallbacks),
                "spend_usd": _total(metrics.cloud_cost),
            },
            "batches": batches,
            "keys": usage,
        }

    async def _batch_list(self) -> list[dict[str, Any]]:
        if self._batches is None:
            return []
        shown = sorted(await self._batches.all(), key=lambda b: b.created_at, reverse=True)
        running = [b for b in shown if b.finished_at is None]
        rest = [b for b in shown if b.finished_at is not None]
        out = []
        for batch in (running + rest)[:SHOWN_BATCHES]:
            c = batch.counts
            out.append(
                {
                    "id": batch.id,
                    "state": batch.state.name.lower(),
                    "total": c.total,
                    "succeeded": c.succeeded,
                    "failed": c.failed,
                    "cancelled": c.cancelled,
                    "running": c.running,
                    "pending": c.pending,
                    "created_at": batch.created_at,
                    "finished_at": batch.finished_at,
                }
            )
        return out

    async def _key_usage(self) -> list[dict[str, Any]]:
        """Each key's requests, tokens and cloud cost today (UTC), with its state."""
        if self._keys is None:
            return []
        keys = self._keys
        rows = await keys.store.usage(None, utc_day(self._clock()))
        today: dict[str, dict[str, Any]] = {}
        for record in keys.keys():
            today[record.name] = {
                "name": record.name,
                "state": "revoked" if record.revoked_at is not None else "active",
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cloud_cost_usd": 0.0,
                "cloud_spent_usd": keys.spend(record.name),
                "tokens_per_day": record.limits.tokens_per_day,
            }
        for row in rows:
            entry = today.get(row.name)
            if entry is None:
                continue
            entry["requests"] += row.requests
            entry["prompt_tokens"] += row.prompt_tokens
            entry["completion_tokens"] += row.completion_tokens
            entry["cloud_cost_usd"] += row.cloud_cost_usd
        return list(today.values())


def _host(host: Host) -> dict[str, Any]:
    status = host.status
    entry: dict[str, Any] = {
        "address": host.address,
        "state": host.state.value,
        "detail": host.detail,
        "requests_in_flight": sum(host.in_flight.values()),
        "device": "",
        "memory": None,
        "gpus": [],
        "models": [],
    }
    if status is None:
        return entry
    memory = status.memory
    entry["device"] = status.device
    entry["host_name"] = status.host_name
    entry["memory"] = {
        "total_bytes": memory.total_bytes,
        "used_bytes": memory.used_bytes,
        "budget_bytes": memory.budget_bytes,
        "models_bytes": memory.models_bytes,
    }
    entry["gpus"] = [_gpu(g) for g in status.gpus]
    entry["models"] = [_model(m) for m in status.models]
    return entry


def _gpu(gpu: host_status_pb2.GpuStatus) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "name": gpu.name,
        "memory_total_bytes": gpu.memory_total_bytes,
        "memory_used_bytes": gpu.memory_used_bytes,
        "utilization_percent": gpu.utilization_percent,
        "temperature_celsius": gpu.temperature_celsius,
        "power_watts": gpu.power_watts,
    }


def _model(model: host_status_pb2.ModelStatus) -> dict[str, Any]:
    return {
        "name": model.name,
        "state": enum_label(generate_pb2.ModelState, model.state),
        "detail": model.state_detail,
        "engine": model.engine,
        "footprint_bytes": model.footprint_bytes,
        "slots": model.slots,
        "slots_busy": model.slots_busy,
        "queue": model.queue_depth,
        "tokens_per_second": round(model.recent_tokens_per_second, 2),
        "ttft_ms": round(model.recent_time_to_first_token_ms, 1),
        "pinned": model.pinned,
    }


def _total(metric: Counter, **labels: str) -> float:
    """A counter's sum over the children whose labels match."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total
