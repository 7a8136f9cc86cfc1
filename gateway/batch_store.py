"""Batches in the gateway's database, shared by every gateway on it.

A gateway claims an item under a lease (PostgreSQL skips the rows other gateways are
claiming) and renews it while the item runs; a gateway that dies stops renewing, and once the
lease has lapsed any gateway claims the item again. An item's result is recorded in the same
transaction that ends the item and numbers it, and only by the gateway that holds the item, so
every result is recorded exactly once: a gateway that lost its lease finds its result refused.
A batch's counts are kept with it, so any gateway answers for any batch. A recorded item keeps
its owner, so a gateway whose recording committed without an answer (the connection dropped
at COMMIT) finds, when it tries again, that the result is its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.batch_records import BatchInfo, BatchState, Counts, ItemResult, ItemState
from gateway.database import Connection, Database, Row
from gateway.generation import GenerateRequest
from gateway.wire import (
    item_result_bytes,
    item_result_from_bytes,
    request_bytes,
    request_from_bytes,
)

_PENDING, _RUNNING = int(ItemState.PENDING), int(ItemState.RUNNING)
_IN_PROGRESS, _CANCELLING = int(BatchState.IN_PROGRESS), int(BatchState.CANCELLING)
_FINAL_COLUMN = {
    ItemState.SUCCEEDED: "succeeded",
    ItemState.FAILED: "failed",
    ItemState.CANCELLED: "cancelled",
}
_BATCH_COLUMNS = (
    "b.id, b.created_at, b.finished_at, b.state, b.total, b.last_sequence, b.trace_id, "
    "b.span_id, b.api_key, b.succeeded, b.failed, b.cancelled, "
    "(SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id AND i.owner IS NOT NULL "
    "AND i.sequence IS NULL)"
)
# An item another gateway may take: waiting and due, or running under a lapsed lease.
_CLAIMABLE = (
    f"((i.state = {_PENDING} AND i.not_before <= $1) OR (i.state = {_RUNNING} AND "
    "i.lease_until < $1))"
)


@dataclass
class StoredBatch:
    id: str
    created_at: float
    finished_at: float | None
    state: BatchState
    total: int
    last_sequence: int
    trace_id: str
    span_id: str
    api_key: str  # the name of the key it was submitted with; its items count toward it
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0  # claimed by a gateway, no result yet

    @property
    def active(self) -> bool:
        return self.state in (BatchState.IN_PROGRESS, BatchState.CANCELLING)

    def counts(self) -> Counts:
        done = self.succeeded + self.failed + self.cancelled
        return Counts(
            total=self.total,
            pending=self.total - self.running - done,
            running=self.running,
            succeeded=self.succeeded,
            failed=self.failed,
            cancelled=self.cancelled,
        )

    def info(self) -> BatchInfo:
        return BatchInfo(self.id, self.state, self.counts(), self.created_at, self.finished_at)


def _stored(row: Row) -> StoredBatch:
    batch_id, created, finished, state, *rest = row
    return StoredBatch(batch_id, created, finished, BatchState(state), *rest)


@dataclass
class ClaimedItem:
    batch_id: str
    index: int
    custom_id: str
    request: GenerateRequest
    attempts: int  # this one included


@dataclass(frozen=True)
class Waiting:
    """What the dispatcher may claim now, and when to look again."""

    models: list[tuple[str, int]]  # (model, items claimable now), oldest batch's first
    next_due_at: float | None  # when the next item becomes claimable or its lease lapses


class BatchStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    # --- batches ---------------------------------------------------------------------

    async def add_batch(
        self,
        batch_id: str,
        items: list[tuple[str, GenerateRequest]],
        trace_id: str,
        span_id: str,
        api_key: str = "",
    ) -> StoredBatch | None:
        """Stores a new batch; None where one with this id exists (its own submit may be
        in flight on another gateway: PostgreSQL waits for it before saying so)."""
        created = self._clock()
        rows = [
            (batch_id, i, custom_id, request_bytes(request), _PENDING, request.model)
            for i, (custom_id, request) in enumerate(items)
        ]

        async def body(conn: Connection) -> bool:
            added = await conn.execute(
                "INSERT INTO batches (id, created_at, state, total, trace_id, span_id, api_key) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                batch_id,
                created,
                _IN_PROGRESS,
                len(items),
                trace_id,
                span_id,
                api_key,
            )
            if not added:
                return False
            await conn.executemany(
                "INSERT INTO items (batch_id, idx, custom_id, request, state, model) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                rows,
            )
            await conn.notify("submitted")
            return True

        if not await self.db.transact(body):
            return None
        return StoredBatch(
            batch_id,
            created,
            None,
            BatchState.IN_PROGRESS,
            len(items),
            0,
            trace_id,
            span_id,
            api_key,
        )

    async def batch(self, batch_id: str) -> StoredBatch | None:
        row = await self.db.fetchrow(
            f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.id = $1", batch_id
        )
        return _stored(row) if row else None

    async def batches(self) -> list[StoredBatch]:
        rows = await self.db.fetch(
            f"SELECT {_BATCH_COLUMNS} FROM batches b ORDER BY b.created_at DESC"
        )
        return [_stored(row) for row in rows]

    async def same_items(self, batch_id: str, items: list[tuple[str, GenerateRequest]]) -> bool:
        """Whether the batch holds exactly these items (a submit sent again)."""
        rows = await self.db.fetch(
            "SELECT custom_id, request FROM items WHERE batch_id = $1 ORDER BY idx", batch_id
        )
        kept = [(row[0], bytes(row[1])) for row in rows]
        return kept == [(custom_id, request_bytes(request)) for custom_id, request in items]

    async def results(self, batch_id: str, after_sequence: int, limit: int) -> list[ItemResult]:
        rows = await self.db.fetch(
            "SELECT result FROM items WHERE batch_id = $1 AND sequence > $2 "
            "ORDER BY sequence LIMIT $3",
            batch_id,
            after_sequence,
            limit,
        )
        return [item_result_from_bytes(bytes(row[0])) for row in rows]

    async def item_totals(self) -> dict[ItemState, int]:
        """Items of every stored batch by state."""

        async def body(conn: Connection) -> dict[ItemState, int]:
            totals = await conn.fetchrow(
                "SELECT COALESCE(SUM(total), 0), COALESCE(SUM(succeeded), 0), "
                "COALESCE(SUM(failed), 0), COALESCE(SUM(cancelled), 0) FROM batches"
            )
            running = await conn.fetchrow(
                "SELECT COUNT(*) FROM items WHERE owner IS NOT NULL AND sequence IS NULL"
            )
            assert totals is not None and running is not None
            total, succeeded, failed, cancelled = (int(v) for v in totals)
            return {
                ItemState.PENDING: total - int(running[0]) - succeeded - failed - cancelled,
                ItemState.RUNNING: int(running[0]),
                ItemState.SUCCEEDED: succeeded,
                ItemState.FAILED: failed,
                ItemState.CANCELLED: cancelled,
            }

        return await self.db.transact(body)

    async def delete_finished_before(self, cutoff: float) -> list[str]:
        """Deletes the batches (and their items) that finished before `cutoff` (epoch
        seconds); returns their ids."""

        async def body(conn: Connection) -> list[str]:
            rows = await conn.fetch(
                "SELECT id FROM batches WHERE finished_at IS NOT NULL AND finished_at < $1",
                cutoff,
            )
            ids = [row[0] for row in rows]
            for batch_id in ids:
                await conn.execute("DELETE FROM items WHERE batch_id = $1", batch_id)
                await conn.execute("DELETE FROM batches WHERE id = $1", batch_id)
            return ids

        return await self.db.transact(body)

    # --- items: claims and leases ----------------------------------------------------

    async def waiting(self) -> Waiting:
        now = self._clock()

        async def body(conn: Connection) -> Waiting:
            rows = await conn.fetch(
                "SELECT i.model, COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id "
                f"WHERE i.sequence IS NULL AND b.state = {_IN_PROGRESS} AND {_CLAIMABLE} "
                "GROUP BY i.model ORDER BY MIN(b.created_at)",
                now,
            )
            # Only what becomes due later: items due now wait for room, not for a time.
            due = await conn.fetchrow(
                f"SELECT MIN(t) FROM (SELECT CASE WHEN i.state = {_PENDING} THEN i.not_before "
                "ELSE i.lease_until END AS t FROM items i JOIN batches b ON b.id = i.batch_id "
                f"WHERE i.sequence IS NULL AND b.state IN ({_IN_PROGRESS}, {_CANCELLING})) "
                "AS due WHERE t > $1",
                now,
            )
            return Waiting([(row[0], int(row[1])) for row in rows], due[0] if due else None)

        return await self.db.transact(body)

    async def claim(self, owner: str, model: str, limit: int, lease_s: float) -> list[ClaimedItem]:
        """Up to `limit` items of `model`, oldest batch first, now `owner`'s until the lease
        ends (unless renewed)."""
        now = self._clock()
        rows = await self.db.fetch(
            "WITH picked AS (SELECT i.batch_id AS pick_batch, i.idx AS pick_idx FROM items i "
            "JOIN batches b ON b.id = i.batch_id "
            f"WHERE i.model = $2 AND i.sequence IS NULL AND b.state = {_IN_PROGRESS} "
            f"AND {_CLAIMABLE} ORDER BY b.created_at, i.idx LIMIT $3{self.db.skip_locked('i')}) "
            f"UPDATE items SET state = {_RUNNING}, owner = $4, lease_until = $5, "
            "attempts = attempts + 1 FROM picked "
            "WHERE items.batch_id = picked.pick_batch AND items.idx = picked.pick_idx "
            "RETURNING batch_id, idx, custom_id, request, attempts",
            now,
            model,
            limit,
            owner,
            now + lease_s,
        )
        claimed = [
            ClaimedItem(row[0], row[1], row[2], request_from_bytes(bytes(row[3])), row[4])
            for row in rows
        ]
        return sorted(claimed, key=lambda item: (item.batch_id, item.index))

    async def renew(self, owner: str, lease_s: float) -> tuple[set[tuple[str, int]], set[str]]:
        """Extends the owner's leases; returns the items it still holds and the batches among
        theirs that are being cancelled."""
        until = self._clock() + lease_s

        async def body(conn: Connection) -> tuple[set[tuple[str, int]], set[str]]:
            await conn.execute(
                "UPDATE items SET lease_until = $1 WHERE owner = $2 AND sequence IS NULL "
                f"AND state = {_RUNNING}",
                until,
                owner,
            )
            rows = await conn.fetch(
                "SELECT i.batch_id, i.idx, b.state FROM items i JOIN batches b "
                "ON b.id = i.batch_id WHERE i.owner = $1 AND i.sequence IS NULL "
                f"AND i.state = {_RUNNING}",
                owner,
            )
            held = {(row[0], row[1]) for row in rows}
            return held, {row[0] for row in rows if row[2] == _CANCELLING}

        return await self.db.transact(body)

    async def release(
        self, owner: str, batch_id: str, index: int, not_before: float, attempt_counts: bool = True
    ) -> None:
        """Gives a held item back, to be claimed again from `not_before` on."""
        await self.db.execute(
            f"UPDATE items SET state = {_PENDING}, owner = NULL, lease_until = NULL, "
            f"not_before = $1, attempts = attempts - {0 if attempt_counts else 1} "
            "WHERE batch_id = $2 AND idx = $3 AND owner = $4 AND sequence IS NULL",
            not_before,
            batch_id,
            index,
            owner,
        )

    async def release_all(self, owner: str) -> int:
        """A gateway stopping gives back what it holds, for others to take at once (their
        attempts do not count: the item did nothing wrong)."""

        async def body(conn: Connection) -> int:
            released = await conn.execute(
                f"UPDATE items SET state = {_PENDING}, owner = NULL, lease_until = NULL, "
                "attempts = attempts - 1 WHERE owner = $1 AND sequence IS NULL "
                f"AND state = {_RUNNING}",
                owner,
            )
            if released:
                await conn.notify("released")
            return released

        return await self.db.transact(body)

    async def release_lapsed(self) -> int:
        """Items held by no gateway any more: for the one gateway of an SQLite file, every
        claim of a previous run (it was killed)."""
        return await self.db.execute(
            f"UPDATE items SET state = {_PENDING}, owner = NULL, lease_until = NULL "
            f"WHERE sequence IS NULL AND state = {_RUNNING}"
        )

    # --- results -----------------------------------------------------------------------

    async def record_results(
        self, owner: str, batch_id: str, results: list[ItemResult]
    ) -> tuple[list[ItemResult], StoredBatch | None]:
        """Stores the results of items `owner` holds, numbering them in order, and closes the
        batch when its last item is done; returns those stored (with their sequence) and the
        batch where this finished it."""

        async def body(conn: Connection) -> tuple[list[ItemResult], StoredBatch | None]:
            stored, finished = await self._finish(
                conn, batch_id, results, "owner = $6 AND state = " + str(_RUNNING), owner
            )
            # A result whose earlier recording committed unacknowledged (the connection
            # dropped at COMMIT) is there already, under this owner: it counts as stored.
            recorded = {id(result) for result in stored}
            for result in results:
                if id(result) not in recorded:
                    row = await conn.fetchrow(
                        "SELECT sequence FROM items WHERE batch_id = $1 AND idx = $2 "
                        "AND owner = $3 AND sequence IS NOT NULL",
                        batch_id,
                        result.index,
                        owner,
                    )
                    if row is not None:
                        result.sequence = row[0]
                        stored.append(result)
            return stored, finished

        return await self.db.transact(body)

    async def cancel(self, batch_id: str) -> StoredBatch | None:
        """Marks the batch cancelled and records a cancelled result for each item that is not
        running (and each whose gateway stopped renewing); the gateways running the others
        stop them and record theirs. None where there is no such batch."""
        now = self._clock()

        async def body(conn: Connection) -> StoredBatch | None:
            row = await conn.fetchrow(
                f"SELECT state FROM batches WHERE id = $1{self.db.for_update}", batch_id
            )
            if row is None:
                return None
            if row[0] == _IN_PROGRESS:
                await conn.execute(
                    "UPDATE batches SET state = $1 WHERE id = $2", _CANCELLING, batch_id
                )
                await conn.notify(f"cancel:{batch_id}")
            if row[0] in (_IN_PROGRESS, _CANCELLING):
                await self._cancel_unheld(conn, batch_id, now)
            refreshed = await conn.fetchrow(
                f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.id = $1", batch_id
            )
            assert refreshed is not None
            return _stored(refreshed)

        return await self.db.transact(body)

    async def sweep_cancelling(self) -> None:
        """Cancelled results for the items of cancelled batches whose gateway died."""
        now = self._clock()
        for row in await self.db.fetch(f"SELECT id FROM batches WHERE state = {_CANCELLING}"):

            async def body(conn: Connection, batch_id: str = row[0]) -> None:
                await conn.fetchrow(
                    f"SELECT id FROM batches WHERE id = $1{self.db.for_update}", batch_id
                )
                await self._cancel_unheld(conn, batch_id, now)

            await self.db.transact(body)

    async def _cancel_unheld(self, conn: Connection, batch_id: str, now: float) -> None:
        """Cancelled results for the batch's items that wait, or whose gateway stopped
        renewing their lease."""
        unheld = f"(state = {_PENDING} OR (state = {_RUNNING} AND lease_until < $2))"
        rows = await conn.fetch(
            "SELECT idx, custom_id, attempts, request FROM items WHERE batch_id = $1 "
            f"AND sequence IS NULL AND {unheld} ORDER BY idx",
            batch_id,
            now,
        )
        results = [
            ItemResult(
                row[1],
                row[0],
                ItemState.CANCELLED,
                row[2],
                request_from_bytes(bytes(row[3])).chat,
                error_code="CANCELLED",
                error_message="the batch was cancelled before this item finished",
            )
            for row in rows
        ]
        if results:
            await self._finish(conn, batch_id, results, unheld.replace("$2", "$6"), now)

    async def _finish(
        self,
        conn: Connection,
        batch_id: str,
        results: list[ItemResult],
        condition: str,
        argument: Any,
    ) -> tuple[list[ItemResult], StoredBatch | None]:
        row = await conn.fetchrow(
            f"SELECT last_sequence, total FROM batches WHERE id = $1{self.db.for_update}",
            batch_id,
        )
        if row is None:  # deleted meanwhile (retention)
            return [], None
        last, total = row
        stored = []
        for result in results:
            result.sequence = last + 1
            updated = await conn.execute(
                "UPDATE items SET state = $1, sequence = $2, result = $3, lease_until = NULL "
                "WHERE batch_id = $4 AND idx = $5 AND sequence IS NULL "
                f"AND {condition}",
                int(result.state),
                result.sequence,
                item_result_bytes(result),
                batch_id,
                result.index,
                argument,
            )
            if updated:
                last += 1
                stored.append(result)
        if not stored:
            return [], None
        counted = {column: 0 for column in _FINAL_COLUMN.values()}
        for result in stored:
            counted[_FINAL_COLUMN[result.state]] += 1
        await conn.execute(
            "UPDATE batches SET last_sequence = $1, succeeded = succeeded + $2, "
            "failed = failed + $3, cancelled = cancelled + $4 WHERE id = $5",
            last,
            counted["succeeded"],
            counted["failed"],
            counted["cancelled"],
            batch_id,
        )
        finished = None
        if last == total:  # every item holds one sequence number: this was the last
            await conn.execute(
                "UPDATE batches SET finished_at = $1, state = CASE state "
                f"WHEN {_IN_PROGRESS} THEN {int(BatchState.COMPLETED)} "
                f"ELSE {int(BatchState.CANCELLED)} END WHERE id = $2",
                self._clock(),
                batch_id,
            )
            refreshed = await conn.fetchrow(
                f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.id = $1", batch_id
            )
            finished = _stored(refreshed) if refreshed else None
        await conn.notify(f"result:{batch_id}")
        return stored, finished
