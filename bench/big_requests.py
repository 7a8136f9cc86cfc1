"""Whether big requests stall the gateway's event loop: a small request's wait while a burst of
large chats arrives.

    python -m bench.big_requests [--burst 24] [--messages 20000] [--in-flight 64]

A ModelHost served by this script (bench.gateway's FastHost, which answers at once) and a
`gateway serve` process routing to it. First `--in-flight` chats of `--messages` short
messages each are sent and kept in flight (the host streams them slowly), so the gateway holds
their prefixes for routing; then `--burst` more such chats (each ~0.77 MB of JSON at 20,000
messages) arrive at once on the HTTP edge, while a probe sends `GET /v1/models` every 20 ms.
It prints the probe's latency before and during the burst (p50, max) and their ratio. Before
the gateway parsed, validated and hashed large bodies off its loop and bounded the prefix
scoring, a probe waited 2.8 s here; the goal is at most 250 ms.
"""

import argparse
import asyncio
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import AsyncIterator

import aiohttp

from bench.gateway import MODEL, FastHost, serve_fast_host
from tests.processes import ServerProcess


class SlowChatHost(FastHost):
    """FastHost, but a chat whose system message is "hold" streams a token a second."""

    async def Generate(self, request, context) -> AsyncIterator:  # type: ignore[no-untyped-def,override]
        messages = request.chat.messages
        if messages and messages[0].content == "hold":
            request.prompt = "pace 1"  # FastHost's pace: one token a second
        async for response in super().Generate(request, context):
            yield response


def chat_body(messages: int, first: str, tokens: int) -> bytes:
    turns = [{"role": "system", "content": first}]
    turns += [
        {"role": "user" if i % 2 else "assistant", "content": f"message {i}"}
        for i in range(messages)
    ]
    return json.dumps({"model": MODEL, "messages": turns, "max_tokens": tokens}).encode()


def probe(url: str, stop: threading.Event) -> list[float]:
    """GET /v1/models every 20 ms until `stop`, on a thread of its own (the bench's loop is
    busy sending); each request's latency."""
    waits = []
    while not stop.is_set():
        started = time.perf_counter()
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
            response.read()
        waits.append(time.perf_counter() - started)
        stop.wait(0.02)
    return waits


async def measure(url: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: bytes) -> None:
            async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()

        stop = threading.Event()
        quiet = asyncio.create_task(asyncio.to_thread(probe, url, stop))
        await asyncio.sleep(1.0)
        stop.set()
        before = await quiet
        held = chat_body(args.messages, "hold", 3600)
        in_flight = [asyncio.create_task(post(held)) for _ in range(args.in_flight)]
        burst = [chat_body(args.messages, f"burst {i}", 1) for i in range(args.burst)]
        await asyncio.sleep(2.0)  # they have reached the host and hold their slots
        stop = threading.Event()
        loud = asyncio.create_task(asyncio.to_thread(probe, url, stop))
        await asyncio.gather(*(post(body) for body in burst))
        stop.set()
        during = await loud
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
    return before, during


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    port = serve_fast_host(SlowChatHost())
    gateway = ServerProcess("gateway", "serve", "--modelhost", f"127.0.0.1:{port}")
    try:
        http_port = next(r["http_port"] for r in gateway.log if r["event"] == "gateway_serving")
        before, during = asyncio.run(measure(f"http://127.0.0.1:{http_port}", args))
    finally:
        gateway.stop()
    size = len(chat_body(args.messages, "burst 0", 1)) / 1e6
    print(
        f"{args.burst} chats of {args.messages} messages ({size:.2f} MB each) at once, "
        f"{args.in_flight} such chats in flight; GET /v1/models every 20 ms"
    )
    print(f"{'probe latency (ms)':<28} {'p50':>8} {'max':>8} {'probes':>7}")
    for name, waits in (("quiet", before), ("during the burst", during)):
        ms = [w * 1e3 for w in waits]
        print(f"{name:<28} {statistics.median(ms):8.1f} {max(ms):8.1f} {len(ms):7d}")
    print(f"max during / max quiet: {max(during) / max(before):.1f}x  (goal: max <= 250 ms)")


if __name__ == "__main__":
    main()
