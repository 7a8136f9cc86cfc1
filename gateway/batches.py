"""Batches: stored before they are acknowledged, then run across the hosts in the background.

Items are pulled as slots free up: an item of a model starts while the hosts where that model
is resident have more slots than this gateway keeps busy there, so every host takes work in
proportion to its slots, interactive requests keep their share, and a model that is resident
nowhere gets one item (which loads it) before the rest follow. A failed attempt is retried
with jittered exponential backoff; an item whose model is unknown or whose request is invalid
fails at once. A result is on disk before anyone sees it, and items without one run again
after a restart, so a gateway killed mid-batch loses no result and repeats none.

Each attempt is a trace of its own whose root span links to the batch's span: a batch of
thousands of items stays readable in Jaeger.
"""

import asyncio
import dataclasses
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
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
from gateway.batch_records import (
    FINAL_ITEM_STATES,
    BatchInfo,
    BatchState,
    Counts,
    ItemResult,
    ItemState,
)
from gateway.batch_store import BatchStore, PendingItem, StoredBatch
from gateway.config import OPENROUTER_PREFIX
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
# How often the dispatcher looks at the hosts again while items wait for a slot.
DISPATCH_POLL_S = 0.5
# Failures another attempt may well get past; any other is the item's own.
_RETRYABLE = (Unavailable, ResourceExhausted, DeadlineExceeded, Internal)
# The largest sequence SQLite's INTEGER holds: an after_sequence beyond it is past the end.
_MAX_SEQUENCE = (1 << 63) - 1
_SUCCEEDED = ItemState.SUCCEEDED
_FAILED = ItemState.FAILED
_CANCELLED = ItemState.CANCELLED
# The item states as BatchCounts names them: pending, running, succeeded, ...
_ITEM_STATES = [f.name for f in dataclasses.fields(Counts) if f.name != "total"]
_IN_PROGRESS = BatchState.IN_PROGRESS
_CANCELLING = BatchState.CANCELLING


@dataclass(eq=False)
class _Item:
    batch: "_Batch"
    index: int
    custom_id: str
    request: GenerateRequest
    attempts: int
    task: asyncio.Task[None] | None = None

    def result(self, error: AirouterError, state: ItemState = _FAILED) -> ItemResult:
        """The item's result record: failed (or `state`) with the error's code."""
        return ItemResult(
            self.custom_id,
            self.index,
            state,
            self.attempts,
            self.request.chat,
            error_code=error.code,
            error_message=str(error),
        )


@dataclass(eq=False)
class _Batch:
    stored: StoredBatch
    finals: Counter[ItemState] = field(default_factory=Counter)  # items with a result
    # Items ready to run, per requested model, in batch order.
    pending: dict[str, deque[_Item]] = field(default_factory=dict)
    retrying: set[_Item] = field(default_factory=set)  # waiting out their backoff
    running: set[_Item] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.stored.id

    @property
    def active(self) -> bool:
        return self.stored.state in (_IN_PROGRESS, _CANCELLING)

    def counts(self) -> Counts:
        running, done = len(self.running), sum(self.finals.values())
        return Counts(
            total=self.stored.total,
            pending=self.stored.total - running - done,
            running=running,
            succeeded=self.finals[_SUCCEEDED],
            failed=self.finals[_FAILED],
            cancelled=self.finals[_CANCELLED],
        )

    def info(self) -> BatchInfo:
        stored = self.stored
        return BatchInfo(
            self.id, stored.state, self.counts(), stored.created_at, stored.finished_at
        )

    def link(self) -> list[trace.Link]:
        if not self.stored.trace_id:
            return []
        context = trace.SpanContext(
            int(self.stored.trace_id, 16),
            int(self.stored.span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        return [trace.Link(context, {"airouter.batch.id": self.id})]

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def take_waiting(self) -> list["_Item"]:
        """Removes and returns the items that wait to start (queued or backing off)."""
        waiting = [i for queue in self.pending.values() for i in queue]
        waiting += self.retrying
        self.pending.clear()
        self.retrying.clear()
        return waiting


class BatchRunner:
    """The gateway's batches: stored in the SQLite file at `path`, run through the same
    routing and relay as interactive requests."""

    def __init__(
        self,
        path: Path,
        service: GatewayService,
        metrics: GatewayMetrics,
        max_attempts: int = 4,
        item_timeout_s: float = 600.0,
        retention_s: float = 7 * 86400.0,
    ) -> None:
        self._path = path
        self._service = service
        self._pool = service.pool
        self._cloud = service.cloud
        self._max_attempts = max_attempts
        self._item_timeout_s = item_timeout_s
        self._retention_s = retention_s
        self._batches: dict[str, _Batch] = {}  # every stored batch, oldest first
        # The batches in progress or cancelling, oldest first (older batches run first): the
        # dispatcher and /metrics walk these, not the finished ones.
        self._active: dict[str, _Batch] = {}
        # Items of the finished batches by state, for /metrics.
        self._settled: Counter[str] = Counter()
        self._pruner: asyncio.Task[None] | None = None
        self._running_by_model: Counter[str] = Counter()
        self._retries: list[tuple[float, _Item]] = []
        self._wake = asyncio.Event()
        # SQLite runs on a thread of its own, one statement at a time, off the event loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch-db")
        self._store: BatchStore | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._draining = False
        # Submits one at a time: two with one batch_id must not both store it.
        self._submitting = asyncio.Lock()
        self._recording: set[asyncio.Task[None]] = set()
        self.retries = 0  # attempts that failed and were tried again
        metrics.watch_batches(self._item_states, lambda: self.retries)

    async def start(self) -> None:
        """Opens the database (StoreLocked when another gateway has it) and resumes the
        batches that were running when the gateway last stopped."""
        self._store = await self._db(BatchStore, self._path)
        resumed = 0
        for stored in reversed(await self._db(self._store.batches)):
            batch = _Batch(stored)
            states = await self._db(self._store.item_states, stored.id)
            batch.finals.update({s: n for s, n in states.items() if s in FINAL_ITEM_STATES})
            self._batches[stored.id] = batch
            self._track(batch)
            if batch.active:
                for pending in await self._db(self._store.unfinished_items, stored.id):
                    self._enqueue(batch, pending)
                resumed += 1
            if batch.stored.state == _CANCELLING:  # cancelled just before the gateway stopped
                await self._cancel_items(batch, batch.take_waiting())
        if resumed:
            _log.info("batches_resumed", batches=resumed, path=str(self._path))
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._pruner = asyncio.create_task(self._prune_forever())

    def _track(self, batch: "_Batch") -> None:
        """Files a batch as active, or counts it as settled once it has finished."""
        if batch.active:
            self._active[batch.id] = batch
            return
        self._active.pop(batch.id, None)
        counts = batch.counts()
        self._settled.update({s: getattr(counts, s) for s in _ITEM_STATES})

    async def _prune_forever(self) -> None:
        """Deletes finished batches older than the retention period, now and every hour."""
        while True:
            await self.prune()
            await asyncio.sleep(PRUNE_EVERY_S)

    async def prune(self) -> None:
        assert self._store is not None
        deleted = await self._db(
            self._store.delete_finished_before, time.time() - self._retention_s
        )
        for batch_id in deleted:
            batch = self._batches.pop(batch_id, None)
            if batch is not None:
                counts = batch.counts()
                self._settled.subtract({s: getattr(counts, s) for s in _ITEM_STATES})
        if deleted:
            _log.info("batches_deleted", batches=len(deleted), retention_s=self._retention_s)

    def drain(self) -> None:
        """Shutdown begins: no item starts any more, and result streams end with UNAVAILABLE
        so their clients resume (after_sequence) with the next gateway instead of holding
        the shutdown's grace period."""
        self._draining = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for batch in self._batches.values():
            batch.notify()

    async def stop_items(self) -> None:
        """Stops dispatching and the running items (they run again at the next start)."""
        tasks = [i.task for b in self._active.values() for i in b.running if i.task]
        tasks += [t for t in (self._dispatcher, self._pruner) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stops the items, waits for the results being recorded, and closes the database."""
        await self.stop_items()
        await asyncio.gather(*self._recording, return_exceptions=True)
        store, self._store = self._store, None
        if store is not None:
            await self._db(store.close)
            self._executor.shutdown()

    async def submit(
        self,
        batch_id: str,
        items: list[tuple[str, GenerateRequest]],
        carrier: Any = None,
        api_key: str = "",
    ) -> BatchInfo:
        """Stores the batch of (custom_id, request) items (its span continues the caller's
        trace from `carrier`) and returns it once it is on disk; an empty batch_id gets
        one. Its items run under `api_key` (a key's name), counting toward its limits."""
        batch_id = batch_id or f"batch_{uuid.uuid4().hex}"
        # Up to MAX_ITEMS items: checked on a worker thread, not the event loop.
        await off_loop(_validate, batch_id, items)
        self._service.check_key_models(api_key, {request.model for _, request in items})
        async with self._submitting:
            return await self._store_batch(batch_id, items, carrier, api_key)

    async def _store_batch(
        self, batch_id: str, items: list[tuple[str, GenerateRequest]], carrier: Any, api_key: str
    ) -> BatchInfo:
        assert self._store is not None
        existing = self._batches.get(batch_id)
        if existing is not None:
            if not await self._db(self._store.same_items, batch_id, items):
                raise AlreadyExists(
                    f"batch {shown(batch_id)} exists with other items; choose another batch_id"
                )
            return existing.info()  # the same submit again: nothing more to do
        with _tracer.start_as_current_span(
            f"batch {batch_id}",
            context=tracing.extract_context(carrier),
            attributes={"airouter.batch.id": batch_id, "airouter.batch.items": len(items)},
        ) as span:
            context = span.get_span_context()
            trace_id, span_id = tracing.hex_ids(context) if context.is_valid else ("", "")
            stored = await self._db(
                self._store.add_batch, batch_id, items, trace_id, span_id, api_key
            )
        batch = self._batches[batch_id] = _Batch(stored)
        self._track(batch)
        for index, (custom_id, request) in enumerate(items):
            self._enqueue(batch, PendingItem(index, custom_id, request, 0))
        _log.info("batch_submitted", batch_id=batch_id, items=len(items))
        self._wake.set()
        return batch.info()

    def get(self, batch_id: str) -> BatchInfo:
        return self._batch(batch_id).info()

    def all(self) -> list[BatchInfo]:
        return [b.info() for b in reversed(self._batches.values())]

    async def cancel(self, batch_id: str) -> BatchInfo:
        batch = self._batch(batch_id)
        if batch.stored.state is BatchState.COMPLETED:
            raise FailedPrecondition(
                f"batch {shown(batch_id)} has already completed; nothing to cancel"
            )
        if batch.active:
            assert self._store is not None
            # Nothing of the batch may start from here on: the dispatcher runs between awaits.
            batch.stored.state = _CANCELLING
            waiting = batch.take_waiting()
            self._retries = [(due, i) for due, i in self._retries if i.batch is not batch]
            await self._db(self._store.set_state, batch_id, _CANCELLING)
            await self._cancel_items(batch, waiting)
            _log.info("batch_cancelled", batch_id=batch_id, **_counts_log(batch))
        return batch.info()

    async def results(
        self, batch_id: str, after_sequence: int
    ) -> AsyncIterator[tuple[ItemResult, Counts]]:
        """The batch's results after `after_sequence`, then each new one, until the last."""
        batch = self._batch(batch_id)
        assert self._store is not None
        after_sequence = min(after_sequence, _MAX_SEQUENCE)
        while True:
            if self._draining:
                raise Unavailable(
                    "the gateway is shutting down; ask again for the results after sequence "
                    f"{after_sequence} once it is back"
                )
            changed = batch.changed
            page = await self._db(self._store.results, batch_id, after_sequence, 256)
            for result in page:
                after_sequence = result.sequence
                yield result, batch.counts()
            if page:
                continue
            if not batch.active and after_sequence >= batch.stored.last_sequence:
                return
            await changed.wait()

    async def result_page(self, batch_id: str, after_sequence: int, limit: int) -> list[ItemResult]:
        """The batch's results stored so far after `after_sequence`, at most `limit`."""
        self._batch(batch_id)
        assert self._store is not None
        after = min(after_sequence, _MAX_SEQUENCE)
        return await self._db(self._store.results, batch_id, after, limit)

    def _batch(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"no batch {shown(batch_id)}; `airouter batch list` shows the batches")
        return batch

    def _enqueue(self, batch: _Batch, pending: PendingItem) -> None:
        item = _Item(batch, pending.index, pending.custom_id, pending.request, pending.attempts)
        batch.pending.setdefault(item.request.model, deque()).append(item)

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            while self._retries and self._retries[0][0] <= now:
                _, item = self._retries.pop(0)
                item.batch.retrying.discard(item)
                item.batch.pending.setdefault(item.request.model, deque()).appendleft(item)
            waiting = False
            for batch in list(self._active.values()):
                for model, queue in list(batch.pending.items()):
                    while queue and batch.stored.state == _IN_PROGRESS:
                        item = queue[0]
                        try:
                            if not self._room(model, item.request):
                                break
                        except Exception as exc:  # one bad item must not stop every batch
                            queue.popleft()
                            self._fail_now(item, exc)
                            continue
                        self._start(queue.popleft())
                        # Let the item reach its host, so the next decision counts it there.
                        await asyncio.sleep(0)
                    waiting = waiting or bool(queue)
            timeout = DISPATCH_POLL_S if waiting else None
            if self._retries:
                due = self._retries[0][0] - time.monotonic()
                timeout = max(min(timeout or due, due), 0.0)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _room(self, model: str, request: GenerateRequest) -> bool:
        """Whether another item of `model` may start now."""
        running = self._running_by_model[model]
        if model.startswith(OPENROUTER_PREFIX) or self._cloud.policy(request) == "cloud_only":
            return running < CLOUD_CONCURRENCY
        try:
            ranked = router.candidates(self._pool.hosts, model, request.routing.min_context_length)
        except Unavailable:
            return False  # no host is up: the items wait for one rather than fail
        except (NotFound, InvalidArgument):
            return True  # the item fails at once with the reason
        slots = busy = 0
        for candidate in ranked:
            name = candidate.model.name
            status = candidate.host.model_status(name)
            if status is not None and status.state == generate_pb2.MODEL_STATE_READY:
                slots += max(status.slots, 1)
                busy += candidate.host.in_flight.get(name, 0)
        if not slots:
            return running == 0  # resident nowhere: one item loads it, the rest follow
        others = max(busy - running, 0)  # interactive requests keep their slots
        return running + others < slots

    def _fail_now(self, item: _Item, exc: Exception) -> None:
        """Fails an item that the dispatcher could not even place, and goes on."""
        _log.error(
            "batch_item_unplaceable",
            batch_id=item.batch.id,
            custom_id=item.custom_id,
            error=f"{type(exc).__name__}: {exc}",
        )
        error = Internal(f"the gateway could not dispatch this item: {exc!r}")
        self._spawn_record(item.batch, [item.result(error)])

    def _spawn_record(self, batch: "_Batch", results: list[ItemResult]) -> None:
        task = asyncio.create_task(self._record(batch, results))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    def _start(self, item: _Item) -> None:
        item.batch.running.add(item)
        self._running_by_model[item.request.model] += 1
        item.task = asyncio.create_task(self._run(item))

    async def _run(self, item: _Item) -> None:
        batch = item.batch
        item.attempts += 1
        request = replace(
            item.request,
            request_id=f"{batch.id}-{item.index}-{item.attempts}",
            routing=replace(item.request.routing, key=batch.stored.api_key),
        )
        outputs = Outputs()
        finished: Finished | None = None
        error: AirouterError | None = None
        try:
            with _tracer.start_as_current_span(
                f"batch_item {item.custom_id}",
                context=otel_context.Context(),  # a trace of its own, linked to the batch
                links=batch.link(),
                attributes={
                    "airouter.batch.id": batch.id,
                    "airouter.batch.custom_id": item.custom_id,
                    "airouter.batch.index": item.index,
                    "airouter.attempt": item.attempts,
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
        finally:
            batch.running.discard(item)
            self._running_by_model[item.request.model] -= 1
            self._wake.set()
        if error is None:
            assert finished is not None
            result = ItemResult(
                item.custom_id,
                item.index,
                _SUCCEEDED,
                item.attempts,
                item.request.chat,
                text=outputs.text(),
                finished=finished,
                # Kept where the request asked for more than one choice's text.
                choices=outputs.choices(finished) if item.request.output is not PLAIN else (),
            )
        elif (
            isinstance(error, _RETRYABLE)
            and item.attempts < self._max_attempts
            and batch.stored.state == _IN_PROGRESS
        ):
            with trace.use_span(span):  # its log line carries the attempt's trace id
                await self._retry_later(item, error)
            return
        else:
            with trace.use_span(span):
                _log.warning(
                    "batch_item_failed",
                    batch_id=batch.id,
                    custom_id=item.custom_id,
                    code=error.code,
                    error=str(error),
                    attempts=item.attempts,
                )
            result = item.result(error)
        await asyncio.shield(self._record(batch, [result]))

    async def _retry_later(self, item: _Item, error: AirouterError) -> None:
        assert self._store is not None
        first, cap = RETRY_BACKOFF_S
        delay = min(first * 2 ** (item.attempts - 1), cap) * random.uniform(0.5, 1.5)
        _log.info(
            "batch_item_retry",
            batch_id=item.batch.id,
            custom_id=item.custom_id,
            code=error.code,
            error=str(error),
            attempt=item.attempts,
            in_s=round(delay, 2),
        )
        self.retries += 1
        item.batch.retrying.add(item)
        self._retries.append((time.monotonic() + delay, item))
        self._retries.sort(key=lambda entry: entry[0])
        await asyncio.shield(
            self._db(self._store.record_attempt_failed, item.batch.id, item.index, item.attempts)
        )

    async def _cancel_items(self, batch: _Batch, waiting: list[_Item]) -> None:
        """Stops the batch's running items and records them and the `waiting` ones (taken
        from the queues already) as cancelled; the store closes the batch."""
        running = [i for i in batch.running if i.task is not None]
        for item in running:
            assert item.task is not None
            item.task.cancel()
        await asyncio.gather(*(i.task for i in running if i.task), return_exceptions=True)
        waiting = [*waiting, *running]
        cancelled = Cancelled("the batch was cancelled before this item finished")
        results = [i.result(cancelled, _CANCELLED) for i in sorted(waiting, key=lambda i: i.index)]
        await asyncio.shield(self._record(batch, results))

    async def _record(self, batch: _Batch, results: list[ItemResult]) -> None:
        """Commits the results, then counts and announces those that were new."""
        assert self._store is not None
        stored = await self._db(self._store.record_results, batch.id, results)
        batch.finals.update(r.state for r in stored)
        if stored:
            batch.stored.last_sequence = stored[-1].sequence
        if sum(batch.finals.values()) == batch.stored.total and batch.active:
            refreshed = await self._db(self._store.batch, batch.id)
            assert refreshed is not None
            batch.stored = refreshed
            self._track(batch)
            _log.info("batch_finished", batch_id=batch.id, **_counts_log(batch))
        batch.notify()

    def _item_states(self) -> Counter[str]:
        """Items of every stored batch by state (BatchCounts' fields but total), for
        /metrics."""
        totals: Counter[str] = Counter({state: 0 for state in _ITEM_STATES})
        totals.update(self._settled)
        for batch in self._active.values():
            counts = batch.counts()
            for state in _ITEM_STATES:
                totals[state] += getattr(counts, state)
        return totals

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)


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


def _counts_log(batch: _Batch) -> dict[str, int]:
    counts = batch.counts()
    return {"succeeded": counts.succeeded, "failed": counts.failed, "cancelled": counts.cancelled}
