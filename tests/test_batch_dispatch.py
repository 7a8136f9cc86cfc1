"""The batch runner's decisions against a fake host and a fake request path: a cancel stops
every item that has not started, one item that cannot be placed fails alone, concurrent
submits of one batch_id never collide."""

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from airouter.errors import AlreadyExists, NotFound
from airouter.v1 import gateway_pb2
from gateway.batch_store import BatchStore
from gateway.batches import BatchRunner
from gateway.database import open_database
from gateway.generation import Event, Finished, FinishReason, GenerateRequest, Token
from gateway.hosts import HostPool
from gateway.metrics import GatewayMetrics
from gateway.schema import migrate
from gateway.service import CloudRouting, GatewayService
from gateway.upstream import OpenAIUpstream, UpstreamSettings
from tests.test_service import MODEL, Observer, fake_host, plays


class FakeService(GatewayService):
    """The request path replaced: each request waits for `release`, then answers."""

    def __init__(self, pool: HostPool, cloud: CloudRouting) -> None:
        super().__init__(pool, cloud, Observer())
        self.started: list[str] = []
        self.release = asyncio.Event()
        self.any_started = asyncio.Event()

    async def generate(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> AsyncGenerator[Event, None]:
        self.started.append(request.prompt or "")
        self.any_started.set()
        await self.release.wait()
        yield Token("ok")
        yield Finished(FinishReason.STOP, model=MODEL)


def batch(count: int, model: str = MODEL) -> list[tuple[str, GenerateRequest]]:
    return [(f"i{i}", GenerateRequest(model, prompt=f"p{i}")) for i in range(count)]


def with_runner(
    tmp_path: Path,
    body: Callable[[BatchRunner, FakeService], Awaitable[Any]],
    slots: int = 1,
    **settings: Any,
) -> Any:
    async def run() -> Any:
        host = fake_host("a:1", plays())
        assert host.status is not None
        host.status.models[0].slots = slots
        host.status.models[0].slots_busy = 0
        pool = HostPool([])
        pool.hosts = [host]
        upstream = OpenAIUpstream(UpstreamSettings(api_key=None))
        cloud = CloudRouting(upstream)
        service = FakeService(pool, cloud)
        metrics = GatewayMetrics(pool, upstream)
        database = await open_database(str(tmp_path / "batches.sqlite3"))
        await migrate(database)
        runner = BatchRunner(BatchStore(database), service, metrics, **settings)
        await runner.start()
        try:
            return await body(runner, service)
        finally:
            service.release.set()
            await runner.close()
            await database.close()

    return asyncio.run(run())


async def settle(runner: BatchRunner, batch_id: str) -> gateway_pb2.Batch:
    async with asyncio.timeout(10):
        while True:
            got = await runner.get(batch_id)
            if got.state in (gateway_pb2.BATCH_STATE_COMPLETED, gateway_pb2.BATCH_STATE_CANCELLED):
                return got
            await asyncio.sleep(0.01)


def test_a_cancel_lets_no_waiting_item_start(tmp_path: Path) -> None:
    async def body(runner: BatchRunner, service: FakeService) -> None:
        await runner.submit("b1", batch(3))
        async with asyncio.timeout(5):
            await service.any_started.wait()
        assert service.started == ["p0"]  # one slot: one item runs
        await runner.cancel("b1")
        service.release.set()
        done = await settle(runner, "b1")
        # Nothing is left that a dispatcher waking late could start.
        assert (await runner._store.waiting()).models == []
        assert not runner._running
        assert service.started == ["p0"]
        assert done.counts.cancelled == 3 and done.counts.pending == 0

    with_runner(tmp_path, body)


def test_a_model_whose_items_cannot_be_placed_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = BatchRunner._room

    def boom(self: BatchRunner, model: str) -> int:
        if model == "broken":
            raise KeyError("something no validation foresaw")
        return room(self, model)

    monkeypatch.setattr(BatchRunner, "_room", boom)

    async def body(runner: BatchRunner, service: FakeService) -> None:
        service.release.set()
        await runner.submit("b1", [*batch(3), ("i3", GenerateRequest("broken", prompt="p3"))])
        done = await settle(runner, "b1")
        assert done.counts.succeeded == 3 and done.counts.failed == 1
        results = [r async for r, _ in runner.results("b1", 0)]
        failed = [r for r in results if r.state == gateway_pb2.BATCH_ITEM_STATE_FAILED]
        assert [r.custom_id for r in failed] == ["i3"]
        assert failed[0].error_code == "INTERNAL" and "KeyError" in failed[0].error_message

    with_runner(tmp_path, body, slots=4)


def test_concurrent_submits_of_one_batch_id_store_it_once(tmp_path: Path) -> None:
    async def body(runner: BatchRunner, service: FakeService) -> None:
        first, second = await asyncio.gather(
            runner.submit("b1", batch(2)), runner.submit("b1", batch(2))
        )
        assert first.id == second.id == "b1"
        other = batch(2)
        other[1] = ("i1", GenerateRequest(MODEL, prompt="different"))  # same ids, other content
        results = await asyncio.gather(runner.submit("b1", other), return_exceptions=True)
        assert isinstance(results[0], AlreadyExists)

    with_runner(tmp_path, body)


def test_finished_batches_are_deleted_after_their_retention(tmp_path: Path) -> None:
    async def body(runner: BatchRunner, service: FakeService) -> None:
        service.release.set()
        await runner.submit("b1", batch(2))
        await settle(runner, "b1")
        assert runner._item_states()["succeeded"] == 2
        await asyncio.sleep(0.3)
        await runner.prune()
        with pytest.raises(NotFound):
            await runner.get("b1")
        assert runner._item_states()["succeeded"] == 0
        assert await runner.all() == []

    with_runner(tmp_path, body, retention_s=0.2)


def test_close_waits_for_the_results_being_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result recorded by a task of its own (an item the dispatcher could not place) is on
    disk once close() returns, not lost with the database closed under it."""

    def boom(self: BatchRunner, model: str) -> int:
        raise KeyError("something no validation foresaw")

    monkeypatch.setattr(BatchRunner, "_room", boom)
    settle_item = BatchRunner._settle
    recording: list[asyncio.Event] = []

    async def settling(self: BatchRunner, *args: Any) -> None:
        recording[0].set()
        await settle_item(self, *args)

    monkeypatch.setattr(BatchRunner, "_settle", settling)

    async def body(runner: BatchRunner, service: FakeService) -> None:
        recording.append(asyncio.Event())
        await runner.submit("b1", batch(1))
        async with asyncio.timeout(10):
            await recording[0].wait()  # the failure is being recorded on a task of its own
        await runner.close()

    with_runner(tmp_path, body)

    async def stored() -> list[Any]:
        database = await open_database(str(tmp_path / "batches.sqlite3"))
        try:
            return await BatchStore(database).results("b1", 0, 10)
        finally:
            await database.close()

    [result] = asyncio.run(stored())
    assert result.state == gateway_pb2.BATCH_ITEM_STATE_FAILED
