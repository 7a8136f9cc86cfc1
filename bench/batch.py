"""Batches: makespan against the ideal for the slots, and a gateway killed mid-batch.

    python -m bench.batch [--items 200] [--tokens 16]
    python -m bench.batch --stores [--items 200] [--tokens 16] [--rounds 2]

A modelhost process with the embedded model (the zero-config 8 slots) and a gateway process
with a batches database of its own. The ideal makespan is what the host's slots allow: the
items in waves of `slots` concurrent requests sent straight to the host, each wave timed
(waves measured before and after the batch, their mean used). Then:
- the batch of `--items` prompts through SubmitBatch, timed from submit to its last result;
- the same batch again, with the gateway killed (SIGKILL) once 40% of its results are in and
  restarted on the same database: every custom_id must come back exactly once.
Every request generates exactly `--tokens` tokens (ignore_eos), so the work is the same.

With --stores, the store instead: the same batch on the same host through one gateway on
SQLite, one gateway on PostgreSQL, and two gateways on one PostgreSQL (submitted to one, its
results streamed from the other, both claiming items), interleaved for --rounds rounds,
medians compared;
then the store's own cost per item (claim, then record its result: what each item costs a
gateway beside its generation) on each backend, in process. PostgreSQL runs on a temporary
directory as tests/postgres.py starts it (initdb and pg_ctl must be installed).
"""

import argparse
import asyncio
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from gateway.batch_records import ItemResult, ItemState
from gateway.batch_store import BatchStore
from gateway.database import open_database
from gateway.generation import GenerateRequest
from gateway.schema import migrate
from tests.postgres import PostgresServer, server_programs
from tests.processes import ServerProcess
from tests.scratch import scratch_dir
from tests.streaming import gateway_request

SLOTS = 8  # the embedded model's zero-config slots


def requests(count: int, tokens: int) -> list[gateway_pb2.GatewayGenerateRequest]:
    return [
        gateway_request(
            prompt=f"Item {i}: a short story about", max_tokens=tokens, ignore_eos=True, seed=i
        )
        for i in range(count)
    ]


def wave_s(host: str, batch: list[gateway_pb2.GatewayGenerateRequest]) -> float:
    """Seconds for one wave of concurrent requests straight to the host."""
    with grpc.insecure_channel(host) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)

        def one(request: gateway_pb2.GatewayGenerateRequest) -> None:
            message = model_host_pb2.GenerateRequest.FromString(request.SerializeToString())
            for _ in stub.Generate(message, timeout=300):
                pass

        started = time.perf_counter()
        with ThreadPoolExecutor(len(batch)) as pool:
            list(pool.map(one, batch))
        return time.perf_counter() - started


def run_batch(
    gateway: ServerProcess,
    batch_id: str,
    batch: list[gateway_pb2.GatewayGenerateRequest],
    stop_after: int | None = None,
) -> tuple[float, list[gateway_pb2.BatchItemResult]]:
    """Submits the batch and reads results until the last (or until `stop_after`)."""
    items = [gateway_pb2.BatchItem(custom_id=f"item-{i}", request=r) for i, r in enumerate(batch)]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()
        stub.SubmitBatch(gateway_pb2.SubmitBatchRequest(batch_id=batch_id, items=items))
        results = read_results(stub, batch_id, stop_after)
        return time.perf_counter() - started, results


def read_results(
    stub: gateway_pb2_grpc.GatewayStub, batch_id: str, stop_after: int | None = None
) -> list[gateway_pb2.BatchItemResult]:
    results = []
    request = gateway_pb2.StreamBatchResultsRequest(batch_id=batch_id)
    for message in stub.StreamBatchResults(request, timeout=3600):
        results.append(message.result)
        if stop_after is not None and len(results) >= stop_after:
            break
    return results


def makespan_across(
    submit_to: ServerProcess, read_from: ServerProcess, batch_id: str, batch: list
) -> float:
    """Submitted through one gateway, its results read from another until the last."""
    items = [gateway_pb2.BatchItem(custom_id=f"item-{i}", request=r) for i, r in enumerate(batch)]
    with (
        grpc.insecure_channel(submit_to.address) as submit_channel,
        grpc.insecure_channel(read_from.address) as read_channel,
    ):
        started = time.perf_counter()
        gateway_pb2_grpc.GatewayStub(submit_channel).SubmitBatch(
            gateway_pb2.SubmitBatchRequest(batch_id=batch_id, items=items)
        )
        results = read_results(gateway_pb2_grpc.GatewayStub(read_channel), batch_id)
        elapsed = time.perf_counter() - started
    assert len(results) == len(batch) and len({r.index for r in results}) == len(batch)
    assert all(r.state == gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED for r in results)
    return elapsed


def store_cost_ms(url: str, items: int) -> float:
    """Milliseconds of store work per item: claimed one at a time, its result recorded."""

    async def run() -> float:
        database = await open_database(url)
        try:
            await migrate(database)
            store = BatchStore(database)
            batch = [(f"i{i}", GenerateRequest("m", prompt=f"p{i}")) for i in range(items)]
            await store.add_batch("cost", batch, "", "")
            started = time.perf_counter()
            for _ in range(items):
                [claimed] = await store.claim("bench", "m", 1, 30.0)
                result = ItemResult(
                    claimed.custom_id, claimed.index, ItemState.SUCCEEDED, 1, False, text="x" * 64
                )
                await store.record_results("bench", "cost", [result])
            return (time.perf_counter() - started) * 1000 / items
        finally:
            await database.close()

    return asyncio.run(run())


def compare_stores(args: argparse.Namespace) -> None:
    programs = server_programs()
    if programs is None:
        raise SystemExit("PostgreSQL's initdb and pg_ctl are needed: install postgresql")
    batch = requests(args.items, args.tokens)
    postgres = PostgresServer(programs)
    host = ServerProcess("modelhost", "serve")
    sqlite_store = str(scratch_dir() / "batches.sqlite3")
    shared = postgres.new_database()
    alone = ServerProcess("gateway", "serve", "--modelhost", host.address, "--store", sqlite_store)
    pair = [
        ServerProcess("gateway", "serve", "--modelhost", host.address, "--store", shared)
        for _ in range(2)
    ]
    solo_store = postgres.new_database()
    solo = ServerProcess("gateway", "serve", "--modelhost", host.address, "--store", solo_store)
    times: dict[str, list[float]] = {"sqlite": [], "postgresql, 1": [], "postgresql": []}
    try:
        wave_s(host.address, batch[:SLOTS])  # warm up: the model's first decodes
        for round_ in range(args.rounds):
            times["sqlite"].append(makespan_across(alone, alone, f"s{round_}", batch))
            times["postgresql, 1"].append(makespan_across(solo, solo, f"o{round_}", batch))
            times["postgresql"].append(makespan_across(pair[0], pair[1], f"p{round_}", batch))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        cost = {
            "sqlite": store_cost_ms(str(scratch_dir() / "c.sqlite3"), 500),
            "postgresql": store_cost_ms(postgres.new_database(), 500),
        }
    finally:
        for process in (alone, solo, *pair, host):
            process.stop()
        postgres.close()
    sqlite_s, one_s, postgres_s = (
        statistics.median(times[k]) for k in ("sqlite", "postgresql, 1", "postgresql")
    )
    print(
        f"\n{args.items} prompts x {args.tokens} tokens, one host of {SLOTS} slots, "
        f"{args.rounds} interleaved rounds (medians)\n"
    )
    print("| store | gateways | makespan s | store's cost per item ms |")
    print("|---|---|---|---|")
    print(f"| SQLite | 1 | {sqlite_s:.1f} | {cost['sqlite']:.2f} |")
    print(f"| PostgreSQL | 1 | {one_s:.1f} | {cost['postgresql']:.2f} |")
    print(
        f"| PostgreSQL | 2 (submitted to one, read from the other) | {postgres_s:.1f} | "
        f"{cost['postgresql']:.2f} |"
    )
    print()
    print(
        f"{'makespan, 2 gateways on PostgreSQL / 1 on SQLite':<52} "
        f"{postgres_s / sqlite_s:8.3f}  (goal <= 1.05)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--stores", action="store_true", help="SQLite against PostgreSQL")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.stores:
        compare_stores(args)
        return

    batch = requests(args.items, args.tokens)
    database = str(scratch_dir() / "batches.sqlite3")
    host = ServerProcess("modelhost", "serve")
    gateway = ServerProcess("gateway", "serve", "--modelhost", host.address, "--batch-db", database)
    try:
        wave_s(host.address, batch[:SLOTS])  # warm up: the model's first decodes
        waves = [wave_s(host.address, batch[i : i + SLOTS]) for i in range(0, 3 * SLOTS, SLOTS)]
        makespan, results = run_batch(gateway, "bench", batch)
        waves += [wave_s(host.address, batch[i : i + SLOTS]) for i in range(0, 3 * SLOTS, SLOTS)]
        assert len(results) == args.items
        assert all(r.state == gateway_pb2.BATCH_ITEM_STATE_SUCCEEDED for r in results)

        # Killed once 40% of the results are in, restarted on the same database.
        killed_at = int(args.items * 0.4)
        _, before = run_batch(gateway, "bench-kill", batch, stop_after=killed_at)
        gateway.kill()
        gateway = ServerProcess(
            "gateway", "serve", "--modelhost", host.address, "--batch-db", database
        )
        with grpc.insecure_channel(gateway.address) as channel:
            after = read_results(gateway_pb2_grpc.GatewayStub(channel), "bench-kill")
    finally:
        gateway.stop()
        host.stop()

    wave = statistics.mean(waves)
    ideal = -(-args.items // SLOTS) * wave
    seen = Counter(r.custom_id for r in after)
    lost = args.items - len(seen)
    duplicated = sum(n - 1 for n in seen.values())
    announced_again = sum(
        1
        for old, new in zip(before, after, strict=False)
        if old.SerializeToString() != new.SerializeToString()
    )
    print(f"\n{args.items} prompts x {args.tokens} tokens on {SLOTS} slots of the embedded model\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| one wave of {SLOTS} straight to the host (mean of {len(waves)}) | {wave:.2f} s |")
    print(f"| ideal makespan ({-(-args.items // SLOTS)} waves) | {ideal:.1f} s |")
    print(f"| batch makespan through the gateway | {makespan:.1f} s |")
    print(f"| makespan / ideal | {makespan / ideal:.3f} |")
    print(f"| killed after {killed_at} results, restarted: results | {len(after)} |")
    print(
        f"| lost / duplicated / changed after the restart | {lost} / {duplicated} / "
        f"{announced_again} |"
    )
    print()
    print(f"{'P6 makespan / ideal':<44} {makespan / ideal:8.3f}  (goal <= 1.1)")
    print(f"{'P6 lost + duplicated after kill -9':<44} {lost + duplicated:8d}  (goal 0)")


if __name__ == "__main__":
    main()
