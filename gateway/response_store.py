"""Stored responses (the Responses API's `store`, on by default as OpenAI's): each response's
body and the conversation that led to it, so `previous_response_id` continues it and
`GET /v1/responses/{id}` returns it. Kept in the gateway's database (the batches' SQLite file,
its own table and connection) for `retention_s` (30 days by default, as OpenAI keeps them),
then deleted. All methods block: callers run them on a worker thread.
"""

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airouter.output import Turn, make_turn, turn_parts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    root TEXT NOT NULL,
    conversation TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""
# How often, at most, expired responses are deleted (on a write).
PURGE_EVERY_S = 3600.0


@dataclass(frozen=True)
class StoredResponse:
    id: str
    root: str  # the first response of its chain: the conversation's routing hint
    conversation: tuple[Turn, ...]  # every turn up to and including its answer
    body: dict[str, Any]


class ResponseStore:
    def __init__(self, path: Path, retention_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._retention_s = retention_s
        self._lock = threading.Lock()  # one connection, used from worker threads
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._purged = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, root, conversation, body FROM responses "
                "WHERE id = ? AND created_at > ?",
                (response_id, time.time() - self._retention_s),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], _turns(row[2]), json.loads(row[3]))

    def put(self, response: StoredResponse) -> None:
        now = time.time()
        conversation = json.dumps([list(turn_parts(t)) for t in response.conversation])
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, root, conversation, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (response.id, now, response.root, conversation, json.dumps(response.body)),
            )
            if now - self._purged > PURGE_EVERY_S:
                self._db.execute(
                    "DELETE FROM responses WHERE created_at <= ?", (now - self._retention_s,)
                )
                self._purged = now

    def delete(self, response_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            return deleted.rowcount > 0


def _turns(text: str) -> tuple[Turn, ...]:
    return tuple(
        make_turn(role, content, call_id, tuple((c[0], c[1], c[2]) for c in calls))
        for role, content, call_id, calls in json.loads(text)
    )
