"""Batches: makespan against the ideal for the slots, and a gateway killed mid-batch.

    python -m bench.batch [--items 200] [--tokens 16]

A modelhost process with the embedded model (the zero-config 8 slots) and a gateway process
with a batches database of its own. The ideal makespan is what the host's slots allow: the
items in waves of `slots` concurrent requests sent straight to the host, each wave timed
(waves measured before and after the batch, their mean used). Then:
- the batch of `--items` prompts through SubmitBatch, timed from submit to its last result;
- the same batch again, with the gateway killed (SIGKILL) once 40% of its results are in and
  restarted on the same database: every custom_id must come back exactly once.
Every request generates exactly `--tokens` tokens (ignore_eos), so the work is the same.
"""

import argparse
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from tests.processes import ServerProcess
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    batch = requests(args.items, args.tokens)
    database = f"{tempfile.mkdtemp(prefix='airouter-bench-')}/batches.sqlite3"
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
