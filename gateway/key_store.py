"""API keys and their usage in the gateway's store (gateway.database). A key's secret is never
stored, only its SHA-256 (the secrets are 256 random bits, so a fast hash is as safe as a slow
one).

Where several gateways share the store, a key's limits are counted in it too: admission locks
the key's row, so gateways admit one request of a key at a time, reads the minute's request
starts and tokens, the day's tokens and the tokens reserved by requests in flight, and
reserves its own; settling turns the reservation into what was used. A reservation left by a
gateway that died lapses at its request's deadline.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from airouter.errors import AlreadyExists
from gateway.database import Connection, Database, Row


@dataclass(frozen=True)
class KeyLimits:
    """What a key may do; None: no limit."""

    models: tuple[str, ...] = ()  # shell-style patterns of the model names it may use; (): all
    rpm: int | None = None  # requests a minute
    tpm: int | None = None  # prompt and completion tokens a minute
    tokens_per_day: int | None = None  # prompt and completion tokens a UTC day
    cloud_budget_usd: float | None = None  # cloud spend, all time; past it: local models only
    expires_at: float | None = None  # seconds since the epoch


@dataclass(frozen=True)
class KeyRecord:
    name: str
    secret_sha256: str
    hint: str  # the secret's first characters, so people can tell keys apart
    limits: KeyLimits
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class UsageRow:
    name: str
    day: str  # UTC, YYYY-MM-DD
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cloud_cost_usd: float


@dataclass(frozen=True)
class Window:
    """What a key's limits are checked against at one moment."""

    starts: int  # requests started in the last minute
    oldest_start: float | None
    minute_tokens: int  # tokens used in the last minute
    oldest_tokens: float | None
    day_tokens: int  # tokens used today (UTC)
    reserved: int  # tokens held by requests in flight
    spend_usd: float  # cloud spend, all time


_START, _TOKENS = 0, 1  # key_events kinds


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, record: KeyRecord) -> None:
        """Stores a new key; a revoked key's name may be taken again (its usage stays)."""

        async def body(conn: Connection) -> None:
            existing = await conn.fetchrow(
                f"SELECT revoked_at FROM api_keys WHERE name = $1{self.db.for_update}",
                record.name,
            )
            if existing is not None and existing[0] is None:
                raise AlreadyExists(
                    f"a key named {record.name!r} exists; revoke it first or choose another name"
                )
            await conn.execute(
                "INSERT INTO api_keys (name, secret_sha256, hint, limits, created_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET "
                "secret_sha256 = excluded.secret_sha256, hint = excluded.hint, "
                "limits = excluded.limits, created_at = excluded.created_at, revoked_at = NULL",
                record.name,
                record.secret_sha256,
                record.hint,
                json.dumps(asdict(record.limits)),
                record.created_at,
            )
            await conn.notify("keys")

        await self.db.transact(body)

    async def revoke(self, name: str, at: float) -> bool:
        async def body(conn: Connection) -> bool:
            done = await conn.execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                at,
                name,
            )
            await conn.notify("keys")
            return done > 0

        return await self.db.transact(body)

    async def keys(self) -> list[KeyRecord]:
        rows = await self.db.fetch(
            "SELECT name, secret_sha256, hint, limits, created_at, revoked_at FROM api_keys "
            "ORDER BY name"
        )
        return [
            KeyRecord(name, sha, hint, _limits(limits), created, revoked)
            for name, sha, hint, limits, created, revoked in rows
        ]

    async def record(self, row: UsageRow) -> None:
        """Adds one request's usage to its key's day and model."""
        await self.db.transact(lambda conn: _add_usage(conn, row))

    async def usage(self, name: str | None = None, since_day: str = "") -> list[UsageRow]:
        """Usage per key, day and model, oldest day first; one key's with `name`."""
        query = (
            "SELECT name, day, model, requests, prompt_tokens, completion_tokens, cloud_cost_usd "
            "FROM key_usage WHERE day >= $1"
        )
        if name is not None:
            rows = await self.db.fetch(
                query + " AND name = $2 ORDER BY day, name, model", since_day, name
            )
        else:
            rows = await self.db.fetch(query + " ORDER BY day, name, model", since_day)
        return [_usage_row(row) for row in rows]

    async def spend(self) -> dict[str, float]:
        """Each key's cloud spend, all time."""
        rows = await self.db.fetch("SELECT name, SUM(cloud_cost_usd) FROM key_usage GROUP BY name")
        return {row[0]: float(row[1]) for row in rows}

    # --- limits counted in the store, for several gateways --------------------------

    async def admit(
        self,
        name: str,
        now: float,
        day: str,
        reservation: str,
        tokens: int,
        until: float,
        check: Callable[[Window], None],
    ) -> Window:
        """Checks the key's window (check raises to refuse) and, if it passes, counts the
        request's start and reserves `tokens` until `until`, all under the key's row lock."""

        async def body(conn: Connection) -> Window:
            await conn.fetchrow(
                f"SELECT name FROM api_keys WHERE name = $1{self.db.for_update}", name
            )
            await conn.execute(
                "DELETE FROM key_events WHERE name = $1 AND at <= $2", name, now - 60.0
            )
            await conn.execute(
                "DELETE FROM key_reservations WHERE name = $1 AND until < $2", name, now
            )
            events = await conn.fetch(
                "SELECT kind, COUNT(*), COALESCE(SUM(tokens), 0), MIN(at) FROM key_events "
                "WHERE name = $1 GROUP BY kind",
                name,
            )
            by_kind = {row[0]: row for row in events}
            reserved = await conn.fetchrow(
                "SELECT COALESCE(SUM(tokens), 0) FROM key_reservations WHERE name = $1", name
            )
            used = await conn.fetchrow(
                "SELECT COALESCE(SUM(CASE WHEN day = $2 THEN prompt_tokens + completion_tokens "
                "ELSE 0 END), 0), COALESCE(SUM(cloud_cost_usd), 0) FROM key_usage WHERE name = $1",
                name,
                day,
            )
            assert reserved is not None and used is not None
            starts, tokens_row = by_kind.get(_START), by_kind.get(_TOKENS)
            window = Window(
                starts=int(starts[1]) if starts else 0,
                oldest_start=starts[3] if starts else None,
                minute_tokens=int(tokens_row[2]) if tokens_row else 0,
                oldest_tokens=tokens_row[3] if tokens_row else None,
                day_tokens=int(used[0]),
                reserved=int(reserved[0]),
                spend_usd=float(used[1]),
            )
            check(window)
            await conn.execute(
                "INSERT INTO key_events (name, at, kind, tokens) VALUES ($1, $2, $3, 0)",
                name,
                now,
                _START,
            )
            await conn.execute(
                "INSERT INTO key_reservations (id, name, tokens, until) VALUES ($1, $2, $3, $4)",
                reservation,
                name,
                tokens,
                until,
            )
            return window

        return await self.db.transact(body)

    async def settle(self, reservation: str, row: UsageRow, at: float) -> None:
        """Ends a reservation: what the request used counts for the minute and the day."""

        async def body(conn: Connection) -> None:
            await conn.execute("DELETE FROM key_reservations WHERE id = $1", reservation)
            used = row.prompt_tokens + row.completion_tokens
            if used:
                await conn.execute(
                    "INSERT INTO key_events (name, at, kind, tokens) VALUES ($1, $2, $3, $4)",
                    row.name,
                    at,
                    _TOKENS,
                    used,
                )
            await _add_usage(conn, row)

        await self.db.transact(body)


async def _add_usage(conn: Connection, row: UsageRow) -> None:
    await conn.execute(
        "INSERT INTO key_usage (name, day, model, requests, prompt_tokens, "
        "completion_tokens, cloud_cost_usd) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (name, day, model) DO UPDATE SET "
        "requests = key_usage.requests + excluded.requests, "
        "prompt_tokens = key_usage.prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = key_usage.completion_tokens + excluded.completion_tokens, "
        "cloud_cost_usd = key_usage.cloud_cost_usd + excluded.cloud_cost_usd",
        row.name,
        row.day,
        row.model,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
        row.cloud_cost_usd,
    )


def _usage_row(row: Row) -> UsageRow:
    name, day, model, requests, prompt, completion, cost = row
    return UsageRow(name, day, model, int(requests), int(prompt), int(completion), float(cost))


def _limits(text: str) -> KeyLimits:
    fields = json.loads(text)
    fields["models"] = tuple(fields.get("models") or ())
    return KeyLimits(**fields)
