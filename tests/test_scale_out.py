"""Several gateways active at once on one PostgreSQL (a real server, tests/postgres.py) and
real modelhosts: a batch survives the gateway that took it, any gateway answers for any batch,
a cancel on one stops the items running on another, gateways starting together create the
schema once, and a batch rides out the database going away."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.schema import VERSION
from tests.conftest import wait_until
from tests.postgres import PostgresServer
from tests.processes import ServerProcess
from tests.test_batches import SUCCEEDED, items, submit
from tests.test_batches import results as stored_results

LEASE_S = 2.0  # a killed gateway's items are taken over after this
OUTAGE_S = 10.0  # how long the database is away


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[str]]:
    started = [ServerProcess("modelhost", "serve") for _ in range(2)]
    try:
        yield [host.address for host in started]
    finally:
        for host in started:
            host.stop()


def gateway(store: str, hosts: list[str], config: Path | None = None) -> ServerProcess:
    flags = [flag for address in hosts for flag in ("--modelhost", address)]
    if config is not None:
        flags += ["--config", str(config)]
    return ServerProcess("gateway", "serve", "--store", store, *flags)


def short_leases(tmp_path: Path) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(f"batch_lease_s = {LEASE_S}\n")
    return config


def stub_for(process: ServerProcess) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayStub]:
    channel = grpc.insecure_channel(process.address)
    return channel, gateway_pb2_grpc.GatewayStub(channel)


def logged(process: ServerProcess, event: str, **fields: object) -> bool:
    return any(
        r["event"] == event and all(r.get(k) == v for k, v in fields.items())
        for r in list(process.log)
    )


def test_a_gateway_killed_mid_batch_leaves_every_item_to_the_other_exactly_once(
    postgres_url: str, hosts: list[str], tmp_path: Path
) -> None:
    config = short_leases(tmp_path)
    first, second = gateway(postgres_url, hosts, config), gateway(postgres_url, hosts, config)
    channel_a, via_a = stub_for(first)
    channel_b, via_b = stub_for(second)
    streamed: list[gateway_pb2.BatchItemResult] = []
    try:
        batch = submit(via_a, items(200, max_tokens=8, ignore_eos=True), batch_id="shared")
        # Any gateway answers for any batch.
        seen_by_b = via_b.GetBatch(gateway_pb2.GetBatchRequest(batch_id="shared")).batch
        assert seen_by_b.counts.total == 200
        halfway = threading.Event()

        def stream_from_b() -> None:
            request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch.id)
            for message in via_b.StreamBatchResults(request, timeout=300):
                streamed.append(message.result)
                if len(streamed) == 100:
                    halfway.set()

        reader = threading.Thread(target=stream_from_b)
        reader.start()
        assert halfway.wait(240), "half the batch was never done"
        assert logged(first, "route_chosen")  # the first gateway ran items too
        first.kill()
        reader.join(300)
        assert not reader.is_alive()
        final = via_b.GetBatch(gateway_pb2.GetBatchRequest(batch_id="shared")).batch
    finally:
        channel_a.close()
        channel_b.close()
        first.kill()
        second.stop()
    assert [r.sequence for r in streamed] == list(range(1, 201))
    assert sorted(r.index for r in streamed) == list(range(200))  # each once, none lost
    assert all(r.state == SUCCEEDED for r in streamed)
    assert final.state == gateway_pb2.BATCH_STATE_COMPLETED and final.counts.succeeded == 200
    # What the killed gateway held was taken over when its leases lapsed.
    assert any(r.attempts == 2 for r in streamed)


def test_a_cancel_through_one_gateway_stops_the_items_running_on_another(
    postgres_url: str, hosts: list[str], tmp_path: Path
) -> None:
    first, second = gateway(postgres_url, hosts[:1]), gateway(postgres_url, hosts[:1])
    channel_a, via_a = stub_for(first)
    channel_b, via_b = stub_for(second)
    try:
        batch = submit(via_a, items(40, max_tokens=200, ignore_eos=True))
        prefix = f"{batch.id}-"
        wait_until(lambda: any(str(r.get("request_id", "")).startswith(prefix) for r in first.log))
        cancelled = via_b.CancelBatch(gateway_pb2.CancelBatchRequest(batch_id=batch.id)).batch
        assert cancelled.state in (
            gateway_pb2.BATCH_STATE_CANCELLING,
            gateway_pb2.BATCH_STATE_CANCELLED,
        )

        def settled() -> bool:
            got = via_a.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
            return got.state == gateway_pb2.BATCH_STATE_CANCELLED

        wait_until(settled, timeout=30)
        final = via_b.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
        results = stored_results(via_b, batch.id)
    finally:
        channel_a.close()
        channel_b.close()
        first.stop()
        second.stop()
    assert logged(first, "batch_items_stopping", batch_id=batch.id)
    assert final.counts.cancelled >= 38 and final.counts.pending == final.counts.running == 0
    assert len(results) == 40 and len({r.result.index for r in results}) == 40


def test_gateways_starting_together_on_an_empty_database_create_the_schema_once(
    postgres_url: str, hosts: list[str]
) -> None:
    started: list[ServerProcess] = []
    threads = [
        threading.Thread(target=lambda: started.append(gateway(postgres_url, hosts)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert len(started) == 3
        migrated = [p for p in started if logged(p, "store_migrated", was=0)]
        assert len(migrated) == 1

        async def versions() -> list[int]:
            conn = await asyncpg.connect(postgres_url)
            try:
                return [row[0] for row in await conn.fetch("SELECT version FROM schema_version")]
            finally:
                await conn.close()

        assert asyncio.run(versions()) == [VERSION]
    finally:
        for process in started:
            process.stop()


def test_a_batch_rides_out_the_database_going_away(
    postgres_server: PostgresServer, postgres_url: str, hosts: list[str]
) -> None:
    """PostgreSQL stopped mid-batch for 10 s (and at least until the gateway holds a result it
    cannot record), then started again: the batch completes with nothing lost or repeated."""
    process = gateway(postgres_url, hosts)
    channel, stub = stub_for(process)
    try:
        batch = submit(stub, items(30, max_tokens=24, ignore_eos=True))

        def some_done() -> bool:
            got = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
            return got.counts.succeeded >= 3

        wait_until(some_done, timeout=120)
        postgres_server.stop()
        stopped = time.monotonic()
        try:
            wait_until(lambda: logged(process, "batch_store_retry"), timeout=60)
            # Down for 10 s: throughout, the gateway says so (and holds its results).
            while time.monotonic() - stopped < OUTAGE_S:
                with pytest.raises(grpc.RpcError) as down:
                    stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id), timeout=30)
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "unreachable" in (down.value.details() or "")
                time.sleep(0.5)
        finally:
            postgres_server.start()

        def completed() -> bool:
            try:
                got = stub.GetBatch(gateway_pb2.GetBatchRequest(batch_id=batch.id)).batch
            except grpc.RpcError:
                return False  # the pool reconnects on its next use
            return got.state == gateway_pb2.BATCH_STATE_COMPLETED

        wait_until(completed, timeout=180)
        results = stored_results(stub, batch.id)
    finally:
        channel.close()
        process.stop()
    assert [m.result.sequence for m in results] == list(range(1, 31))
    assert sorted(m.result.index for m in results) == list(range(30))
    assert all(m.result.state == SUCCEEDED for m in results)
    assert logged(process, "store_unreachable") and logged(process, "store_reachable")
