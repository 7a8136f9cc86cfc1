"""Uploaded files and the OpenAI batches made from them, in the gateway's store.

Records (a file's name, purpose and size; a batch's input file, endpoint and metadata) are
tables of the store. Contents go where every gateway on the store can read them: beside an
SQLite store, in its directory's `files/` (one file per upload named by its id, written to a
temporary name and renamed when whole; only files the gateway wrote there are ever deleted);
in PostgreSQL, as 1 MiB rows of `file_chunks`, written as the upload arrives and counted as a
file only once its record is stored. Uploads a killed gateway left half written are removed:
on disk at the next start, in PostgreSQL once they are a day old (another gateway may be
receiving one now).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.database import Connection, Database, Row

_PARTIAL = ".partial"
ROW_BYTES = 1 << 20  # one row of file_chunks
ABANDONED_S = 86400.0


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass(frozen=True)
class BatchRecord:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    created_at: float


def _file(row: Row) -> FileRecord:
    file_id, filename, purpose, size, created = row
    return FileRecord(file_id, filename, purpose, int(size), created)


def _batch(row: Row) -> BatchRecord:
    return BatchRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])


class FileStore:
    def __init__(self, db: Database, directory: Path | None) -> None:
        """Contents in `directory` (beside an SQLite store), else in the database."""
        self.db = db
        self.directory = directory

    async def start(self) -> None:
        """Removes what uploads interrupted by a killed gateway left behind."""
        if self.directory is not None:
            await asyncio.to_thread(_remove_partials, self.directory)
            return
        await self.db.execute(
            "DELETE FROM file_chunks WHERE created_at < $1 "
            "AND NOT EXISTS (SELECT 1 FROM files WHERE files.id = file_chunks.file_id)",
            time.time() - ABANDONED_S,
        )

    # --- contents ----------------------------------------------------------------------

    async def save(self, file_id: str, chunks: AsyncIterator[bytes]) -> int:
        """Stores the upload's bytes under file_id (no record yet); returns its size. An
        exception from chunks (a size limit, a client gone) leaves nothing behind."""
        if self.directory is not None:
            return await self._save_to_disk(file_id, chunks)
        size = number = 0
        pending = bytearray()
        try:
            async for chunk in chunks:
                size += len(chunk)
                pending += chunk
                if len(pending) >= ROW_BYTES:
                    await self._add_row(file_id, number, bytes(pending))
                    number, pending = number + 1, bytearray()
            if pending or number == 0:
                await self._add_row(file_id, number, bytes(pending))
        except BaseException:
            await asyncio.shield(self.drop_contents(file_id))
            raise
        return size

    async def _add_row(self, file_id: str, number: int, data: bytes) -> None:
        await self.db.execute(
            "INSERT INTO file_chunks (file_id, n, data, created_at) VALUES ($1, $2, $3, $4)",
            file_id,
            number,
            data,
            time.time(),
        )

    async def _save_to_disk(self, file_id: str, chunks: AsyncIterator[bytes]) -> int:
        assert self.directory is not None
        final = self.directory / file_id
        partial = final.with_name(final.name + _PARTIAL)
        size = 0
        handle = await asyncio.to_thread(_open_new, partial)
        try:
            async for chunk in chunks:
                size += len(chunk)
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(_sync_and_close, handle)
            await asyncio.to_thread(os.replace, partial, final)
        except BaseException:
            handle.close()
            await asyncio.to_thread(partial.unlink, True)
            raise
        return size

    async def read(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a chunk at a time."""
        if self.directory is not None:
            handle = await asyncio.to_thread((self.directory / file_id).open, "rb")
            try:
                while chunk := await asyncio.to_thread(handle.read, 1 << 16):
                    yield chunk
            finally:
                handle.close()
            return
        number = 0
        while True:
            row = await self.db.fetchrow(
                "SELECT data FROM file_chunks WHERE file_id = $1 AND n = $2", file_id, number
            )
            if row is None:
                return
            yield bytes(row[0])
            number += 1

    @asynccontextmanager
    async def local_path(self, file_id: str) -> AsyncIterator[Path]:
        """A path on this machine holding the file's bytes, for as long as the block runs."""
        if self.directory is not None:
            yield self.directory / file_id
            return
        handle = await asyncio.to_thread(tempfile.NamedTemporaryFile, "wb", delete=False)
        try:
            async for chunk in self.read(file_id):
                await asyncio.to_thread(handle.write, chunk)
            handle.close()
            yield Path(handle.name)
        finally:
            handle.close()
            await asyncio.to_thread(Path(handle.name).unlink, True)

    async def drop_contents(self, file_id: str) -> None:
        """Removes an upload's bytes (stored without a record yet)."""
        if self.directory is not None:
            await asyncio.to_thread((self.directory / file_id).unlink, True)  # its own
        else:
            await self.db.execute("DELETE FROM file_chunks WHERE file_id = $1", file_id)

    # --- records -----------------------------------------------------------------------

    async def add(self, record: FileRecord) -> None:
        await self.db.execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at) "
            "VALUES ($1, $2, $3, $4, $5)",
            record.id,
            record.filename,
            record.purpose,
            record.bytes,
            record.created_at,
        )

    async def get(self, file_id: str) -> FileRecord | None:
        row = await self.db.fetchrow(
            "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = $1", file_id
        )
        return _file(row) if row else None

    async def all(self) -> list[FileRecord]:
        rows = await self.db.fetch(
            "SELECT id, filename, purpose, bytes, created_at FROM files ORDER BY created_at DESC"
        )
        return [_file(row) for row in rows]

    async def delete(self, file_id: str) -> bool:
        async def body(conn: Connection) -> bool:
            deleted = await conn.execute("DELETE FROM files WHERE id = $1", file_id)
            if deleted and self.directory is None:
                await conn.execute("DELETE FROM file_chunks WHERE file_id = $1", file_id)
            return deleted > 0

        deleted = await self.db.transact(body)
        if deleted and self.directory is not None:
            await self.drop_contents(file_id)
        return deleted

    async def add_batch(self, record: BatchRecord) -> None:
        await self.db.execute(
            "INSERT INTO openai_batches (id, input_file_id, endpoint, completion_window, "
            "metadata, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            record.id,
            record.input_file_id,
            record.endpoint,
            record.completion_window,
            json.dumps(record.metadata),
            record.created_at,
        )

    async def forget_batch(self, batch_id: str) -> None:
        await self.db.execute("DELETE FROM openai_batches WHERE id = $1", batch_id)

    async def batch(self, batch_id: str) -> BatchRecord | None:
        row = await self.db.fetchrow(
            "SELECT id, input_file_id, endpoint, completion_window, metadata, created_at "
            "FROM openai_batches WHERE id = $1",
            batch_id,
        )
        return _batch(row) if row else None

    async def batches(self) -> list[BatchRecord]:
        rows = await self.db.fetch(
            "SELECT id, input_file_id, endpoint, completion_window, metadata, created_at "
            "FROM openai_batches ORDER BY created_at DESC"
        )
        return [_batch(row) for row in rows]


def _remove_partials(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for partial in directory.glob(f"*{_PARTIAL}"):
        partial.unlink(missing_ok=True)  # the gateway's own, half written


def _open_new(path: Path) -> Any:
    return path.open("wb")


def _sync_and_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
