"""The gateway's store on both backends, SQLite and a real PostgreSQL: migrations, and the
batch items' claims, leases and results that let several gateways share one database."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from airouter.v1 import gateway_pb2
from gateway.batch_records import BatchState, ItemResult, ItemState
from gateway.batch_store import BatchStore
from gateway.database import Database, SQLiteDatabase, StoreLocked, open_database
from gateway.generation import GenerateRequest
from gateway.schema import VERSION, SchemaTooNew, migrate
from gateway.wire import item_result_bytes, request_bytes
from tests.processes import BIN

MODEL = "gemma-3-270m"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def with_database(url: str, body: Callable[[Database], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        database = await open_database(url)
        try:
            await migrate(database)
            return await body(database)
        finally:
            await database.close()

    return asyncio.run(run())


def items(count: int, model: str = MODEL) -> list[tuple[str, GenerateRequest]]:
    return [(f"i{i}", GenerateRequest(model, prompt=f"p{i}")) for i in range(count)]


def succeeded(index: int) -> ItemResult:
    return ItemResult(f"i{index}", index, ItemState.SUCCEEDED, 1, False, text="ok")


def test_migrations_run_once(store_url: str) -> None:
    async def body(database: Database) -> None:
        assert await migrate(database) == VERSION  # already there: nothing to do
        rows = await database.fetch("SELECT version FROM schema_version")
        assert [tuple(r) for r in rows] == [(VERSION,)]

    with_database(store_url, body)


def test_a_schema_newer_than_the_gateway_is_refused(store_url: str) -> None:
    async def newer(database: Database) -> None:
        await database.execute("UPDATE schema_version SET version = $1", VERSION + 1)

    with_database(store_url, newer)
    with pytest.raises(SchemaTooNew, match=f"schema version {VERSION + 1}, newer than"):
        with_database(store_url, lambda database: asyncio.sleep(0))


def test_gateways_starting_together_create_the_schema_once(postgres_url: str) -> None:
    async def run() -> list[int]:
        databases = await asyncio.gather(*(open_database(postgres_url) for _ in range(4)))
        try:
            return list(await asyncio.gather(*(migrate(d) for d in databases)))
        finally:
            await asyncio.gather(*(d.close() for d in databases))

    found = asyncio.run(run())
    assert sorted(found) == [0, VERSION, VERSION, VERSION]  # one made it; the rest found it

    async def versions(database: Database) -> None:
        rows = await database.fetch("SELECT version FROM schema_version")
        assert [tuple(r) for r in rows] == [(VERSION,)]

    with_database(postgres_url, versions)


def test_a_second_gateway_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        first = await open_database(str(tmp_path / "g.sqlite3"))
        try:
            with pytest.raises(StoreLocked, match="postgresql://"):
                await open_database(f"sqlite://{tmp_path / 'g.sqlite3'}")
        finally:
            await first.close()

    asyncio.run(run())


def test_an_sqlite_file_from_before_schema_versions_is_adopted(tmp_path: Path) -> None:
    """A gateway's file from before this change (version 1's tables, no api_key column, a
    batch half done) keeps its batches, which run on."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE batches (id TEXT PRIMARY KEY, created_at REAL NOT NULL, finished_at REAL,
            state INTEGER NOT NULL, total INTEGER NOT NULL,
            last_sequence INTEGER NOT NULL DEFAULT 0, trace_id TEXT NOT NULL DEFAULT '',
            span_id TEXT NOT NULL DEFAULT '');
        CREATE TABLE items (batch_id TEXT NOT NULL REFERENCES batches (id), idx INTEGER NOT NULL,
            custom_id TEXT NOT NULL, request BLOB NOT NULL, state INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, sequence INTEGER, result BLOB,
            PRIMARY KEY (batch_id, idx));
        """
    )
    old.execute("INSERT INTO batches VALUES ('b1', 1.0, NULL, 1, 2, 1, '', '')")
    done = succeeded(0)
    done.sequence = 1
    old.execute(
        "INSERT INTO items VALUES ('b1', 0, 'i0', ?, 3, 1, 1, ?)",
        (request_bytes(items(1)[0][1]), item_result_bytes(done)),
    )
    old.execute(
        "INSERT INTO items VALUES ('b1', 1, 'i1', ?, 1, 0, NULL, NULL)",
        (request_bytes(items(2)[1][1]),),
    )
    old.commit()
    old.close()

    async def body(database: Database) -> None:
        store = BatchStore(database)
        batch = await store.batch("b1")
        assert batch is not None and batch.api_key == "" and batch.succeeded == 1
        assert batch.counts().pending == 1
        [claimed] = await store.claim("me", MODEL, 10, 30.0)
        assert (claimed.custom_id, claimed.attempts) == ("i1", 1)
        stored, finished = await store.record_results("me", "b1", [succeeded(1)])
        assert [r.sequence for r in stored] == [2]
        assert finished is not None and finished.state is BatchState.COMPLETED

    with_database(str(path), body)


def test_claims_lease_items_and_skip_those_held(store_url: str) -> None:
    clock = Clock()

    async def body(database: Database) -> None:
        store = BatchStore(database, clock)
        assert await store.add_batch("b1", items(10), "", "") is not None
        assert await store.add_batch("b1", items(10), "", "") is None  # exists
        # Gateways claiming at once take disjoint items.
        claims = await asyncio.gather(*(store.claim(f"g{n}", MODEL, 3, 30.0) for n in range(4)))
        taken = [(c.batch_id, c.index) for claim in claims for c in claim]
        assert len(taken) == len(set(taken)) == 10
        assert (await store.waiting()).models == []
        batch = await store.batch("b1")
        assert batch is not None and batch.counts().running == 10
        assert await store.claim("g9", MODEL, 10, 30.0) == []
        # Renewed leases hold; the owner of g0's items may be anyone else once they lapse.
        clock.now += 20
        held, cancelling = await store.renew("g0", 30.0)
        assert held == {(c.batch_id, c.index) for c in claims[0]} and not cancelling
        clock.now += 20  # g1..g3 did not renew: theirs lapsed; g0's run to +50
        retaken = await store.claim("g9", MODEL, 10, 30.0)
        assert sorted(c.index for c in retaken) == sorted(
            c.index for claim in claims[1:] for c in claim
        )
        assert all(c.attempts == 2 for c in retaken)  # the lapsed attempt counts
        # A gateway that lost its item has its result refused: recorded once, by the holder.
        lost = claims[1][0].index
        assert await store.record_results("g1", "b1", [succeeded(lost)]) == ([], None)
        stored, _ = await store.record_results("g9", "b1", [succeeded(lost)])
        assert [r.sequence for r in stored] == [1]
        # Recording it again (its first COMMIT went unanswered) finds it there, counted once.
        again, _ = await store.record_results("g9", "b1", [succeeded(lost)])
        assert [r.sequence for r in again] == [1]
        batch = await store.batch("b1")
        assert batch is not None and batch.succeeded == 1 and batch.last_sequence == 1

    with_database(store_url, body)


def test_cancel_settles_waiting_items_and_leaves_held_ones_to_their_gateway(
    store_url: str,
) -> None:
    clock = Clock()

    async def body(database: Database) -> None:
        store = BatchStore(database, clock)
        told = asyncio.Event()

        def heard(payload: str) -> None:
            if payload == "cancel:b1":
                told.set()

        database.on_notify(heard)
        await store.add_batch("b1", items(5), "", "")
        held = await store.claim("a", MODEL, 2, 30.0)
        cancelled = await store.cancel("b1")
        assert cancelled is not None and cancelled.state is BatchState.CANCELLING
        assert cancelled.counts().cancelled == 3 and cancelled.counts().running == 2
        # The holder hears of it (here at once; on PostgreSQL once NOTIFY arrives).
        async with asyncio.timeout(10):
            await told.wait()
        _, cancelling = await store.renew("a", 30.0)
        assert cancelling == {"b1"}
        assert await store.claim("b", MODEL, 5, 30.0) == []  # nothing of it starts again
        # One holder answers; the other died: its item is settled when the lease lapses.
        gone = ItemResult("i0", held[0].index, ItemState.CANCELLED, 1, False)
        await store.record_results("a", "b1", [gone])
        clock.now += 31
        await store.sweep_cancelling()
        final = await store.batch("b1")
        assert final is not None and final.state is BatchState.CANCELLED
        assert final.counts().cancelled == 5 and final.finished_at is not None
        results = await store.results("b1", 0, 10)
        assert [r.sequence for r in results] == [1, 2, 3, 4, 5]
        assert await store.cancel("missing") is None

    with_database(store_url, body)


def test_released_items_wait_out_their_backoff_and_a_stopping_gateway_gives_all_back(
    store_url: str,
) -> None:
    clock = Clock()

    async def body(database: Database) -> None:
        store = BatchStore(database, clock)
        await store.add_batch("b1", items(3), "", "")
        # Items due now wait for room, not for a time: nothing to wake up for (the dispatcher
        # once polled every 10 ms while items waited for a slot).
        assert (await store.waiting()).next_due_at is None
        first, second, third = await store.claim("a", MODEL, 3, 30.0)
        await store.release("a", "b1", first.index, clock.now + 5)
        waiting = await store.waiting()
        assert waiting.models == [] and waiting.next_due_at == clock.now + 5
        clock.now += 6
        [again] = await store.claim("b", MODEL, 3, 30.0)
        assert (again.index, again.attempts) == (first.index, 2)
        assert await store.release_all("a") == 2
        back = await store.claim("b", MODEL, 3, 30.0)
        assert sorted(c.index for c in back) == [second.index, third.index]
        assert all(c.attempts == 1 for c in back)  # a stop is not the item's attempt

    with_database(store_url, body)


def test_results_finish_the_batch_and_old_batches_are_pruned(store_url: str) -> None:
    clock = Clock()

    async def body(database: Database) -> None:
        store = BatchStore(database, clock)
        await store.add_batch("b1", items(2), "trace", "span", api_key="team")
        await store.add_batch("b2", items(1, model="other"), "", "")
        claimed = await store.claim("a", MODEL, 5, 30.0)
        assert [c.index for c in claimed] == [0, 1]
        assert (await store.waiting()).models == [("other", 1)]
        stored, finished = await store.record_results(
            "a", "b1", [succeeded(1), ItemResult("i0", 0, ItemState.FAILED, 1, False)]
        )
        assert [(r.index, r.sequence) for r in stored] == [(1, 1), (0, 2)]
        assert finished is not None and finished.state is BatchState.COMPLETED
        assert (finished.succeeded, finished.failed, finished.api_key) == (1, 1, "team")
        totals = await store.item_totals()
        assert totals[ItemState.SUCCEEDED] == 1 and totals[ItemState.PENDING] == 1
        page = await store.results("b1", 1, 10)
        assert [r.custom_id for r in page] == ["i0"]
        assert page[0].state == gateway_pb2.BATCH_ITEM_STATE_FAILED
        clock.now += 100
        assert await store.delete_finished_before(clock.now - 50) == ["b1"]
        assert [b.id for b in await store.batches()] == ["b2"]

    with_database(store_url, body)


def test_a_gateway_refuses_a_newer_store_one_it_cannot_reach_or_a_bad_url_in_one_line(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "newer.sqlite3")

    async def newer(database: Database) -> None:
        await database.execute("UPDATE schema_version SET version = $1", VERSION + 1)

    with_database(store, newer)
    unreachable = f"postgresql://nobody@/airouter?host={tmp_path / 'no-such-socket-dir'}"
    for where, says in (
        (store, f"has schema version {VERSION + 1}, newer than this gateway's {VERSION}"),
        (unreachable, "cannot reach the store"),
        ("ftp://host/db", "use a file path, sqlite:///path or postgresql://user@host/db"),
        ("sqlite://relative.db", "write sqlite:///absolute/path"),
    ):
        refused = subprocess.run(
            [str(BIN / "gateway"), "serve", "--listen", "127.0.0.1:0", "--store", where],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2, refused.stderr
        assert says in refused.stderr and "Traceback" not in refused.stderr


def test_a_transaction_cancelled_while_it_begins_leaves_none_open(tmp_path: Path) -> None:
    """A gateway stopping cancels its tasks mid-transaction, even while SQLite runs their BEGIN
    on its thread: the next transaction must still begin (it once found one open)."""

    class SlowBegin:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn
            self.begun, self.go = threading.Event(), threading.Event()

        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql == "BEGIN IMMEDIATE" and not self.go.is_set():
                self.begun.set()
                self.go.wait(10)
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    async def body(database: Database) -> None:
        assert isinstance(database, SQLiteDatabase)
        store = BatchStore(database)
        await store.add_batch("b1", items(2), "", "")
        slow = SlowBegin(database._conn)
        database._conn = slow  # type: ignore[assignment]
        task = asyncio.create_task(store.claim("a", MODEL, 1, 30.0))
        assert await asyncio.to_thread(slow.begun.wait, 10)
        task.cancel()
        slow.go.set()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        batch = await store.batch("b1")  # a new transaction begins
        assert batch is not None and batch.counts().running == 0
        assert not slow.conn.in_transaction
        database._conn = slow.conn

    with_database(str(tmp_path / "g.sqlite3"), body)
