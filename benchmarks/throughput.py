"""Tokens per second: raw batched llama_decode in-process vs the modelhost vs the gateway.

    python -m benchmarks.throughput [--tokens 64] [--rounds 3]

Everything runs on this machine, interleaved round by round so that noise hits all setups
alike, and the ratios that the goals P1 and P2 of ARCHITECTURE.md name are printed at the end.
The servers run as separate processes, started as a user starts them.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc
import llama_cpp

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from modelhost.config import embedded_model_config
from modelhost.llama import ContextSettings, LlamaModel, default_threads
from tests.processes import ServerProcess

PROMPT = "Once upon a time, there was a"
CONTEXT = 1024
SLOTS = 8


def raw_decode(model: LlamaModel, streams: int, tokens: int) -> tuple[float, float]:
    """Greedy decoding of `streams` sequences in lockstep with one llama_decode per step, the
    ceiling any server on this model can reach. Returns (tokens/s, time to first token in s)."""
    prompt = model.tokenize(PROMPT)
    batch = llama_cpp.llama_batch_init(max(len(prompt) * streams, streams), 0, 1)
    samplers = [llama_cpp.llama_sampler_init_greedy() for _ in range(streams)]
    n = 0

    def add(token: int, pos: int, seq: int, logits: bool) -> None:
        nonlocal n
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
        batch.seq_id[n][0], batch.logits[n] = seq, logits
        n += 1

    started = time.perf_counter()
    for seq in range(streams):
        for i, token in enumerate(prompt):
            add(token, i, seq, i == len(prompt) - 1)
    batch.n_tokens = n
    assert llama_cpp.llama_decode(model.ctx, batch) == 0
    last = [
        llama_cpp.llama_sampler_sample(samplers[s], model.ctx, (s + 1) * len(prompt) - 1)
        for s in range(streams)
    ]
    first_token = time.perf_counter() - started
    for step in range(1, tokens):
        n = 0
        for seq in range(streams):
            add(last[seq], len(prompt) + step - 1, seq, True)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(model.ctx, batch) == 0
        last = [llama_cpp.llama_sampler_sample(samplers[s], model.ctx, s) for s in range(streams)]
    elapsed = time.perf_counter() - started
    for seq in range(streams):
        llama_cpp.llama_memory_seq_rm(model.memory, seq, -1, -1)
    for sampler in samplers:
        llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_batch_free(batch)
    return streams * tokens / elapsed, first_token


async def served_decode(
    address: str, via_gateway: bool, streams: int, tokens: int
) -> tuple[float, float]:
    """`streams` concurrent greedy requests over gRPC. Returns (tokens/s, median TTFT in s)."""
    async with grpc.aio.insecure_channel(address) as channel:
        if via_gateway:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate
            request = gateway_pb2.GatewayGenerateRequest(model="gemma-3-270m", prompt=PROMPT)
        else:
            call = model_host_pb2_grpc.ModelHostStub(channel).Generate
            request = model_host_pb2.GenerateRequest(model="gemma-3-270m", prompt=PROMPT)
        request.sampling.temperature = 0.0
        request.stopping.max_tokens = tokens

        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            first = None
            generated = 0
            async for response in call(request):
                if first is None:
                    first = time.perf_counter() - started
                if response.HasField("finished"):
                    generated = response.finished.usage.completion_tokens
            assert first is not None
            return generated, first

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - started
    return sum(g for g, _ in results) / elapsed, statistics.median(f for _, f in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    path = embedded_model_config().gguf_path(Path.home() / ".cache" / "airouter")
    model = LlamaModel(
        path,
        gpu_layers=0,
        settings=ContextSettings(SLOTS, CONTEXT, 512, default_threads()),
    )
    host = ServerProcess("modelhost", "serve", "--device", "cpu")
    gateway = ServerProcess("gateway", "serve", "--modelhost", host.address)
    setups = ["raw", "host", "gateway"]
    rates: dict[tuple[str, int], list[float]] = {(s, b): [] for s in setups for b in (1, SLOTS)}
    ttfts: dict[str, list[float]] = {s: [] for s in setups}
    try:
        asyncio.run(served_decode(gateway.address, True, SLOTS, 8))  # warm up, load the model
        for round_ in range(args.rounds):
            for streams in (1, SLOTS):
                rate, ttft = raw_decode(model, streams, args.tokens)
                rates["raw", streams].append(rate)
                for setup in ("host", "gateway"):
                    address = gateway.address if setup == "gateway" else host.address
                    r, t = asyncio.run(
                        served_decode(address, setup == "gateway", streams, args.tokens)
                    )
                    rates[setup, streams].append(r)
                    if streams == 1:
                        ttfts[setup].append(t)
                if streams == 1:
                    ttfts["raw"].append(ttft)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        gateway.stop()
        host.stop()
        model.close()

    med = {k: statistics.median(v) for k, v in rates.items()}
    ttft = {k: statistics.median(v) * 1e3 for k, v in ttfts.items()}
    print(
        f"\nGemma 3 270M Q4_K_M, {args.tokens} new tokens, {default_threads()} threads, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| setup | 1 stream tok/s | 8 concurrent tok/s | TTFT p50 ms (1 stream) |")
    print("|---|---|---|---|")
    for setup, label in [
        ("raw", "raw batched llama_decode, in-process"),
        ("host", "modelhost (gRPC)"),
        ("gateway", "gateway -> modelhost (gRPC)"),
    ]:
        print(f"| {label} | {med[setup, 1]:.1f} | {med[setup, SLOTS]:.1f} | {ttft[setup]:.1f} |")
    print()
    goals = [
        ("P1 gateway 1 stream / raw 1 stream", med["gateway", 1] / med["raw", 1], ">= 0.97"),
        ("P1 TTFT added by gateway+host, ms", ttft["gateway"] - ttft["raw"], "<= 5"),
        ("P2 host 8 streams / raw batch 8", med["host", SLOTS] / med["raw", SLOTS], ">= 0.92"),
        ("P2 host 8 streams / host 1 stream", med["host", SLOTS] / med["host", 1], ">= 3"),
    ]
    for name, value, goal in goals:
        print(f"{name:<40} {value:7.3f}  (goal {goal})")


if __name__ == "__main__":
    main()
