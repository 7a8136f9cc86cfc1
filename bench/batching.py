"""Continuous batching under load: served throughput and latency against the raw ceiling.

    python -m bench.batching [--tokens 64] [--rounds 3] [--streams 1 4 8 16 64]
                             [--device cpu|cuda|metal] [--config models.toml]

Starts a modelhost and a gateway as separate processes, as a user starts them (the embedded
model, its default 8 slots; or the first model of --config), and sends N concurrent greedy
gRPC streams to the host directly and through the gateway. In the same run, between the
served measurements so that noise hits every setup alike, it measures the ceiling: raw batched
llama_decode in-process on the same prompts with the cheapest possible token choice (argmax),
at the same batch size (N streams on S slots run at most S at a time, so their ceiling is the
batch-S rate).

Prints per setup and concurrency: aggregate tok/s, its ratio to the ceiling, TTFT and request
latency p50/p99, p99 latency against the ideal one (every request served at the ceiling rate,
first come first served), and failures; then the goals of ARCHITECTURE.md (P1-P3).
"""

import argparse
import asyncio
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import llama_cpp
import numpy as np

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from modelhost.config import ModelConfig, embedded_model_config, load_config
from modelhost.device import default_threads
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from tests.processes import ServerProcess

SETUPS = ("host", "gateway")


def prompt_for(i: int, tag: str = "") -> str:
    """Request i's prompt. Each setup and round passes its own tag, first, so none of them
    reuses a prefix another left in the host's KV cache (TTFT would be the cache's)."""
    return f"{tag}Story {i}: Once upon a time, in a village by the sea, there was a"


def raw_decode(model: LlamaModel, streams: int, tokens: int) -> float:
    """Greedy decoding of `streams` prompts in lockstep, one llama_decode per step: prompts
    in one batch, then one token per sequence per step. Returns tokens/s."""
    prompts = [model.tokenize(prompt_for(i)) for i in range(streams)]
    batch = llama_cpp.llama_batch_init(max(sum(map(len, prompts)), streams), 0, 1)
    n = 0

    def add(token: int, pos: int, seq: int, logits: bool) -> None:
        nonlocal n
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
        batch.seq_id[n][0], batch.logits[n] = seq, logits
        n += 1

    def pick(index: int) -> int:
        row = llama_cpp.llama_get_logits_ith(model.ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(model.n_vocab,)).argmax())

    started = time.perf_counter()
    last_index = []
    for seq, prompt in enumerate(prompts):
        for i, token in enumerate(prompt):
            add(token, i, seq, i == len(prompt) - 1)
        last_index.append(n - 1)
    batch.n_tokens = n
    assert llama_cpp.llama_decode(model.ctx, batch) == 0
    last = [pick(i) for i in last_index]
    for step in range(1, tokens):
        n = 0
        for seq, prompt in enumerate(prompts):
            add(last[seq], len(prompt) + step - 1, seq, True)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(model.ctx, batch) == 0
        last = [pick(seq) for seq in range(streams)]
    elapsed = time.perf_counter() - started
    for seq in range(streams):
        llama_cpp.llama_memory_seq_rm(model.memory, seq, -1, -1)
    llama_cpp.llama_batch_free(batch)
    return streams * tokens / elapsed


@dataclass
class Served:
    rates: list[float] = field(default_factory=list)  # aggregate tok/s, one per round
    ttfts: list[float] = field(default_factory=list)  # seconds, every request of every round
    latencies: list[float] = field(default_factory=list)
    failures: int = 0


async def served_decode(
    address: str, setup: str, model: str, streams: int, tokens: int, out: Served, tag: str = ""
) -> None:
    """`streams` concurrent greedy requests of `tokens` tokens each over one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        make: Callable[..., Any]
        if setup == "gateway":
            call = gateway_pb2_grpc.GatewayStub(channel).Generate
            make = gateway_pb2.GatewayGenerateRequest
        else:
            call = model_host_pb2_grpc.ModelHostStub(channel).Generate
            make = model_host_pb2.GenerateRequest

        async def one(i: int) -> int:
            request = make(model=model, prompt=prompt_for(i, tag))
            request.sampling.temperature = 0.0
            request.stopping.max_tokens = tokens
            request.stopping.ignore_eos = True
            started = time.perf_counter()
            first = None
            generated = 0
            try:
                async for response in call(request, timeout=600):
                    if first is None:
                        first = time.perf_counter() - started
                    if response.HasField("finished"):
                        generated = response.finished.usage.completion_tokens
            except grpc.aio.AioRpcError as error:
                print(f"request {i} failed: {error.code().name} {error.details()}", file=sys.stderr)
            if first is None or generated != tokens:
                out.failures += 1
                return 0
            out.ttfts.append(first)
            out.latencies.append(time.perf_counter() - started)
            return generated

        started = time.perf_counter()
        generated = await asyncio.gather(*(one(i) for i in range(streams)))
        out.rates.append(sum(generated) / (time.perf_counter() - started))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "metal"))
    parser.add_argument("--config", type=Path, help="models.toml; its first model is measured")
    args = parser.parse_args()

    host_args = ["modelhost", "serve", "--device", args.device]
    threads = default_threads()
    if args.config:
        host_config = load_config(args.config)
        config: ModelConfig = host_config.models[0]
        threads = host_config.threads or threads  # the ceiling runs as the host does
        host_args += ["--config", str(args.config)]
    else:
        config = embedded_model_config()  # what `modelhost serve` runs with no config
    slots = config.slots
    model = LlamaModel(
        config.model_path(Path.home() / ".cache" / "airouter"),
        gpu_layers=0 if args.device == "cpu" else -1,
        settings=ContextSettings(slots, config.context_length, config.batch_tokens, threads),
    )
    host = ServerProcess(*host_args)
    gateway = ServerProcess("gateway", "serve", "--modelhost", host.address)
    batch_sizes = sorted({min(s, slots) for s in args.streams})
    ceiling: dict[int, list[float]] = {b: [] for b in batch_sizes}
    served = {(setup, s): Served() for setup in SETUPS for s in args.streams}
    try:
        # Warm up: the first requests wait for the model to load.
        asyncio.run(served_decode(gateway.address, "gateway", config.name, slots, 8, Served()))
        for b in batch_sizes:
            raw_decode(model, b, 8)
        for round_ in range(args.rounds):
            for streams in args.streams:
                ceiling[min(streams, slots)].append(
                    raw_decode(model, min(streams, slots), args.tokens)
                )
                for setup in SETUPS:
                    address = gateway.address if setup == "gateway" else host.address
                    asyncio.run(
                        served_decode(
                            address,
                            setup,
                            config.name,
                            streams,
                            args.tokens,
                            served[setup, streams],
                            tag=f"[{setup} {round_}] ",
                        )
                    )
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        gateway.stop()
        host.stop()
        model.close()

    ceil = {b: statistics.median(v) for b, v in ceiling.items()}
    print(
        f"\n{config.name} on {args.device}, {slots} slots, {args.tokens} greedy tokens per "
        f"request, {threads} threads, {args.rounds} interleaved rounds (medians; "
        "percentiles over every request)\n"
    )
    print(
        "| streams | setup | tok/s | ceiling tok/s | / ceiling | TTFT p50 ms | TTFT p99 ms "
        "| latency p50 s | latency p99 s | p99 / ideal | failures |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for streams in args.streams:
        b = min(streams, slots)
        # Served at the ceiling, first come first served: ceil(streams/slots) waves, each
        # taking what a batch of b takes at the ceiling rate.
        ideal = math.ceil(streams / slots) * b * args.tokens / ceil[b]
        for setup in SETUPS:
            s = served[setup, streams]
            rate = statistics.median(s.rates) if s.rates else 0.0
            row = {
                "rate": rate,
                "ratio": rate / ceil[b],
                "ttft50": percentile(s.ttfts, 50) * 1e3,
                "ttft99": percentile(s.ttfts, 99) * 1e3,
                "lat50": percentile(s.latencies, 50),
                "lat99": percentile(s.latencies, 99),
                "ideal": percentile(s.latencies, 99) / ideal,
                "failures": s.failures,
            }
            results[setup, streams] = row
            print(
                f"| {streams} | {setup} | {rate:.1f} | {ceil[b]:.1f} | {row['ratio']:.2f} "
                f"| {row['ttft50']:.0f} | {row['ttft99']:.0f} | {row['lat50']:.2f} "
                f"| {row['lat99']:.2f} | {row['ideal']:.2f} | {s.failures} |"
            )
    print()
    goals = []
    if 1 in args.streams:
        goals.append(("P1 gateway 1 stream / ceiling", results["gateway", 1]["ratio"], ">= 0.97"))
    if slots in args.streams:
        goals.append(("P2 host 8 streams / ceiling", results["host", slots]["ratio"], ">= 0.92"))
        if 1 in args.streams:
            scale = results["host", slots]["rate"] / results["host", 1]["rate"]
            goals.append(("P2 host 8 streams / host 1 stream", scale, ">= 3"))
    if 64 in args.streams:
        goals.append(("P3 64 clients: failures", results["host", 64]["failures"], "== 0"))
        goals.append(("P3 64 clients: p99 latency / ideal", results["host", 64]["ideal"], "<= 1.2"))
    for name, value, goal in goals:
        print(f"{name:<40} {value:7.3f}  (goal {goal})")


if __name__ == "__main__":
    main()
