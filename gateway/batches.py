"""Batches: stored before they are acknowledged, then run across the hosts in the background,
by every gateway on the store at once.

Items are pulled as slots free up: an item of a model is claimed while the hosts where that
model is resident have more slots than this gateway keeps busy there, so every host takes work
in proportion to its slots, interactive requests keep their share, and a model that is
resident nowhere gets one item (which loads it) before the rest follow. A claim is a lease in
the store (gateway.batch_store), renewed while the item runs: a gateway that dies stops
renewing, and another takes its items over when their leases lapse. A failed attempt is
retried with jittered exponential backoff; an item whose model is unknown or whose request is
invalid fails at once. A result is stored before anyone sees it, once, by the gateway holding
the item, so a gateway killed mid-batch loses no result and repeats none.

Each attempt is a trace of its own whose root span links to the batch's span: a batch of
thousands of items stays readable in Jaeger.
"""

import asyncio
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from airouter import tracing
from airouter.errors import (
    AirouterError,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    shown,
)
from airouter.output import PLAIN
from airouter.v1 import generate_pb2
from gateway import router
from gateway.batch_records import BatchInfo, BatchState, Counts, ItemResult, ItemState
from gateway.batch_store import BatchStore, ClaimedItem, StoredBatch
from gateway.config import OPENROUTER_PREFIX
from gateway.database import StoreUnavailable
from gateway.generation import (
    Finished,
    FinishReason,
    GenerateRequest,
    Outputs,
    finish_attributes,
    request_attributes,
    validate,
)
from gateway.metrics import GatewayMetrics
from gateway.offload import off_loop
from gateway.service import GatewayService

_log = structlog.get_logger()
_tracer = trace.get_tracer("airouter.gateway")
T = TypeVar("T")

MAX_ITEMS = 50_000
BATCH_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Waiting before attempt n+1: first, cap (seconds), jittered +-50%.
RETRY_BACKOFF_S = (1.0, 60.0)
# Items of openrouter/ models in flight per batch model: the upstream's own limits apply.
CLOUD_CONCURRENCY = 8
# How often finished batches past their retention are looked for.
PRUNE_EVERY_S = 3600.0
# How often the dispatcher looks at the hosts again while items wait for a slot, and at the
# store when nothing waits (other gateways' news arrives sooner, as notifications).
DISPATCH_POLL_S = 0.5
IDLE_POLL_S = 5.0
# How often a result stream looks at the store when no notification came.
RESULTS_POLL_S = 1.0
# Failures another attempt may well get past; any other is the item's own.
_RETRYABLE = (Unavailable, ResourceExhausted, DeadlineExceeded, Internal)
# The largest sequence a BIGINT holds: an after_sequence beyond it is past the end.
_MAX_SEQUENCE = (1 << 63) - 1
_SUCCEEDED = ItemState.SUCCEEDED
_FAILED = ItemState.FAILED
_CANCELLED = ItemState.CANCELLED


@dataclass(eq=False)
class _Item:
    claimed: ClaimedItem
    task: asyncio.Task[None] | None = None
    # Why its task was cancelled: the batch was (a cancelled result is recorded), or the
    # gateway stops or lost the item's lease (nothing is recorded: it runs again elsewhere).
    stopped_by_cancel: bool = False
    recording: bool = False
    claimed_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int]:
        return self.claimed.batch_id, self.claimed.index

    @property
    def model(self) -> str:
        return self.claimed.request.model

    def result(self, error: AirouterError, state: ItemState = _FAILED) -> ItemResult:
        """The item's result record: failed (or `state`) with the error's code."""
        claimed = self.claimed
        return ItemResult(
            claimed.custom_id,
            claimed.index,
            state,
            claimed.attempts,
            claimed.request.chat,
            error_code=error.code,
            error_message=str(error),
        )


class BatchRunner:
    """The batches of the gateway's store, run through the same routing and relay as
    interactive requests, beside any other gateways on the same database."""

    def __init__(
        self,
        store: BatchStore,
        service: GatewayService,
        metrics: GatewayMetrics,
        max_attempts: int = 4,
        item_timeout_s: float = 600.0,
        retention_s: float = 7 * 86400.0,
        lease_s: float = 30.0,
    ) -> None:
        self._store = store
        self._service = service
        self._pool = service.pool
        self._cloud = service.cloud
        self._max_attempts = max_attempts
        self._item_timeout_s = item_timeout_s
        self._retention_s = retention_s
        self._lease_s = lease_s
        # Who holds a claimed item: unique to this process, whatever else runs on the machine.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running: dict[tuple[str, int], _Item] = {}
        self._running_by_model: Counter[str] = Counter()
        # A request of each model seen, standing for its items when the dispatcher weighs
        # where they could run (items of one model share their routing options as a rule).
        self._examples: dict[str, GenerateRequest] = {}
        self._batches_seen: dict[str, StoredBatch] = {}
        self._wake = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}  # per batch, for result streams
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        # Submits one at a time here: two with one batch_id must not both store it.
        self._submitting = asyncio.Lock()
        self._recording: set[asyncio.Task[Any]] = set()
        # Items by state as of the last look at the store, moved on at once for this
        # gateway's own results (a look that began before them is then discarded).
        self._totals: Counter[ItemState] = Counter()
        self._totals_version = 0
        self._store_down_logged = False
        self.retries = 0  # attempts that failed and were tried again
        metrics.watch_batches(self._item_states, lambda: self.retries)

    async def start(self) -> None:
        """Takes up the batches in progress in the store."""
        if self._store.db.dialect == "sqlite":
            # The file is this gateway's alone: what a killed run held is free now.
            await self._store.release_lapsed()
        self._store.db.on_notify(self._heard)
        active = [b for b in await self._store.batches() if b.active]
        if active:
            _log.info("batches_resumed", batches=len(active), store=self._store.db.described)
        await self._refresh_totals()
        self._tasks = [
            asyncio.create_task(self._dispatch()),
            asyncio.create_task(self._renew_forever()),
            asyncio.create_task(self._prune_forever()),
        ]

    def _heard(self, payload: str) -> None:
        """A change made by this gateway or another (empty: anything may have changed)."""
        kind, _, batch_id = payload.partition(":")
        if kind == "cancel":
            self._spawn(self._stop_batch_items(batch_id))
        if kind in ("result", "cancel"):
            self._announce(batch_id)
        else:
            self._wake.set()
            if not kind:
                for batch in list(self._changed):
                    self._announce(batch)

    def _announce(self, batch_id: str) -> None:
        event = self._changed.pop(batch_id, None)
        if event is not None:
            event.set()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    async def _prune_forever(self) -> None:
        """Deletes finished batches older than the retention period, now and every hour."""
        while True:
            try:
                await self.prune()
            except StoreUnavailable:
                pass  # the next round
            await asyncio.sleep(PRUNE_EVERY_S)

    async def prune(self) -> None:
        deleted = await self._store.delete_finished_before(time.time() - self._retention_s)
        if deleted:
            _log.info("batches_deleted", batches=len(deleted), retention_s=self._retention_s)
            await self._refresh_totals()

    def drain(self) -> None:
        """Shutdown begins: no item starts any more, and result streams end with UNAVAILABLE
        so their clients resume (after_sequence) with the next gateway instead of holding
        the shutdown's grace period."""
        self._draining = True
        if self._tasks:
            self._tasks[0].cancel()  # the dispatcher
        for batch_id in list(self._changed):
            self._announce(batch_id)

    async def stop_items(self) -> None:
        """Stops dispatching and the running items, and gives them back to the store: they
        run again on another gateway, or on this one at its next start."""
        for task in self._tasks:
            task.cancel()
        items = [i.task for i in self._running.values() if i.task]
        for item in self._running.values():
            if item.task and not item.recording:  # a result being recorded is let finish
                item.task.cancel()
        await asyncio.gather(*self._tasks, *items, *self._recording, return_exceptions=True)
        self._tasks = []
        try:
            released = await self._store.release_all(self.owner)
        except StoreUnavailable:
            return  # their leases lapse instead
        if released:
            _log.info("batch_items_released", items=released)

    async def close(self) -> None:
        """Stops the items and waits for the results being recorded (the store is the
        server's to close)."""
        await self.stop_items()

    async def submit(
        self,
        batch_id: str,
        items: list[tuple[str, GenerateRequest]],
        carrier: Any = None,
        api_key: str = "",
    ) -> BatchInfo:
        """Stores the batch of (custom_id, request) items (its span continues the caller's
        trace from `carrier`) and returns it once it is stored; an empty batch_id gets one.
        Its items run under `api_key` (a key's name), counting toward its limits."""
        batch_id = batch_id or f"batch_{uuid.uuid4().hex}"
        # Up to MAX_ITEMS items: checked on a worker thread, not the event loop.
        await off_loop(_validate, batch_id, items)
        self._service.check_key_models(api_key, {request.model for _, request in items})
        async with self._submitting:
            existing = await self._store.batch(batch_id)
            if existing is None:
                stored = await self._store_batch(batch_id, items, carrier, api_key)
                if stored is not None:
                    return stored.info()
            # The same submit again (perhaps to another gateway, at the same moment)?
            if not await self._store.same_items(batch_id, items):
                raise AlreadyExists(
                    f"batch {shown(batch_id)} exists with other items; choose another batch_id"
                )
            return await self.get(batch_id)

    async def _store_batch(
        self, batch_id: str, items: list[tuple[str, GenerateRequest]], carrier: Any, api_key: str
    ) -> StoredBatch | None:
        with _tracer.start_as_current_span(
            f"batch {batch_id}",
            context=tracing.extract_context(carrier),
            attributes={"airouter.batch.id": batch_id, "airouter.batch.items": len(items)},
        ) as span:
            context = span.get_span_context()
            trace_id, span_id = tracing.hex_ids(context) if context.is_valid else ("", "")
            stored = await self._store.add_batch(batch_id, items, trace_id, span_id, api_key)
        if stored is not None:
            _log.info("batch_submitted", batch_id=batch_id, items=len(items))
            self._totals_version += 1
            self._totals[ItemState.PENDING] += len(items)
        return stored

    async def get(self, batch_id: str) -> BatchInfo:
        return (await self._batch(batch_id)).info()

    async def all(self) -> list[BatchInfo]:
        return [b.info() for b in await self._store.batches()]

    async def cancel(self, batch_id: str) -> BatchInfo:
        stored = await self._store.cancel(batch_id)
        if stored is None:
            raise _no_batch(batch_id)
        if stored.state is BatchState.COMPLETED:
            raise FailedPrecondition(
                f"batch {shown(batch_id)} has already completed; nothing to cancel"
            )
        await self._stop_batch_items(batch_id)
        await self._refresh_totals()
        stored = await self._batch(batch_id)
        _log.info("batch_cancelled", batch_id=batch_id, **_counts_log(stored))
        return stored.info()

    async def _stop_batch_items(self, batch_id: str) -> None:
        """Stops this gateway's items of a cancelled batch; each records a cancelled result."""
        stopping = [i for i in self._running.values() if i.claimed.batch_id == batch_id and i.task]
        if stopping:
            _log.info("batch_items_stopping", batch_id=batch_id, items=len(stopping))
        for item in stopping:
            if not item.recording and not item.stopped_by_cancel:
                item.stopped_by_cancel = True
                assert item.task is not None
                item.task.cancel()
        await asyncio.gather(*(i.task for i in stopping if i.task), return_exceptions=True)

    async def results(
        self, batch_id: str, after_sequence: int
    ) -> AsyncIterator[tuple[ItemResult, Counts]]:
        """The batch's results after `after_sequence`, then each new one, until the last,
        whichever gateway records them: woken by the store's notifications, and polling
        every RESULTS_POLL_S in case one was missed."""
        stored = await self._batch(batch_id)
        after_sequence = min(after_sequence, _MAX_SEQUENCE)
        while True:
            if self._draining:
                raise Unavailable(
                    "the gateway is shutting down; ask again for the results after sequence "
                    f"{after_sequence} once it is back"
                )
            changed = self._changed.setdefault(batch_id, asyncio.Event())
            page = await self._store.results(batch_id, after_sequence, 256)
            if page:
                counts = (await self._batch(batch_id)).counts()
                for result in page:
                    after_sequence = result.sequence
                    yield result, counts
                continue
            stored = await self._batch(batch_id)
            if not stored.active and after_sequence >= stored.last_sequence:
                return
            try:
                await asyncio.wait_for(changed.wait(), RESULTS_POLL_S)
            except TimeoutError:
                pass

    async def result_page(self, batch_id: str, after_sequence: int, limit: int) -> list[ItemResult]:
        """The batch's results stored so far after `after_sequence`, at most `limit`."""
        await self._batch(batch_id)
        after = min(after_sequence, _MAX_SEQUENCE)
        return await self._store.results(batch_id, after, limit)

    async def _batch(self, batch_id: str) -> StoredBatch:
        stored = await self._store.batch(batch_id)
        if stored is None:
            raise _no_batch(batch_id)
        return stored

    # --- dispatching -----------------------------------------------------------------

    async def _dispatch(self) -> None:
        backoff = 0.0
        while True:
            self._wake.clear()
            try:
                timeout = await self._dispatch_once()
                backoff = 0.0
                self._store_down_logged = False
            except StoreUnavailable as exc:
                backoff = min(max(backoff * 2, 0.25), 5.0)
                timeout = backoff
                if not self._store_down_logged:
                    _log.warning("batches_waiting_for_store", error=str(exc))
                    self._store_down_logged = True
            except Exception as exc:  # a bug: logged, and the dispatcher goes on
                _log.error("batch_dispatch_failed", error=f"{type(exc).__name__}: {exc}")
                backoff = min(max(backoff * 2, 0.25), 5.0)
                timeout = backoff
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _dispatch_once(self) -> float | None:
        """Claims what may start now; returns the seconds until it should look again."""
        waiting = await self._store.waiting()
        await self._store.sweep_cancelling()
        held_back = False
        for model, count in waiting.models:
            try:
                room = min(self._room(model), count)
            except Exception as exc:  # one model's trouble must not stop every batch
                _log.error("batch_item_unplaceable", model=model, error=f"{type(exc).__name__}")
                error = Internal(f"the gateway could not dispatch this item: {exc!r}")
                claims = await self._store.claim(self.owner, model, 1, self._lease_s)
                self._count_claims(claims)
                for claimed in claims:
                    self._start(claimed, error)
                continue
            if room <= 0:
                held_back = True
                continue
            claims = await self._store.claim(self.owner, model, room, self._lease_s)
            self._count_claims(claims)
            for claimed in claims:
                self._start(claimed)
            for _ in claims:
                # Let the item reach its host, so the next decision counts it there.
                await asyncio.sleep(0)
            held_back = held_back or room < count
        timeout = DISPATCH_POLL_S if held_back else IDLE_POLL_S
        if waiting.next_due_at is not None:
            timeout = min(timeout, max(waiting.next_due_at - time.time(), 0.0) + 0.01)
        return timeout

    def _room(self, model: str) -> int:
        """How many more items of `model` may start now."""
        running = self._running_by_model[model]
        example = self._examples.get(model)
        cloud_only = example is not None and self._cloud.policy(example) == "cloud_only"
        if model.startswith(OPENROUTER_PREFIX) or cloud_only:
            return CLOUD_CONCURRENCY - running
        context = example.routing.min_context_length if example is not None else 0
        try:
            ranked = router.candidates(self._pool.hosts, model, context)
        except Unavailable:
            return 0  # no host is up: the items wait for one rather than fail
        except (NotFound, InvalidArgument):
            return CLOUD_CONCURRENCY  # they fail at once with the reason
        slots = busy = 0
        for candidate in ranked:
            name = candidate.model.name
            status = candidate.host.model_status(name)
            if status is not None and status.state == generate_pb2.MODEL_STATE_READY:
                slots += max(status.slots, 1)
                busy += candidate.host.in_flight.get(name, 0)
        if not slots:
            return 1 if running == 0 else 0  # resident nowhere: one item loads it
        others = max(busy - running, 0)  # interactive requests keep their slots
        return slots - running - others

    def _start(self, claimed: ClaimedItem, error: AirouterError | None = None) -> None:
        """Runs a claimed item, or fails it with `error` at once; registered as this
        gateway's before anything else can run, so renewals never take it for an orphan."""
        if (claimed.batch_id, claimed.index) in self._running:
            return  # still running here, its lease lapsed while the store was unreachable
        item = _Item(claimed)
        self._examples[item.model] = claimed.request
        self._running[item.key] = item
        self._running_by_model[item.model] += 1
        if error is None and claimed.attempts > self._max_attempts:
            # Taken over each time from a gateway that stopped while running it.
            error = Unavailable(
                f"the gateways running this item stopped during each of its "
                f"{claimed.attempts - 1} attempts"
            )
        if error is not None:
            item.task = asyncio.create_task(self._settle(item, [item.result(error)]))
        else:
            item.task = asyncio.create_task(self._run(item))

    async def _batch_of(self, batch_id: str) -> StoredBatch:
        """The batch as first seen here (its key and trace do not change)."""
        batch = self._batches_seen.get(batch_id)
        if batch is None:
            batch = self._batches_seen[batch_id] = await self._batch(batch_id)
            if len(self._batches_seen) > 1024:  # a long-lived gateway's old ones
                self._batches_seen.pop(next(iter(self._batches_seen)))
        return batch

    async def _run(self, item: _Item) -> None:
        claimed = item.claimed
        outputs = Outputs()
        finished: Finished | None = None
        error: AirouterError | None = None
        try:
            batch = await self._batch_of(claimed.batch_id)
            request = replace(
                claimed.request,
                request_id=f"{claimed.batch_id}-{claimed.index}-{claimed.attempts}",
                routing=replace(claimed.request.routing, key=batch.api_key),
            )
            with _tracer.start_as_current_span(
                f"batch_item {claimed.custom_id}",
                context=otel_context.Context(),  # a trace of its own, linked to the batch
                links=_link(batch),
                attributes={
                    "airouter.batch.id": claimed.batch_id,
                    "airouter.batch.custom_id": claimed.custom_id,
                    "airouter.batch.index": claimed.index,
                    "airouter.attempt": claimed.attempts,
                    **request_attributes(request),
                },
            ) as span:
                try:
                    stream = self._service.generate(request, self._item_timeout_s)
                    async with aclosing(stream):
                        async for event in stream:
                            if isinstance(event, Finished):
                                finished = event
                            else:
                                outputs.add(event)
                except AirouterError as exc:
                    error = exc
                if error is None:
                    if finished is None:
                        error = Unavailable("the stream ended early")
                    elif finished.reason is FinishReason.ERROR:
                        error = Unavailable(finished.error_message)
                    else:
                        span.set_attributes(finish_attributes(finished))
                if error is not None:
                    span.set_status(trace.StatusCode.ERROR, f"{error.code}: {error}")
        except asyncio.CancelledError:
            if not item.stopped_by_cancel:
                self._forget(item)
                raise  # the gateway stops, or another took the item over
            item.recording = True
            cancelled = Cancelled("the batch was cancelled before this item finished")
            await asyncio.shield(self._settle(item, [item.result(cancelled, _CANCELLED)]))
            return
        # From here on the outcome is being recorded: a cancel no longer interrupts it.
        item.recording = True
        if error is None:
            assert finished is not None
            result = ItemResult(
                claimed.custom_id,
                claimed.index,
                _SUCCEEDED,
                claimed.attempts,
                claimed.request.chat,
                text=outputs.text(),
                finished=finished,
                # Kept where the request asked for more than one choice's text.
                choices=outputs.choices(finished) if claimed.request.output is not PLAIN else (),
            )
        elif isinstance(error, _RETRYABLE) and claimed.attempts < self._max_attempts:
            with trace.use_span(span):  # its log line carries the attempt's trace id
                await asyncio.shield(self._retry_later(item, error))
            return
        else:
            with trace.use_span(span):
                _log.warning(
                    "batch_item_failed",
                    batch_id=claimed.batch_id,
                    custom_id=claimed.custom_id,
                    code=error.code,
                    error=str(error),
                    attempts=claimed.attempts,
                )
            result = item.result(error)
        await asyncio.shield(self._settle(item, [result]))

    async def _retry_later(self, item: _Item, error: AirouterError) -> None:
        first, cap = RETRY_BACKOFF_S
        attempts = item.claimed.attempts
        delay = min(first * 2 ** (attempts - 1), cap) * random.uniform(0.5, 1.5)
        _log.info(
            "batch_item_retry",
            batch_id=item.claimed.batch_id,
            custom_id=item.claimed.custom_id,
            code=error.code,
            error=str(error),
            attempt=attempts,
            in_s=round(delay, 2),
        )
        self.retries += 1
        item.recording = True
        try:
            await self._persist(
                self._store.release,
                self.owner,
                item.claimed.batch_id,
                item.claimed.index,
                time.time() + delay,
            )
        finally:
            self._forget(item)
        self._totals_version += 1
        self._totals[ItemState.RUNNING] -= 1
        self._totals[ItemState.PENDING] += 1
        self._wake.set()

    async def _settle(self, item: _Item, results: list[ItemResult]) -> None:
        """Records the item's result: stored and counted once, then announced."""
        item.recording = True
        try:
            stored, finished = await self._persist(
                self._store.record_results, self.owner, item.claimed.batch_id, results
            )
        finally:
            self._forget(item)
        if not stored:
            _log.warning(
                "batch_item_result_dropped",
                batch_id=item.claimed.batch_id,
                custom_id=item.claimed.custom_id,
                reason="its lease lapsed and another gateway holds the item now",
            )
        if stored:
            self._totals_version += 1
            self._totals[ItemState.RUNNING] -= len(stored)
            self._totals.update(r.state for r in stored)
        if finished is not None:
            _log.info("batch_finished", batch_id=finished.id, **_counts_log(finished))
        self._announce(item.claimed.batch_id)
        self._wake.set()

    def _forget(self, item: _Item) -> None:
        if self._running.get(item.key) is item:
            del self._running[item.key]
            self._running_by_model[item.model] -= 1
            self._wake.set()

    async def _persist(self, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A write an item's outcome depends on, retried while the store is unreachable (the
        item's lease may lapse meanwhile; then another gateway runs it and this write is
        refused, so nothing is recorded twice)."""
        delay = 0.1
        while True:
            try:
                return await call(*args)
            except StoreUnavailable as exc:
                if delay == 0.1:  # once per write, not at every try
                    _log.info("batch_store_retry", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _renew_forever(self) -> None:
        """Renews this gateway's leases, stops the items it no longer holds, and stops those
        of batches cancelled where the notification did not reach it."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            began = time.monotonic()
            try:
                held, cancelling = await self._store.renew(self.owner, self._lease_s)
                await self._refresh_totals()
            except StoreUnavailable:
                continue  # the dispatcher says so; leases may lapse if this goes on
            for key, item in list(self._running.items()):
                if item.recording or item.task is None or item.task.done():
                    continue
                if item.claimed.batch_id in cancelling:
                    self._spawn(self._stop_batch_items(item.claimed.batch_id))
                elif key not in held and item.claimed_at < began:  # (one claimed since is)
                    _log.warning(
                        "batch_item_lease_lost",
                        batch_id=item.claimed.batch_id,
                        custom_id=item.claimed.custom_id,
                    )
                    item.task.cancel()
            # Held in the store but run by nothing here (its task failed unexpectedly): given
            # back, rather than renewed forever.
            for batch_id, index in held - self._running.keys():
                _log.error("batch_item_orphan_released", batch_id=batch_id, index=index)
                self._spawn(self._store.release(self.owner, batch_id, index, time.time(), False))

    def _count_claims(self, claims: list[ClaimedItem]) -> None:
        """Moves claimed items from pending to running in the totals (an item taken over from
        a gateway that died was running already: the store is asked again then)."""
        self._totals_version += 1
        self._totals[ItemState.PENDING] -= len(claims)
        self._totals[ItemState.RUNNING] += len(claims)
        if any(c.attempts > 1 for c in claims):
            self._spawn(self._refresh_totals())

    async def _refresh_totals(self) -> None:
        version = self._totals_version
        try:
            totals = await self._store.item_totals()
        except StoreUnavailable:
            return  # the next look
        if version == self._totals_version:
            self._totals = Counter(totals)

    def _item_states(self) -> Counter[str]:
        """Items of every stored batch by state (BatchCounts' fields but total), for
        /metrics: as of this gateway's last look at the store."""
        return Counter({state.name.lower(): self._totals.get(state, 0) for state in ItemState})


def _link(batch: StoredBatch) -> list[trace.Link]:
    """To the batch's span, from each of its items' traces."""
    if not batch.trace_id:
        return []
    context = trace.SpanContext(
        int(batch.trace_id, 16),
        int(batch.span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return [trace.Link(context, {"airouter.batch.id": batch.id})]


def _no_batch(batch_id: str) -> NotFound:
    return NotFound(f"no batch {shown(batch_id)}; `airouter batch list` shows the batches")


def _validate(batch_id: str, items: list[tuple[str, GenerateRequest]]) -> None:
    if not BATCH_ID.fullmatch(batch_id):
        raise InvalidArgument(
            f"batch_id {shown(batch_id)}: use 1 to 64 letters, digits, '_', '.' or '-', or "
            "leave it empty for the gateway to choose"
        )
    if not items:
        raise InvalidArgument("the batch has no items; send at least one")
    if len(items) > MAX_ITEMS:
        raise InvalidArgument(
            f"the batch has {len(items)} items; split it into batches of at most {MAX_ITEMS}"
        )
    seen: set[str] = set()
    for i, (custom_id, request) in enumerate(items):
        where = f"items[{i}]"
        if not custom_id:
            raise InvalidArgument(f"{where}.custom_id is empty; give every item a unique one")
        if custom_id in seen:
            raise InvalidArgument(
                f"{where}.custom_id {custom_id[:64]!r} is used twice; custom_ids must be unique"
            )
        seen.add(custom_id)
        try:
            validate(request)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}.request: {exc}") from None


def _counts_log(batch: StoredBatch) -> dict[str, int]:
    counts = batch.counts()
    return {"succeeded": counts.succeeded, "failed": counts.failed, "cancelled": counts.cancelled}
