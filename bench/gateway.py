"""What the gateway adds: time to first token and CPU per relayed token.

    python -m bench.gateway [--rounds 3] [--tokens 2048] [--streams 1 64] [--short 400]
                            [--pace 70]

Against an upstream that streams as fast as it can, so the gateway's own cost is not hidden
behind decoding: a ModelHost served by this script (ListModels, WatchStatus and a Generate
that sends `--tokens` deltas without waiting), and a `gateway serve` process routing to it.
For 1 and 64 concurrent streams, interleaved round by round, it measures TTFT directly to the
upstream and through the gateway (the difference is what the gateway adds), and the gateway
process's CPU time (user + system, from psutil, in 10 ms ticks: hence many tokens per
request) per relayed token. Beside it runs the floor: a bare grpc.aio process that passes the
same stream's bytes through with no parsing, routing, metrics or tracing, so the table shows
how much of the gateway's cost is its own and how much is the gRPC stack's per message.
With --short N it also sends N one-token requests per round through each relay, one after
another and from 8 concurrent clients, and reports the CPU each request costs (the cost of a
request rather than of a token). The gateway runs on uvloop, as `gateway serve` does where it
is installed; the floor runs twice, on asyncio's own loop and on uvloop.

With --pace R the upstream sends R tokens a second per stream, as a decoding model does, so
every token is its own message and its own wake-up all the way through (nothing piles up to
be merged); use --tokens 140 (two seconds a request) and --streams 1 8 64.
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import psutil

from airouter import grpc_server
from airouter.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    generate_pb2,
    host_status_pb2,
    model_host_pb2,
    model_host_pb2_grpc,
)
from tests.processes import ServerProcess

MODEL = "fast"
PACE = "pace "
SERVICE = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class FastHost(model_host_pb2_grpc.ModelHostServicer):
    """A modelhost that answers at once and streams as fast as gRPC lets it."""

    async def ListModels(self, request, context):  # type: ignore[no-untyped-def]
        return model_host_pb2.ListModelsResponse(
            models=[
                generate_pb2.ModelInfo(
                    name=MODEL,
                    capabilities=["chat"],
                    context_length=4096,
                    slots=64,
                    state=generate_pb2.MODEL_STATE_READY,
                )
            ]
        )

    async def WatchStatus(
        self, request, context
    ) -> AsyncIterator[model_host_pb2.WatchStatusResponse]:  # type: ignore[no-untyped-def,override]
        status = host_status_pb2.HostStatus(
            device="cpu",
            models=[
                host_status_pb2.ModelStatus(
                    name=MODEL, state=generate_pb2.MODEL_STATE_READY, slots=64
                )
            ],
        )
        while True:
            yield model_host_pb2.WatchStatusResponse(status=status)
            await asyncio.sleep(1.0)

    async def Generate(self, request, context) -> AsyncIterator[model_host_pb2.GenerateResponse]:  # type: ignore[no-untyped-def,override]
        delta = model_host_pb2.GenerateResponse(
            token=generate_pb2.TokenDelta(text=" tok", token_count=1)
        )
        # A prompt "pace R" asks for R tokens a second.
        pace = float(request.prompt.removeprefix(PACE)) if request.prompt.startswith(PACE) else 0
        loop = asyncio.get_running_loop()
        due = loop.time()
        for _ in range(request.stopping.max_tokens):
            if pace:
                due += 1 / pace
                await asyncio.sleep(max(due - loop.time(), 0))
            yield delta
        yield model_host_pb2.GenerateResponse(
            finished=generate_pb2.Finished(
                reason=generate_pb2.FINISH_REASON_LENGTH,
                usage=generate_pb2.Usage(completion_tokens=request.stopping.max_tokens),
                model=MODEL,
            )
        )


def serve_fast_host(host: model_host_pb2_grpc.ModelHostServicer | None = None) -> int:
    """Starts FastHost (or `host`) on its own loop thread; returns its port."""
    loop = asyncio.new_event_loop()
    started: list[int] = []
    ready = threading.Event()

    async def run() -> None:
        server, _ = grpc_server.new_server([SERVICE])
        model_host_pb2_grpc.add_ModelHostServicer_to_server(host or FastHost(), server)
        started.append(grpc_server.bind(server, "127.0.0.1:0"))
        await server.start()
        ready.set()
        await server.wait_for_termination()

    threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True).start()
    ready.wait(10)
    return started[0]


async def serve_passthrough(upstream: str) -> None:
    """The floor: Gateway.Generate relaying the upstream's Generate as raw bytes."""

    def same(data: bytes) -> bytes:
        return data

    channel = grpc.aio.insecure_channel(upstream)
    upstream_generate = channel.unary_stream(
        f"/{SERVICE}/Generate", request_serializer=same, response_deserializer=same
    )

    async def generate(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in upstream_generate(request):
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                GATEWAY_SERVICE,
                {
                    "Generate": grpc.unary_stream_rpc_method_handler(
                        generate, request_deserializer=same, response_serializer=same
                    )
                },
            )
        ]
    )
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()


def start_passthrough(upstream: str, loop: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.gateway", "--passthrough-for", upstream, "--loop", loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, f"127.0.0.1:{process.stdout.readline().strip()}"


async def short_requests(address: str, count: int, clients: int = 1) -> None:
    """`count` one-token requests over one channel, from `clients` clients that each send
    their share one after another."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate
        request = gateway_pb2.GatewayGenerateRequest(model=MODEL, prompt="x")
        request.stopping.max_tokens = 1

        async def client(share: int) -> None:
            for _ in range(share):
                async for _response in call(request, timeout=30):
                    pass

        await asyncio.gather(*(client(count // clients) for _ in range(clients)))


async def measure(
    address: str, via_gateway: bool, streams: int, tokens: int, pace: float = 0
) -> list[float]:
    """TTFT of `streams` concurrent requests, in seconds; checks every token arrived."""
    prompt = f"{PACE}{pace}" if pace else "x"
    async with grpc.aio.insecure_channel(address) as channel:
        if via_gateway:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate
            request = gateway_pb2.GatewayGenerateRequest(model=MODEL, prompt=prompt)
        else:
            call = model_host_pb2_grpc.ModelHostStub(channel).Generate  # type: ignore[assignment]
            request = model_host_pb2.GenerateRequest(model=MODEL, prompt=prompt)  # type: ignore[assignment]
        request.stopping.max_tokens = tokens

        async def one() -> float:
            started = time.perf_counter()
            first = None
            count = 0
            async for response in call(request, timeout=120):
                if first is None:
                    first = time.perf_counter() - started
                count += response.token.token_count
            assert first is not None and count == tokens, count
            return first

        return list(await asyncio.gather(*(one() for _ in range(streams))))


SHORT_CLIENTS = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--short", type=int, default=0, help="one-token requests per round")
    parser.add_argument("--pace", type=float, default=0, help="tokens a second per stream")
    parser.add_argument("--passthrough-for", help=argparse.SUPPRESS)  # the floor's process
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passthrough_for:
        relay = serve_passthrough(args.passthrough_for)
        if args.loop == "uvloop":
            grpc_server.run(relay)
        else:
            asyncio.run(relay)
        return

    upstream = f"127.0.0.1:{serve_fast_host()}"
    gateway = ServerProcess("gateway", "serve", "--modelhost", upstream)
    bare, bare_address = start_passthrough(upstream, "asyncio")
    bare_uv, bare_uv_address = start_passthrough(upstream, "uvloop")
    # Side by side: the gateway (on uvloop, as `gateway serve` runs) and the floor, a bare
    # grpc.aio relay, on asyncio's own loop and on uvloop; the tables keep this order.
    relays = {
        "gateway": (gateway.address, psutil.Process(gateway.process.pid)),
        "bare": (bare_address, psutil.Process(bare.pid)),
        "bare uvloop": (bare_uv_address, psutil.Process(bare_uv.pid)),
    }
    ttft: dict[tuple[str, int], list[float]] = {}
    cpu_per_token: dict[tuple[str, int], list[float]] = {}
    cpu_per_request: dict[tuple[str, int], list[float]] = {}

    def short(name: str, clients: int) -> None:
        """One-token requests through one relay, and its CPU per request recorded."""
        address, process = relays[name]
        before = sum(process.cpu_times()[:2])
        asyncio.run(short_requests(address, args.short, clients))
        spent = sum(process.cpu_times()[:2]) - before
        cpu_per_request.setdefault((name, clients), []).append(spent / args.short)

    def relayed(name: str, streams: int, tokens: int) -> list[float]:
        """TTFTs through one relay, and its CPU per token recorded."""
        address, process = relays[name]
        before = sum(process.cpu_times()[:2])
        firsts = asyncio.run(measure(address, True, streams, tokens, args.pace))
        spent = sum(process.cpu_times()[:2]) - before
        cpu_per_token.setdefault((name, streams), []).append(spent / (streams * tokens))
        return firsts

    try:
        for name in relays:  # warm up: connections, routing
            relayed(name, 8, 16)
        cpu_per_token.clear()
        for _ in range(args.rounds):
            for streams in args.streams:
                direct = asyncio.run(measure(upstream, False, streams, args.tokens, args.pace))
                ttft.setdefault(("direct", streams), []).extend(direct)
                for name in relays:
                    ttft.setdefault((name, streams), []).extend(relayed(name, streams, args.tokens))
            if args.short:
                for clients in SHORT_CLIENTS:
                    for name in relays:
                        short(name, clients)
            print(f"round {_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        gateway.stop()
        bare.kill()
        bare_uv.kill()

    how = f"{args.pace:g} tokens a second per stream" if args.pace else "as fast as it can"
    print(
        f"\nGateway overhead against an upstream that streams {args.tokens} tokens {how}, "
        f"{args.rounds} interleaved rounds (percentiles over every request)\n"
    )
    print(
        "| streams | TTFT direct p50 ms | TTFT via gateway p50 ms | added p50 ms "
        "| TTFT direct p99 ms | TTFT via gateway p99 ms | added p99 ms | gateway CPU per token us "
        "| bare relay us | bare relay on uvloop us | gateway / bare | gateway / bare on uvloop |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    cpu = {key: statistics.median(values) * 1e6 for key, values in cpu_per_token.items()}
    for streams in args.streams:
        d, g = ttft["direct", streams], ttft["gateway", streams]
        p = {q: (np.percentile(d, q) * 1e3, np.percentile(g, q) * 1e3) for q in (50, 99)}
        ours, bare_us, bare_uv_us = (cpu[name, streams] for name in relays)
        print(
            f"| {streams} | {p[50][0]:.2f} | {p[50][1]:.2f} | {p[50][1] - p[50][0]:.2f} "
            f"| {p[99][0]:.2f} | {p[99][1]:.2f} | {p[99][1] - p[99][0]:.2f} | {ours:.1f} "
            f"| {bare_us:.1f} | {bare_uv_us:.1f} | {ours / bare_us:.2f} | {ours / bare_uv_us:.2f} |"
        )
    print()
    one = min(args.streams)
    d, g = ttft["direct", one], ttft["gateway", one]
    added = (np.percentile(g, 50) - np.percentile(d, 50)) * 1e3
    worst_cpu = max(cpu["gateway", streams] for streams in args.streams)
    print(f"{'P1 TTFT added by the gateway, p50 (ms)':<44} {added:8.2f}  (goal <= 5)")
    print(f"{'P5 gateway CPU per relayed token (us)':<44} {worst_cpu:8.1f}  (goal <= 50)")
    if cpu_per_request:
        print(f"\nCPU per one-token request, ms ({args.short} per round and relay; goal <= 1 ms)\n")
        print("| clients | gateway | bare relay | bare relay on uvloop | gateway / bare |")
        print("|---|---|---|---|---|")
        for clients in SHORT_CLIENTS:
            ours, bare_ms, bare_uv_ms = (
                statistics.median(cpu_per_request[name, clients]) * 1e3 for name in relays
            )
            print(
                f"| {clients} | {ours:.2f} | {bare_ms:.2f} | {bare_uv_ms:.2f} "
                f"| {ours / bare_ms:.2f} |"
            )


if __name__ == "__main__":
    main()
