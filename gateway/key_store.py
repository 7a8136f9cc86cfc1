"""API keys and their usage on disk: the gateway's database (the batches' SQLite file, tables
of its own and a connection of its own). A key's secret is never stored, only its SHA-256
(the secrets are 256 random bits, so a fast hash is as safe as a slow one). All methods block:
callers run them on a worker thread, or at start.
"""

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from airouter.errors import AlreadyExists

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    limits TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS key_usage (
    name TEXT NOT NULL,
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cloud_cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (name, day, model)
);
"""


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


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, record: KeyRecord) -> None:
        """Stores a new key; a revoked key's name may be taken again (its usage stays)."""
        row = (
            record.name,
            record.secret_sha256,
            record.hint,
            json.dumps(asdict(record.limits)),
            record.created_at,
        )
        with self._lock:
            existing = self._db.execute(
                "SELECT revoked_at FROM api_keys WHERE name = ?", (record.name,)
            ).fetchone()
            if existing is not None and existing[0] is None:
                raise AlreadyExists(
                    f"a key named {record.name!r} exists; revoke it first or choose another name"
                )
            self._db.execute(
                "INSERT OR REPLACE INTO api_keys (name, secret_sha256, hint, limits, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            )

    def revoke(self, name: str, at: float) -> bool:
        with self._lock:
            done = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (at, name),
            )
            return done.rowcount > 0

    def keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, secret_sha256, hint, limits, created_at, revoked_at FROM api_keys "
                "ORDER BY name"
            ).fetchall()
        return [
            KeyRecord(name, sha, hint, _limits(limits), created, revoked)
            for name, sha, hint, limits, created, revoked in rows
        ]

    def record(self, row: UsageRow) -> None:
        """Adds one request's usage to its key's day and model."""
        with self._lock:
            self._db.execute(
                "INSERT INTO key_usage (name, day, model, requests, prompt_tokens, "
                "completion_tokens, cloud_cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name, day, model) DO UPDATE SET "
                "requests = requests + excluded.requests, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "cloud_cost_usd = cloud_cost_usd + excluded.cloud_cost_usd",
                (
                    row.name,
                    row.day,
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.cloud_cost_usd,
                ),
            )

    def usage(self, name: str | None = None, since_day: str = "") -> list[UsageRow]:
        """Usage per key, day and model, oldest day first; one key's with `name`."""
        query = (
            "SELECT name, day, model, requests, prompt_tokens, completion_tokens, cloud_cost_usd "
            "FROM key_usage WHERE day >= ?"
        )
        parameters: tuple[str, ...] = (since_day,)
        if name is not None:
            query += " AND name = ?"
            parameters += (name,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY day, name, model", parameters).fetchall()
        return [UsageRow(*row) for row in rows]


def _limits(text: str) -> KeyLimits:
    fields = json.loads(text)
    fields["models"] = tuple(fields.get("models") or ())
    return KeyLimits(**fields)
