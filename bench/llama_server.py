"""airouter beside llama-server, on the same GGUF, slots, context and client.

    python -m bench.llama_server [--llama-server PATH] [--rounds 3] [--streams 1 8 64]
                                 [--tokens 64] [--model GGUF] [--device cpu|cuda]

Each round launches each server the way a user does (`airouter up`: a modelhost and a
gateway; `llama-server -m GGUF -np 8 -c 32768`), sends a streamed completion the moment the
process exists (retrying while it is not listening or still loading) and takes the time from
launch to the first streamed token; then, with the model loaded, it measures resident memory
(the whole process tree) and N concurrent greedy streams of `--tokens` tokens (ignore_eos) at
each concurrency: aggregate tok/s and TTFT. Both are driven through their OpenAI-compatible
HTTP endpoint (`/v1/completions`, SSE) by the same aiohttp client, with unique prompts so no
request reuses another's prefix. Servers alternate within each round; medians are printed,
and for launches the worst run too. The model is the embedded Gemma 3 270M unless `--model`
names another GGUF (the device check's randomly initialised 8B-shaped ones, bench.random_llama);
with `--device cuda` both put every layer on the GPU.
llama-server is optional: without it (`--llama-server` or $LLAMA_SERVER) the script says so
and measures airouter alone. Build it from the llama.cpp that llama-cpp-python vendors:
`cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF`
then `cmake --build build --target llama-server`.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from modelhost.config import embedded_model_config
from tests.processes import free_port_address
from tests.scratch import scratch_dir

SLOTS, CONTEXT = 8, 4096
MODEL = "bench-model"  # the name airouter serves it under; llama-server ignores it
IN_GRAPH = "airouter, sample_in_graph"


@dataclass
class Figures:
    launch_to_token: list[float] = field(default_factory=list)  # seconds
    rss: list[float] = field(default_factory=list)  # bytes
    rates: dict[int, list[float]] = field(default_factory=dict)  # streams -> tok/s
    ttfts: dict[int, list[float]] = field(default_factory=dict)  # streams -> seconds


def launch_airouter(
    gguf: Path, device: str = "cpu", sample_in_graph: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    return launch_airouter_with(
        f'[[models]]\nname = "{MODEL}"\npath = "{gguf}"\nchat_template = "gemma"\n'
        f"slots = {SLOTS}\ncontext_length = {CONTEXT}\npreload = true\n"
        f"sample_in_graph = {str(sample_in_graph).lower()}\n",
        device,
    )


def launch_airouter_with(
    models_toml: str, device: str = "cpu"
) -> tuple[subprocess.Popen[bytes], str]:
    """`airouter up` on `device` with this models.toml; the process and its HTTP base URL."""
    config = scratch_dir() / "models.toml"
    config.write_text(models_toml)
    http = free_port_address()
    command = [
        str(Path(sys.executable).parent / "airouter"),
        "up",
        "--config",
        str(config),
        "--device",
        device,
        "--listen",
        free_port_address(),
        "--modelhost-listen",
        free_port_address(),
        "--http-listen",
        http,
    ]
    env = {**os.environ, "XDG_STATE_HOME": str(scratch_dir())}  # a batch store of its own
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)
    return process, f"http://{http}"


def launch_llama_server(
    binary: str, gguf: Path, device: str = "cpu"
) -> tuple[subprocess.Popen[bytes], str]:
    host, _, port = free_port_address().partition(":")
    command = [binary, "-m", str(gguf), "-np", str(SLOTS), "-c", str(SLOTS * CONTEXT)]
    command += ["--host", host, "--port", port]
    if device == "cuda":
        command += ["-ngl", "999"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://{host}:{port}"


async def stream(
    session: aiohttp.ClientSession, base: str, prompt: str, tokens: int
) -> tuple[float, int]:
    """One streamed greedy completion: (seconds to its first token, tokens received)."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first, count = 0.0, 0
    async with session.post(f"{base}/v1/completions", json=body) as response:
        if response.status != 200:
            raise ConnectionError(f"{response.status}: {await response.text()}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                if not count:
                    first = time.perf_counter() - started
                count += 1
    return first, count


async def first_token_after_launch(base: str, launched: float) -> float:
    """Seconds from launch to the first streamed token, retrying until the server answers."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                await stream(session, base, "Hello", 1)
                return time.perf_counter() - launched
            except (aiohttp.ClientError, ConnectionError):
                await asyncio.sleep(0.01)


async def load(base: str, streams: int, tokens: int, tag: str) -> tuple[float, list[float]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                stream(session, base, f"[{tag} {i}] Once upon a time, there was a", tokens)
                for i in range(streams)
            )
        )
        elapsed = time.perf_counter() - started
    return sum(n for _, n in results) / elapsed, [t for t, _ in results]


def tree_rss(process: subprocess.Popen[bytes]) -> int:
    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_one(name: str, launch, figures: Figures, args: argparse.Namespace, round_: int) -> None:  # type: ignore[no-untyped-def]
    launched = time.perf_counter()
    process, base = launch()
    try:
        figures.launch_to_token.append(asyncio.run(first_token_after_launch(base, launched)))
        for streams in args.streams:
            rate, ttfts = asyncio.run(load(base, streams, args.tokens, f"{name} {round_}"))
            figures.rates.setdefault(streams, []).append(rate)
            figures.ttfts.setdefault(streams, []).extend(ttfts)
        figures.rss.append(tree_rss(process))  # after the load: what it holds serving
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, help="a GGUF (default: the embedded Gemma 3 270M)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--sample-in-graph",
        action="store_true",
        help="also airouter with sample_in_graph = true (tokens from llama.cpp's graph)",
    )
    args = parser.parse_args()
    gguf = args.model or embedded_model_config().model_path(Path.home() / ".cache" / "airouter")
    servers = {"airouter": lambda: launch_airouter(gguf, args.device)}
    if args.sample_in_graph:
        servers[IN_GRAPH] = lambda: launch_airouter(gguf, args.device, sample_in_graph=True)
    if args.llama_server:
        servers["llama-server"] = lambda: launch_llama_server(args.llama_server, gguf, args.device)
    else:
        print("no llama-server given (--llama-server or $LLAMA_SERVER): airouter alone")
    figures = {name: Figures() for name in servers}
    for round_ in range(args.rounds):
        for name, launch in servers.items():
            run_one(name, launch, figures[name], args, round_)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    print(
        f"\n{gguf.name} on {args.device}, {SLOTS} slots x {CONTEXT} tokens, {args.tokens} greedy "
        f"tokens per stream, {args.rounds} rounds (medians; TTFT over every request)\n"
    )
    header = "| server | launch to first token s, median / worst | RSS MiB |"
    header += "".join(f" {s} streams tok/s | {s} TTFT p50 ms |" for s in args.streams)
    print(header)
    print("|---|---|---|" + "---|---|" * len(args.streams))
    for name, f in figures.items():
        row = (
            f"| {name} | {statistics.median(f.launch_to_token):.2f} / "
            f"{max(f.launch_to_token):.2f} | {statistics.median(f.rss) / (1 << 20):.0f} |"
        )
        for s in args.streams:
            row += (
                f" {statistics.median(f.rates[s]):.1f} "
                f"| {statistics.median(f.ttfts[s]) * 1e3:.0f} |"
            )
        print(row)
    if "llama-server" in figures:
        ours, theirs = figures["airouter"], figures["llama-server"]
        print()
        ratio = statistics.median(ours.launch_to_token) / statistics.median(theirs.launch_to_token)
        print(f"{'launch to first token, airouter / llama-server':<48} {ratio:6.2f}  (median)")
        # The goal holds in every run: airouter's slowest launch against llama-server's median.
        worst = max(ours.launch_to_token) / statistics.median(theirs.launch_to_token)
        label = "  slowest airouter launch / llama-server median"
        print(f"{label:<48} {worst:6.2f}  (goal <= 1.1)")
        rss = statistics.median(ours.rss) / statistics.median(theirs.rss)
        print(f"{'RSS, airouter / llama-server':<48} {rss:6.2f}  (goal <= 1.0)")
        for name in (name for name in figures if name != "llama-server"):
            for s in args.streams:
                rate = statistics.median(figures[name].rates[s]) / statistics.median(
                    theirs.rates[s]
                )
                print(f"{f'tok/s at {s} streams, {name} / llama-server':<48} {rate:6.2f}")


if __name__ == "__main__":
    main()
