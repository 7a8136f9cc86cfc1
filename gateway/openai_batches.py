"""OpenAI's Files and Batches APIs on the HTTP edge, over the gateway's own batches: a file
uploaded with `purpose: "batch"` becomes, through `POST /v1/batches`, a batch of the same
durable store and dispatcher as the gRPC SubmitBatch (a gateway killed mid-batch loses and
repeats no result), and its output and error files are OpenAI's line format read from the
results stored so far (a view of the store, so they grow as results arrive and never
disagree with it).

Uploads stream into the gateway's store (gateway.file_store) as they arrive, never held in
memory, up to `max_upload_bytes`, so every gateway on the store reads them.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from airouter.batch_file import BATCH_URLS, batch_item, batch_output
from airouter.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from airouter.openai_api import json_body
from gateway.batch_records import BatchInfo, BatchState
from gateway.batches import MAX_ITEMS, BatchRunner
from gateway.file_store import BatchRecord, FileRecord, FileStore
from gateway.generation import GenerateRequest, validate
from gateway.offload import off_loop
from gateway.wire import item_result_pb, request_from_pb

# OpenAI's purposes; only batch files are read here, the rest are kept as uploaded.
PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")
CHUNK_BYTES = 1 << 16


def read_batch_lines(path: Path, endpoint: str) -> list[tuple[str, GenerateRequest]]:
    """Every request of an uploaded batch file, each checked as the gateway would check it;
    InvalidArgument names the first bad line. Blocking."""
    items: list[tuple[str, GenerateRequest]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"line {number}: not UTF-8 (byte {exc.start})") from None
            if not line.strip():
                continue
            if len(items) == MAX_ITEMS:
                raise InvalidArgument(
                    f"the file holds more than {MAX_ITEMS} requests; split it into batches of "
                    "at most that many"
                )
            item = batch_item(line, number, endpoint)
            if item.custom_id in seen:
                raise InvalidArgument(
                    f"line {number}: custom_id {shown(item.custom_id)} is used on line "
                    f"{seen[item.custom_id]} too; custom_ids must be unique"
                )
            seen[item.custom_id] = number
            request = request_from_pb(item.request)
            try:
                validate(request)
            except InvalidArgument as exc:
                raise InvalidArgument(f"line {number}: body: {exc}") from None
            items.append((item.custom_id, request))
    if not items:
        raise InvalidArgument("the file holds no requests")
    return items


_STATUS = {
    BatchState.IN_PROGRESS: "in_progress",
    BatchState.COMPLETED: "completed",
    BatchState.CANCELLING: "cancelling",
    BatchState.CANCELLED: "cancelled",
}


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id}-output"


def error_file_id(batch_id: str) -> str:
    return f"file-{batch_id}-errors"


def batch_json(record: BatchRecord, info: BatchInfo) -> dict[str, Any]:
    """A batch as OpenAI's API shows it."""
    counts = info.counts
    failed = counts.failed + counts.cancelled
    status = _STATUS[info.state]
    finished = int(info.finished_at) if info.finished_at else None
    created = int(record.created_at)
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "errors": None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": status,
        "output_file_id": output_file_id(record.id),
        "error_file_id": error_file_id(record.id) if failed else None,
        "created_at": created,
        "in_progress_at": created,
        "expires_at": created + 86400,
        "finalizing_at": finished if status == "completed" else None,
        "completed_at": finished if status == "completed" else None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": {
            "total": counts.total,
            "completed": counts.succeeded,
            "failed": failed,
        },
        "metadata": record.metadata or None,
    }


class BatchDoor:
    """The Files and Batches routes of the HTTP edge."""

    def __init__(self, files: FileStore, runner: BatchRunner, max_upload_bytes: int) -> None:
        # The name of the API key a request came with; the HTTP edge, which checks keys,
        # sets it ("" for a token).
        self.key_of: Callable[[web.Request], str] = lambda request: ""
        self._files = files
        self._runner = runner
        self._max_upload_bytes = max_upload_bytes

    async def start(self) -> None:
        await self._files.start()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{id}", self.retrieve_file)
        app.router.add_delete("/v1/files/{id}", self.delete_file)
        app.router.add_get("/v1/files/{id}/content", self.content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{id}", self.retrieve_batch)
        app.router.add_post("/v1/batches/{id}/cancel", self.cancel_batch)

    # --- files -------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise InvalidArgument("upload the file as multipart/form-data (fields file, purpose)")
        reader = await request.multipart()
        purpose: str | None = None
        saved: FileRecord | None = None
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise InvalidArgument("nested multipart bodies are not supported")
                if part.name == "purpose":  # one chunk read, a few bytes kept, the rest dropped
                    purpose = (await part.read_chunk()).decode("utf-8", "replace")[:64]
                    await part.release()
                elif part.name == "file" and saved is None:
                    saved = await self._save(part)
                else:
                    await part.release()
            if saved is None:
                raise InvalidArgument("file: required (the multipart field `file`)")
            if purpose not in PURPOSES:
                raise InvalidArgument(
                    f"purpose: {shown(purpose or '')} is not one of {', '.join(PURPOSES)}"
                )
            record = FileRecord(saved.id, saved.filename, purpose, saved.bytes, saved.created_at)
            await self._files.add(record)
        except BaseException:
            if saved is not None:
                await asyncio.shield(self._files.drop_contents(saved.id))
            raise
        return web.json_response(record.json())

    async def _save(self, part: BodyPartReader) -> FileRecord:
        """The part's bytes, streamed into the store as they arrive."""
        file_id = f"file-{uuid.uuid4().hex}"
        limit = self._max_upload_bytes

        async def chunks() -> AsyncIterator[bytes]:
            size = 0
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise InvalidArgument(
                        f"file: larger than {limit >> 20} MiB (max_upload_bytes); split it"
                    )
                yield chunk

        size = await self._files.save(file_id, chunks())
        return FileRecord(file_id, part.filename or "upload.jsonl", "", size, time.time())

    async def list_files(self, request: web.Request) -> web.Response:
        """The uploaded files (a batch's result files are found through the batch)."""
        files = await self._files.all()
        data = [f.json() for f in files]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def retrieve_file(self, request: web.Request) -> web.Response:
        return web.json_response((await self._file(request.match_info["id"])).json())

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if not await self._files.delete(file_id):
            if await self._result_file(file_id) is not None:
                raise FailedPrecondition(
                    f"{shown(file_id)} is a batch's result file, read from its stored results; "
                    "it goes when the batch does (batch_retention_s)"
                )
            raise NotFound(f"no file {shown(file_id)}; GET /v1/files lists them")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["id"]
        record = await self._files.get(file_id)
        out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if record is not None:
            await out.prepare(request)
            async for chunk in self._files.read(file_id):
                await out.write(chunk)
            return out
        found = await self._result_file(file_id)
        if found is None:
            raise NotFound(f"no file {shown(file_id)}; GET /v1/files lists them")
        batch_id, errors = found
        await out.prepare(request)
        async for line in self._result_lines(batch_id, errors):
            await out.write(line)
        return out

    async def _file(self, file_id: str) -> FileRecord:
        record = await self._files.get(file_id)
        if record is not None:
            return record
        found = await self._result_file(file_id)
        if found is None:
            raise NotFound(f"no file {shown(file_id)}; GET /v1/files lists them")
        return await self._result_record(*found)

    async def _result_file(self, file_id: str) -> tuple[str, bool] | None:
        """(batch id, whether it is the error file) of a batch's result file."""
        for suffix, errors in (("-output", False), ("-errors", True)):
            if file_id.startswith("file-") and file_id.endswith(suffix):
                batch_id = file_id.removeprefix("file-").removesuffix(suffix)
                if await self._files.batch(batch_id) is not None:
                    return batch_id, errors
        return None

    async def _result_record(self, batch_id: str, errors: bool) -> FileRecord:
        size = 0
        async for line in self._result_lines(batch_id, errors):
            size += len(line)
        name = f"{batch_id}_{'errors' if errors else 'output'}.jsonl"
        file_id = (error_file_id if errors else output_file_id)(batch_id)
        created = (await self._runner.get(batch_id)).created_at
        return FileRecord(file_id, name, "batch_output", size, created)

    async def _result_lines(self, batch_id: str, errors: bool) -> AsyncIterator[bytes]:
        """The batch's stored results in OpenAI's output line format: the successes, or
        (errors) the failures and cancellations."""
        created = int((await self._runner.get(batch_id)).created_at)
        after = 0
        while page := await self._runner.result_page(batch_id, after, 256):
            after = page[-1].sequence
            lines = await off_loop(_lines, page, batch_id, created, errors)
            if lines:
                yield lines

    # --- batches -----------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        file_id = _text_field(body, "input_file_id")
        endpoint = _text_field(body, "endpoint")
        window = body.get("completion_window", "24h")
        metadata = body.get("metadata") or {}
        if endpoint not in BATCH_URLS:
            raise InvalidArgument(
                f"endpoint: {shown(endpoint)} is not served in batches; use "
                f"{' or '.join(BATCH_URLS)}"
            )
        if window != "24h":
            raise InvalidArgument("completion_window: only 24h is supported")
        if (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise InvalidArgument(
                "metadata: at most 16 pairs of strings (keys up to 64, values up to 512 chars)"
            )
        record = await self._files.get(file_id)
        if record is None:
            raise NotFound(f"input_file_id: no file {shown(file_id)}; upload it to /v1/files")
        if record.purpose != "batch":
            raise InvalidArgument(
                f"input_file_id: {shown(file_id)} was uploaded for {record.purpose!r}; upload "
                "the batch file with purpose batch"
            )
        async with self._files.local_path(file_id) as path:
            items = await asyncio.to_thread(read_batch_lines, path, endpoint)
        batch_id = f"batch_{uuid.uuid4().hex}"
        stored = BatchRecord(batch_id, file_id, endpoint, window, metadata, time.time())
        await self._files.add_batch(stored)
        try:
            info = await self._runner.submit(
                batch_id, items, list(request.headers.items()), self.key_of(request)
            )
        except BaseException:
            await self._files.forget_batch(batch_id)
            raise
        return web.json_response(batch_json(stored, info))

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        record, info = await self._batch(request.match_info["id"])
        return web.json_response(batch_json(record, info))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        record, info = await self._batch(request.match_info["id"])
        if info.state is BatchState.IN_PROGRESS:
            info = await self._runner.cancel(record.id)
        return web.json_response(batch_json(record, info))

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", "20")), 1), 100)
        except ValueError:
            raise InvalidArgument("limit: a number from 1 to 100") from None
        after = request.query.get("after")
        data = []
        for record in await self._files.batches():
            if after is not None:
                if record.id == after:
                    after = None
                continue
            try:
                data.append(batch_json(record, await self._runner.get(record.id)))
            except NotFound:
                continue  # pruned
        page = data[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(data) > limit,
            }
        )

    async def _batch(self, batch_id: str) -> tuple[BatchRecord, BatchInfo]:
        record = await self._files.batch(batch_id)
        if record is None:
            raise NotFound(f"no batch {shown(batch_id)}; GET /v1/batches lists them")
        return record, await self._runner.get(batch_id)


def _lines(page: list[Any], batch_id: str, created: int, errors: bool) -> bytes:
    out = []
    for result in page:
        line = batch_output(item_result_pb(result), batch_id, created)
        succeeded = line["response"] is not None and line["response"]["status_code"] == 200
        if succeeded != errors:
            out.append(json.dumps(line, ensure_ascii=False) + "\n")
    return "".join(out).encode()


async def _json_body(request: web.Request) -> dict[str, Any]:
    body = json_body(await request.read())
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name}: required, a string")
    return value
