"""The gateway's shared state lives in one database: SQLite, embedded and the default (one
gateway per file), or PostgreSQL, where any number of gateways are active at once.

Both speak the same SQL through one small interface: statements are written with PostgreSQL's
numbered parameters ($1, $2, ...), which SQLite reads as ?1, ?2, ...; multi-statement work runs
in `transact(body)`, retried when PostgreSQL reports a serialization failure or a deadlock.
SQLite runs on a thread of its own, one statement at a time, off the event loop; PostgreSQL
through a pool of asyncpg connections. A database that cannot be reached raises
StoreUnavailable (UNAVAILABLE, saying what to do), and `reachable` says how the last
statement went, for /ready and the status page.

Changes other gateways must hear of at once (a result recorded, a batch cancelled) are sent
with `notify` inside the transaction that makes them: PostgreSQL's NOTIFY, delivered on
commit to every gateway's listening connection; SQLite has only this process to tell. Readers
that wait for changes also poll (see gateway.batches), so a notification lost while a
connection was down delays them, never stops them.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sqlite3
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from airouter.errors import Unavailable

_log = structlog.get_logger()
T = TypeVar("T")
Row = Sequence[Any]

CHANNEL = "airouter"  # the one NOTIFY channel; payloads say what changed
# Seconds to wait for a connection or a statement before calling the database unreachable.
CONNECT_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 30.0
_PARAMETER = re.compile(r"\$(\d+)")


class StoreUnavailable(Unavailable):
    """The database cannot be reached (or did not answer in time)."""


class StoreLocked(Exception):
    """Another gateway has this SQLite file."""


class Connection(ABC):
    """Statements inside one transaction."""

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Runs a statement; returns the rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    @abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    async def notify(self, payload: str) -> None:
        """Tells every gateway on this database (this one too), once the transaction commits."""


class Database(ABC):
    dialect: str  # "sqlite" or "postgresql"
    described: str  # where it is, without a password: for logs and the status page
    # Appended to a SELECT: rows this transaction will change, locked until it ends (other
    # gateways wait), or claimed (other gateways skip them). SQLite has one writer anyway.
    for_update: str = ""

    def skip_locked(self, alias: str) -> str:
        return ""

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []
        self.reachable = True
        self.unreachable_since: float | None = None

    @abstractmethod
    async def transact(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        """Runs body in one transaction, committed when it returns."""

    async def execute(self, sql: str, *args: Any) -> int:
        return await self.transact(lambda c: c.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self.transact(lambda c: c.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self.transact(lambda c: c.fetchrow(sql, *args))

    @abstractmethod
    async def close(self) -> None: ...

    def on_notify(self, listener: Callable[[str], None]) -> None:
        """Calls listener(payload) on the event loop for every notification."""
        self._listeners.append(listener)

    def _deliver(self, payload: str) -> None:
        for listener in self._listeners:
            try:
                listener(payload)
            except Exception:  # one listener's bug must not silence the others
                _log.error("notification_listener_failed", payload=payload[:80], exc_info=False)

    def _went(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        if reachable:
            _log.info("store_reachable", store=self.described)
            self.unreachable_since = None
        else:
            _log.warning("store_unreachable", store=self.described, error=_short(error))
            self.unreachable_since = time.time()

    def state(self) -> dict[str, Any]:
        return {
            "backend": self.dialect,
            "where": self.described,
            "reachable": self.reachable,
            "unreachable_since": self.unreachable_since,
        }


def _short(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"[:300] if error is not None else ""


def sqlite_path(url: str) -> str | None:
    """The file of an SQLite store (a path or sqlite:///path); None for PostgreSQL. Raises
    ValueError, saying what to write, for any other URL."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return None
    if scheme == "sqlite":
        path = url[len("sqlite://") :]
        if not path.startswith("/"):
            raise ValueError(f"{url}: write sqlite:///absolute/path, or give the path alone")
        return path
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise ValueError(
            f"the store {url!r}: use a file path, sqlite:///path or postgresql://user@host/db"
        )
    return url


async def open_database(url: str) -> Database:
    """A file path or sqlite:///path, or postgresql://... (postgres:// too)."""
    path = sqlite_path(url)
    if path is None:
        return await PostgresDatabase.open(url)
    return await SQLiteDatabase.open(path)


# --- SQLite ------------------------------------------------------------------------------


class _SQLiteConnection(Connection):
    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self.notifications: list[str] = []

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._db._run(lambda: self._db._conn.execute(_sqlite(sql), args).rowcount)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._db._run(lambda: self._db._conn.execute(_sqlite(sql), args).fetchall())

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._db._run(lambda: self._db._conn.executemany(_sqlite(sql), rows))

    async def notify(self, payload: str) -> None:
        self.notifications.append(payload)


_converted: dict[str, str] = {}


def _sqlite(sql: str) -> str:
    converted = _converted.get(sql)
    if converted is None:
        converted = _converted[sql] = _PARAMETER.sub(r"?\1", sql)
    return converted


class SQLiteDatabase(Database):
    """One file, one gateway: a lock beside it keeps a second one out (it would run the same
    batch items twice)."""

    dialect = "sqlite"

    def __init__(self, path: Path, lock: int, conn: sqlite3.Connection) -> None:
        super().__init__()
        self.path = path
        self.described = str(path)
        self._lock_fd = lock
        self._conn = conn
        # One statement at a time on its own thread; one transaction at a time.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._serial = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> SQLiteDatabase:
        return await asyncio.get_running_loop().run_in_executor(None, cls._open, path)

    @classmethod
    def _open(cls, where: str) -> SQLiteDatabase:
        path = Path(where).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise StoreLocked(
                f"{path} is in use by another gateway; give this one its own store "
                "(--store PATH), or run both on PostgreSQL (--store postgresql://...)"
            ) from None
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL with fsync at every commit: a stored batch or result survives a power cut.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return cls(path, lock, conn)

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def transact(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        conn = _SQLiteConnection(self)
        loop = asyncio.get_running_loop()
        async with self._serial:
            try:
                await self._run(lambda: self._conn.execute("BEGIN IMMEDIATE"))
                result = await body(conn)
            except BaseException:
                # Even when cancelled (BEGIN may be running still): queued behind it on the
                # one thread, so the next transaction finds none open.
                await asyncio.shield(loop.run_in_executor(self._executor, self._end, False))
                raise
            await asyncio.shield(loop.run_in_executor(self._executor, self._end, True))
        for payload in conn.notifications:
            self._deliver(payload)
        return result

    def _end(self, commit: bool) -> None:
        if not self._conn.in_transaction:
            return
        if commit:
            try:
                self._conn.execute("COMMIT")
                return
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self._conn.execute("ROLLBACK")

    async def close(self) -> None:
        """Closes the file and lets another gateway have it (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        async with self._serial:
            await self._run(self._conn.close)
        self._executor.shutdown()
        os.close(self._lock_fd)


# --- PostgreSQL ---------------------------------------------------------------------------


class _PostgresConnection(Connection):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(sql, *args)
        tail = status.rsplit(" ", 1)[-1]  # "UPDATE 3", "INSERT 0 1", "CREATE TABLE"
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(sql, *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def notify(self, payload: str) -> None:
        await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


class PostgresDatabase(Database):
    """A pool of asyncpg connections, and one more that LISTENs, reconnected with backoff."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"
    POOL_SIZE = 8

    def skip_locked(self, alias: str) -> str:
        return f" FOR UPDATE OF {alias} SKIP LOCKED"

    def __init__(self, dsn: str, pool: Any) -> None:
        super().__init__()
        self._dsn = dsn
        self._pool = pool
        self.described = _without_password(dsn)
        self._listening: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def open(cls, dsn: str) -> PostgresDatabase:
        import asyncpg  # only where PostgreSQL is used

        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=cls.POOL_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=STATEMENT_TIMEOUT_S,
            )
        except _connection_errors() as exc:
            raise StoreUnavailable(
                f"cannot reach the store {_without_password(dsn)}: {_short(exc)}; check that "
                "PostgreSQL runs there and the URL's user, password and database"
            ) from None
        database = cls(dsn, pool)
        database._listening = asyncio.create_task(database._listen_forever())
        return database

    async def transact(self, body: Callable[[Connection], Awaitable[T]]) -> T:
        import asyncpg

        retryable = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)
        for attempt in range(4):
            try:
                async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                    try:
                        async with conn.transaction():
                            result = await body(_PostgresConnection(conn))
                    except Exception as exc:
                        if conn.is_closed() or isinstance(exc, _broken_connection()):
                            conn.terminate()  # the pool opens a new one when next asked
                            raise _Lost(exc) from None
                        raise
            except retryable:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.01 * 2**attempt)
                continue
            except _unreachable() as exc:
                cause = exc.cause if isinstance(exc, _Lost) else exc
                self._went(False, cause)
                raise StoreUnavailable(
                    f"the store {self.described} is unreachable ({_short(cause)}); retry shortly"
                ) from None
            self._went(True)
            return result
        raise AssertionError("unreachable")

    async def _listen_forever(self) -> None:
        """Keeps one connection LISTENing; while it is down, readers rely on their polls."""
        import asyncpg

        delay = 0.1
        while not self._closing:
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, lambda *a: self._deliver(a[3]))
                delay = 0.1
                # A connection dropped without a FIN shows only when it is used.
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 5.0)
                    except TimeoutError:
                        await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    _log.info("store_listener_reconnecting", error=_short(exc), in_s=delay)
            finally:
                if conn is not None:
                    conn.terminate()
            if not self._closing:
                # Something may have changed unheard: wake the readers once.
                self._deliver("")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_S)
        except _connection_errors():  # TimeoutError among them
            self._pool.terminate()


class _Lost(Exception):
    """A statement failed because its connection did."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


def _unreachable() -> tuple[type[BaseException], ...]:
    return (*_connection_errors(), _Lost)


def _broken_connection() -> tuple[type[BaseException], ...]:
    import asyncpg

    # A connection that failed mid-operation can be left unusable ("another operation is in
    # progress"): it is dropped, not reused.
    return (*_connection_errors(), asyncpg.InternalClientError)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        OSError,
        TimeoutError,
        asyncpg.PostgresConnectionError,  # refused, reset, or closed under us
        asyncpg.exceptions.OperatorInterventionError,  # the server is shutting down or starting
        asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    )


def _without_password(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
