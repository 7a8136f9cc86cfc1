"""Batches on disk: SQLite, one writer (this gateway), every result committed before it is
announced, so a gateway killed at any moment loses nothing and repeats no result.

An item's result is written in the same transaction that gives it its sequence number; an
item without a result is run again after a restart. All methods block: the runner calls them
on its own database thread.
"""

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.batch_records import BatchState, ItemResult, ItemState
from gateway.generation import GenerateRequest
from gateway.wire import (
    item_result_bytes,
    item_result_from_bytes,
    request_bytes,
    request_from_bytes,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    finished_at REAL,
    state INTEGER NOT NULL,
    total INTEGER NOT NULL,
    last_sequence INTEGER NOT NULL DEFAULT 0,
    trace_id TEXT NOT NULL DEFAULT '',
    span_id TEXT NOT NULL DEFAULT '',
    api_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL REFERENCES batches (id),
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    request BLOB NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sequence INTEGER,
    result BLOB,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS items_by_sequence ON items (batch_id, sequence);
"""


def _stored(row: tuple[Any, ...]) -> "StoredBatch":
    batch_id, created, finished, state, *rest = row
    return StoredBatch(batch_id, created, finished, BatchState(state), *rest)


class StoreLocked(Exception):
    """Another process runs the batches of this database."""


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
    api_key: str = ""  # the name of the key it was submitted with; its items count toward it


@dataclass
class PendingItem:
    index: int
    custom_id: str
    request: GenerateRequest
    attempts: int


class BatchStore:
    """The batches database at path, locked for this process for as long as it is open."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One gateway per database: two would run the same items twice.
        self._lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StoreLocked(
                f"{path} is in use by another gateway; give this one its own batch_db (--batch-db)"
            ) from None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL with fsync at every commit: a stored batch or result survives a power cut.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}
        if "api_key" not in columns:  # a database from before API keys
            self._db.execute("ALTER TABLE batches ADD COLUMN api_key TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self._db.close()
        os.close(self._lock)

    def add_batch(
        self,
        batch_id: str,
        items: list[tuple[str, GenerateRequest]],
        trace_id: str,
        span_id: str,
        api_key: str = "",
    ) -> StoredBatch:
        created = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO batches (id, created_at, state, total, trace_id, span_id, api_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    created,
                    BatchState.IN_PROGRESS,
                    len(items),
                    trace_id,
                    span_id,
                    api_key,
                ),
            )
            self._db.executemany(
                "INSERT INTO items (batch_id, idx, custom_id, request, state) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    (batch_id, i, custom_id, request_bytes(request), ItemState.PENDING)
                    for i, (custom_id, request) in enumerate(items)
                ),
            )
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

    def batch(self, batch_id: str) -> StoredBatch | None:
        row = self._db.execute(
            "SELECT id, created_at, finished_at, state, total, last_sequence, trace_id, span_id, "
            "api_key "
            "FROM batches WHERE id = ?",
            (batch_id,),
        ).fetchone()
        return _stored(row) if row else None

    def batches(self) -> list[StoredBatch]:
        rows = self._db.execute(
            "SELECT id, created_at, finished_at, state, total, last_sequence, trace_id, span_id, "
            "api_key "
            "FROM batches ORDER BY created_at DESC"
        ).fetchall()
        return [_stored(row) for row in rows]

    def same_items(self, batch_id: str, items: list[tuple[str, GenerateRequest]]) -> bool:
        """Whether the batch holds exactly these items (a submit sent again)."""
        rows = self._db.execute(
            "SELECT custom_id, request FROM items WHERE batch_id = ? ORDER BY idx", (batch_id,)
        )
        kept = [(row[0], bytes(row[1])) for row in rows]
        return kept == [(custom_id, request_bytes(request)) for custom_id, request in items]

    def item_states(self, batch_id: str) -> dict[ItemState, int]:
        """How many of the batch's items are in each state."""
        rows = self._db.execute(
            "SELECT state, COUNT(*) FROM items WHERE batch_id = ? GROUP BY state", (batch_id,)
        )
        return {ItemState(state): count for state, count in rows.fetchall()}

    def unfinished_items(self, batch_id: str) -> list[PendingItem]:
        """Items without a result, in batch order: those that were running when the gateway
        stopped are simply pending again."""
        rows = self._db.execute(
            "SELECT idx, custom_id, request, attempts FROM items "
            "WHERE batch_id = ? AND sequence IS NULL ORDER BY idx",
            (batch_id,),
        )
        return [
            PendingItem(
                idx,
                custom_id,
                request_from_bytes(request),
                attempts,
            )
            for idx, custom_id, request, attempts in rows
        ]

    def record_attempt_failed(self, batch_id: str, index: int, attempts: int) -> None:
        """An attempt failed and the item will be tried again."""
        with self._transaction():
            self._db.execute(
                "UPDATE items SET attempts = ? WHERE batch_id = ? AND idx = ?",
                (attempts, batch_id, index),
            )

    def record_results(self, batch_id: str, results: list[ItemResult]) -> list[ItemResult]:
        """Stores final results of items that have none yet, numbering them in order, and
        closes the batch when its last item is done; returns those stored (with sequence)."""
        stored = []
        with self._transaction():
            last, total = self._db.execute(
                "SELECT last_sequence, total FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            for result in results:
                result.sequence = last + 1
                updated = self._db.execute(
                    "UPDATE items SET state = ?, attempts = ?, sequence = ?, result = ? "
                    "WHERE batch_id = ? AND idx = ? AND sequence IS NULL",
                    (
                        result.state,
                        result.attempts,
                        result.sequence,
                        item_result_bytes(result),
                        batch_id,
                        result.index,
                    ),
                ).rowcount
                if updated:
                    last += 1
                    stored.append(result)
            self._db.execute("UPDATE batches SET last_sequence = ? WHERE id = ?", (last, batch_id))
            if last == total:  # every item holds one sequence number: this was the last
                self._db.execute(
                    "UPDATE batches SET finished_at = ?, state = CASE state WHEN ? THEN ? "
                    "ELSE ? END WHERE id = ?",
                    (
                        time.time(),
                        BatchState.IN_PROGRESS,
                        BatchState.COMPLETED,
                        BatchState.CANCELLED,
                        batch_id,
                    ),
                )
        return stored

    def delete_finished_before(self, cutoff: float) -> list[str]:
        """Deletes the batches (and their items) that finished before `cutoff` (epoch
        seconds); returns their ids."""
        with self._transaction():
            ids = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM batches WHERE finished_at IS NOT NULL AND finished_at < ?",
                    (cutoff,),
                )
            ]
            for batch_id in ids:
                self._db.execute("DELETE FROM items WHERE batch_id = ?", (batch_id,))
                self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        return ids

    def set_state(self, batch_id: str, state: BatchState) -> None:
        with self._transaction():
            self._db.execute("UPDATE batches SET state = ? WHERE id = ?", (state, batch_id))

    def results(self, batch_id: str, after_sequence: int, limit: int) -> list[ItemResult]:
        rows = self._db.execute(
            "SELECT result FROM items WHERE batch_id = ? AND sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (batch_id, after_sequence, limit),
        )
        return [item_result_from_bytes(row[0]) for row in rows]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
