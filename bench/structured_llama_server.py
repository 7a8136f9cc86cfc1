"""llama-server's grammar constraints on the same workloads as `bench.structured`, for its
ratio of constrained to free decoding beside ours.

    python -m bench.structured_llama_server --llama-server PATH [--streams 8] [--tokens 1200]
                                            [--tools 100 256]

For each model it starts `llama-server -m GGUF -np STREAMS`, keeps STREAMS requests in flight
on its native /completion endpoint (seeded, temperature 0.8, the same prompts as
bench.structured) and decodes `--tokens` tokens constrained by `json_schema` (the nested
schema; for N tools, OpenAI's call shape for any of N tools: what a required tool_choice
constrains), then the same prompts free, as long. llama-server turns a JSON Schema into its
GBNF grammar and samples with llama.cpp's grammar sampler (checking the sampled token first, as
airouter does). A request it refuses is counted and reported. Build llama-server as
bench/llama_server.py says.
"""

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from airouter.output import OutputOptions, ToolChoice, tool_parameters
from bench.structured import SCHEMA, realistic_tools
from modelhost.config import embedded_chat_model_config, embedded_model_config
from tests.processes import free_port_address


def call_schema(count: int) -> dict[str, Any]:
    """One call of any of `count` tools, as airouter's tool grammar admits it."""
    options = OutputOptions(tools=realistic_tools(count), tool_choice=ToolChoice.REQUIRED)
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": tool_parameters(t)},
                "required": ["name", "arguments"],
            }
            for t in options.tools
        ]
    }


def prompts(kind: str) -> list[str]:
    if kind == "schema":
        example = {
            "name": "Ann", "age": 41, "role": "user", "tags": ["x"], "address": {"city": "Oslo"}
        }  # fmt: skip
        return [
            "People as JSON objects with name, age, height_m, role (admin, user or guest), tags "
            f"and address.city.\nPerson 1: {json.dumps(example)}\nPerson {i + 2}:"
            for i in range(64)
        ]
    tools = realistic_tools(int(kind.split()[1]))
    shown = "\n".join(f"- {t.name}: {t.description}" for t in tools[:20])
    return [f"Tools:\n{shown}\nCall {i}:\n<tool_call>\n" for i in range(64)]


async def run(
    base: str, texts: list[str], streams: int, tokens: int, extra: dict[str, Any]
) -> tuple[float, float, int]:
    """Keeps `streams` requests in flight until `tokens` are out: tok/s until then (streamed,
    as bench.structured measures: requests still running finish untimed), tokens a request,
    and how many requests llama-server refused."""
    state: dict[str, Any] = {"tokens": 0, "requests": 0, "refused": 0, "reached": None}

    async def worker(session: aiohttp.ClientSession, first: int) -> None:
        n = first
        while state["reached"] is None and state["refused"] < 8:
            body = {
                "prompt": texts[n % len(texts)], "temperature": 0.8, "seed": n,
                "n_predict": 256, "stream": True, **extra,
            }  # fmt: skip
            async with session.post(f"{base}/completion", json=body) as response:
                if response.status != 200:
                    state["refused"] += 1
                    state["error"] = (await response.text())[:200]
                    continue
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("stop"):
                        state["requests"] += 1
                        break
                    state["tokens"] += 1  # one token a chunk
                    if state["tokens"] >= tokens and state["reached"] is None:
                        state["reached"] = time.perf_counter()
            n += streams

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=1800)
    # A connection per request: llama-server closes one after a stream.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(streams)))
    elapsed = (state["reached"] or time.perf_counter()) - started
    if state["refused"]:
        print(f"    refused {state['refused']}: {state.get('error')}")
    rate = state["tokens"] / elapsed if state["reached"] is None else tokens / elapsed
    return rate, state["tokens"] / max(state["requests"], 1), state["refused"]


async def ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


def launch(binary: str, gguf: Path, streams: int) -> tuple[subprocess.Popen[bytes], str]:
    host, _, port = free_port_address().partition(":")
    command = [binary, "-m", str(gguf), "-np", str(streams), "-c", str(streams * 512)]
    command += ["--host", host, "--port", port]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://{host}:{port}"


async def measure(label: str, gguf: Path, args: argparse.Namespace) -> None:
    process, base = launch(args.llama_server, gguf, args.streams)
    try:
        await asyncio.wait_for(ready(base), 120)
        print(f"\n{label} on llama-server\n  {'':<10} {'free tok/s':>10} {'tok/s':>7} ratio")
        kinds = {"schema": SCHEMA} | {f"tools {n}": call_schema(n) for n in args.tools}
        for kind, schema in kinds.items():
            texts = prompts(kind)
            started = time.perf_counter()
            rate, length, refused = await run(
                base, texts, args.streams, args.tokens, {"json_schema": schema}
            )
            if refused and not rate:
                print(f"  {kind:<10} refused every request ({time.perf_counter() - started:.0f} s)")
                continue
            free = {"n_predict": max(1, round(length)), "ignore_eos": True}
            baseline, _, _ = await run(base, texts, args.streams, args.tokens, free)
            print(f"  {kind:<10} {baseline:10.1f} {rate:7.1f} {rate / baseline:5.2f}")
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--tools", type=int, nargs="*", default=[100, 256])
    args = parser.parse_args()
    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None
    gemma = embedded_model_config().model_path(Path.home() / ".cache" / "airouter")
    asyncio.run(measure("gemma-3-270m", gemma, args))
    asyncio.run(measure("smollm2-135m", chat.path, args))


if __name__ == "__main__":
    main()
