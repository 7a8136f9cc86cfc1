"""Stored responses (the Responses API's `store`, on by default as OpenAI's): each response's
body and the conversation that led to it, so `previous_response_id` continues it (through
any gateway on the store) and `GET /v1/responses/{id}` returns it. Kept in the gateway's store
for `retention_s` (30 days by default, as OpenAI keeps them), then deleted.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

from airouter.output import Turn, make_turn, turn_parts
from gateway.database import Connection, Database

# How often, at most, expired responses are deleted (on a write).
PURGE_EVERY_S = 3600.0


@dataclass(frozen=True)
class StoredResponse:
    id: str
    root: str  # the first response of its chain: the conversation's routing hint
    conversation: tuple[Turn, ...]  # every turn up to and including its answer
    body: dict[str, Any]


class ResponseStore:
    def __init__(self, db: Database, retention_s: float) -> None:
        self._db = db
        self._retention_s = retention_s
        self._purged = 0.0

    async def get(self, response_id: str) -> StoredResponse | None:
        row = await self._db.fetchrow(
            "SELECT id, root, conversation, body FROM responses WHERE id = $1 AND created_at > $2",
            response_id,
            time.time() - self._retention_s,
        )
        if row is None:
            return None
        return StoredResponse(row[0], row[1], _turns(row[2]), json.loads(row[3]))

    async def put(self, response: StoredResponse) -> None:
        now = time.time()
        conversation = json.dumps([list(turn_parts(t)) for t in response.conversation])
        purge = now - self._purged > PURGE_EVERY_S
        if purge:
            self._purged = now

        async def body(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO responses (id, created_at, root, conversation, body) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET "
                "created_at = excluded.created_at, root = excluded.root, "
                "conversation = excluded.conversation, body = excluded.body",
                response.id,
                now,
                response.root,
                conversation,
                json.dumps(response.body),
            )
            if purge:
                await conn.execute(
                    "DELETE FROM responses WHERE created_at <= $1", now - self._retention_s
                )

        await self._db.transact(body)

    async def delete(self, response_id: str) -> bool:
        return await self._db.execute("DELETE FROM responses WHERE id = $1", response_id) > 0


def _turns(text: str) -> tuple[Turn, ...]:
    return tuple(
        make_turn(role, content, call_id, tuple((c[0], c[1], c[2]) for c in calls))
        for role, content, call_id, calls in json.loads(text)
    )
