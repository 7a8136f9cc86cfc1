"""The gateway database's tables, as numbered migrations run at start.

Every gateway runs `migrate` before it serves: the version is read and the missing migrations
applied in one transaction, under PostgreSQL's advisory lock, so gateways starting together
create the schema once (the others wait, then find it done). A database whose version is
newer than this gateway knows is refused: a gateway must not write into a schema it cannot
read. SQLite files from before the versions (they held version 1's tables) are adopted as
version 1.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from airouter.v1 import gateway_pb2
from gateway.database import Connection, Database

# pg_advisory_xact_lock's key for migrations: any constant no other program on the database uses.
_MIGRATION_LOCK = 0x61697230  # "air0"

_TYPES = {
    "sqlite": {"BLOB": "BLOB", "FLOAT": "REAL", "BIGINT": "INTEGER"},
    "postgresql": {"BLOB": "BYTEA", "FLOAT": "DOUBLE PRECISION", "BIGINT": "BIGINT"},
}

_V1 = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at {FLOAT} NOT NULL,
    finished_at {FLOAT},
    state INTEGER NOT NULL,
    total INTEGER NOT NULL,
    last_sequence {BIGINT} NOT NULL DEFAULT 0,
    trace_id TEXT NOT NULL DEFAULT '',
    span_id TEXT NOT NULL DEFAULT '',
    api_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL REFERENCES batches (id),
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    request {BLOB} NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sequence {BIGINT},
    result {BLOB},
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS items_by_sequence ON items (batch_id, sequence);
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    limits TEXT NOT NULL,
    created_at {FLOAT} NOT NULL,
    revoked_at {FLOAT}
);
CREATE TABLE IF NOT EXISTS key_usage (
    name TEXT NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    requests {BIGINT} NOT NULL DEFAULT 0,
    prompt_tokens {BIGINT} NOT NULL DEFAULT 0,
    completion_tokens {BIGINT} NOT NULL DEFAULT 0,
    cloud_cost_usd {FLOAT} NOT NULL DEFAULT 0,
    PRIMARY KEY (name, day, model)
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at {FLOAT} NOT NULL,
    root TEXT NOT NULL,
    conversation TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes {BIGINT} NOT NULL,
    created_at {FLOAT} NOT NULL
);
CREATE TABLE IF NOT EXISTS openai_batches (
    id TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at {FLOAT} NOT NULL
);
"""

# Items claimed under leases by any gateway; a batch's counts kept with it; per-key limits
# counted in the database; uploaded files' contents in it (PostgreSQL; SQLite keeps them on
# disk beside its file).
_V2 = """
ALTER TABLE items ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE items ADD COLUMN owner TEXT;
ALTER TABLE items ADD COLUMN lease_until {FLOAT};
ALTER TABLE items ADD COLUMN not_before {FLOAT} NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN succeeded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN cancelled INTEGER NOT NULL DEFAULT 0;
CREATE INDEX items_waiting ON items (model) WHERE sequence IS NULL;
CREATE INDEX items_unfinished ON items (batch_id, state) WHERE sequence IS NULL;
CREATE INDEX items_owned ON items (owner) WHERE sequence IS NULL;
CREATE TABLE key_events (
    name TEXT NOT NULL,
    at {FLOAT} NOT NULL,
    kind INTEGER NOT NULL,
    tokens {BIGINT} NOT NULL
);
CREATE INDEX key_events_by_key ON key_events (name, at);
CREATE TABLE key_reservations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tokens {BIGINT} NOT NULL,
    until {FLOAT} NOT NULL
);
CREATE INDEX key_reservations_by_key ON key_reservations (name);
CREATE TABLE file_chunks (
    file_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    data {BLOB} NOT NULL,
    created_at {FLOAT} NOT NULL,
    PRIMARY KEY (file_id, n)
);
"""


async def _v1(conn: Connection, dialect: str) -> None:
    await _script(conn, dialect, _V1)
    if dialect == "sqlite":  # a file from before API keys lacks the batches' api_key
        columns = {row[1] for row in await conn.fetch("PRAGMA table_info(batches)")}
        if "api_key" not in columns:
            await conn.execute("ALTER TABLE batches ADD COLUMN api_key TEXT NOT NULL DEFAULT ''")


async def _v2(conn: Connection, dialect: str) -> None:
    await _script(conn, dialect, _V2)
    # Items stored before: their model, for claims by model, read from their requests.
    rows = await conn.fetch("SELECT batch_id, idx, request FROM items WHERE sequence IS NULL")
    await conn.executemany(
        "UPDATE items SET model = $1 WHERE batch_id = $2 AND idx = $3",
        [
            (gateway_pb2.GatewayGenerateRequest.FromString(bytes(r[2])).model, r[0], r[1])
            for r in rows
        ],
    )
    for column, state in (("succeeded", 3), ("failed", 4), ("cancelled", 5)):
        await conn.execute(
            f"UPDATE batches SET {column} = (SELECT COUNT(*) FROM items "
            f"WHERE items.batch_id = batches.id AND items.state = {state} "
            "AND items.sequence IS NOT NULL)"
        )


MIGRATIONS: list[Callable[[Connection, str], Awaitable[None]]] = [_v1, _v2]
VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was made by a newer gateway."""


async def migrate(db: Database) -> int:
    """Brings the database to VERSION; returns the version it was at."""

    async def body(conn: Connection) -> int:
        if db.dialect == "postgresql":
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = await conn.fetchrow("SELECT MAX(version) FROM schema_version")
        found = row[0] if row and row[0] is not None else 0
        if found == 0 and db.dialect == "sqlite":
            # A file from before versions held version 1's batches table, or nothing.
            old = await conn.fetchrow(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'batches'"
            )
            found = 1 if old and old[0] else 0
            if found:
                await _v1(conn, db.dialect)  # its other tables, where it lacked them
        if found > VERSION:
            raise SchemaTooNew(
                f"the store {db.described} has schema version {found}, newer than this "
                f"gateway's {VERSION}: run the newer gateway, or give this one another store"
            )
        for version in range(found + 1, VERSION + 1):
            await MIGRATIONS[version - 1](conn, db.dialect)
        if found != VERSION:
            await conn.execute("DELETE FROM schema_version")
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", VERSION)
        return found

    return await db.transact(body)


async def _script(conn: Connection, dialect: str, script: str) -> None:
    for statement in script.format(**_TYPES[dialect]).split(";"):
        if statement.strip():
            await conn.execute(statement)
