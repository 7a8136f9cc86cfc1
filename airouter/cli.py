"""`airouter`: run and talk to airouter from the shell.

airouter up                                  a modelhost and a gateway here (Ctrl-C stops)
airouter generate "Why is the sky blue?"     tokens as they arrive
airouter generate --json "..."               one JSON object per event
airouter models                              the models the gateway can reach
airouter status --modelhost HOST:PORT [--watch]
                                             a modelhost's memory, models and load
airouter hosts                               one line per host the gateway knows
airouter batch submit requests.jsonl --wait -o results.jsonl
                                             an OpenAI batch file, run across the hosts
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from airouter import add_common_flags
from airouter.batch_cli import add_batch_commands, run_batch
from airouter.keys_cli import add_keys_commands, run_keys
from airouter.labels import JSON_HELP, enum_label, format_bytes, message_json
from airouter.security import TOKEN_ENV, SecurityError, bearer, channel_credentials, read_secret
from airouter.up import add_up_command, run_up
from airouter.v1 import (
    embed_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    generate_pb2,
    host_status_pb2,
    model_host_pb2,
    model_host_pb2_grpc,
)

DEFAULT_GATEWAY = "127.0.0.1:50050"
DEFAULT_MODELHOST = "127.0.0.1:50051"
# The zero-config host's models: an instruct model for chat turns, a base model for --raw.
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_RAW_MODEL = "gemma-3-270m"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# Lines of stdin sent in one Embed request: vectors print as each request returns.
EMBED_CHUNK = 256
# Enough for an answer in a few seconds on a laptop CPU; --max-tokens 0 lifts it (the rest of
# the model's context).
DEFAULT_MAX_TOKENS = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airouter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_flags(parser)
    parser.add_argument(
        "--gateway",
        default=os.environ.get("AIROUTER_GATEWAY", DEFAULT_GATEWAY),
        help="gateway HOST:PORT (default $AIROUTER_GATEWAY or %(default)s)",
    )
    parser.add_argument(
        "--ca",
        type=Path,
        default=os.environ.get("AIROUTER_CA") or None,
        help="use TLS, trusting this CA (default $AIROUTER_CA; unset: plaintext)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"bearer token to send (default ${TOKEN_ENV}; the token is never printed)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", help="what to say (or, with --raw, the text to continue)")
    gen.add_argument(
        "--model",
        help=f"model, alias or capability:<tag> (default {DEFAULT_CHAT_MODEL}; with --raw "
        f"{DEFAULT_RAW_MODEL})",
    )
    gen.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens to generate (default %(default)s; 0: up to the context's end)",
    )
    gen.add_argument(
        "--temperature", type=float, help="0 picks the likeliest token (default: the host's, 0.8)"
    )
    gen.add_argument("--seed", type=int, help="the same seed and request give the same text")
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, not as a chat turn")
    gen.add_argument("--json", action="store_true", help="print one JSON object per event")

    embed = commands.add_parser(
        "embed",
        help="embed texts: one JSON array of floats per text on stdout, in order",
        description="Embeds each TEXT, or each line of stdin when no TEXT is given, with an "
        "embedding model; prints one JSON array per input, in input order.",
    )
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: stdin)")
    embed.add_argument(
        "--model", default=DEFAULT_EMBEDDING_MODEL, help="embedding model (default %(default)s)"
    )
    embed.add_argument(
        "--dimensions", type=int, help="fewer leading dimensions (Matryoshka models only)"
    )

    models = commands.add_parser("models", help="list the models the gateway can reach")
    models.add_argument("--json", action="store_true", help=JSON_HELP)

    status = commands.add_parser("status", help="show a modelhost's memory, models and load")
    status.add_argument(
        "--modelhost",
        default=os.environ.get("AIROUTER_MODELHOST", DEFAULT_MODELHOST),
        help="modelhost HOST:PORT (default $AIROUTER_MODELHOST or %(default)s)",
    )
    status.add_argument("--watch", action="store_true", help="redraw on every change")
    status.add_argument("--json", action="store_true", help=JSON_HELP)

    hosts = commands.add_parser(
        "hosts",
        help="one line per modelhost: memory, models, load (exit 0: every host up; 1: some "
        "host down, cooling down, draining or unreachable)",
    )
    hosts.add_argument(
        "--modelhost",
        action="append",
        help="ask this modelhost directly, repeatable (or $AIROUTER_MODELHOSTS, "
        "comma-separated); default: every host the gateway knows",
    )
    hosts.add_argument("--json", action="store_true", help=JSON_HELP)

    add_batch_commands(commands)
    add_keys_commands(commands)
    add_up_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return run_up(args)
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "hosts":
            return _hosts(args)
        with _open(args.gateway, args) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            if args.command == "generate":
                return _generate(stub, args)
            if args.command == "batch":
                return run_batch(stub, args)
            if args.command == "embed":
                return _embed(stub, args)
            if args.command == "keys":
                return run_keys(stub, args)
            return _models(stub, args)
    except grpc.RpcError as exc:
        print(f"airouter: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except SecurityError as exc:
        print(f"airouter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _generate(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    model = args.model or (DEFAULT_RAW_MODEL if args.raw else DEFAULT_CHAT_MODEL)
    request = gateway_pb2.GatewayGenerateRequest(
        model=model,
        sampling=generate_pb2.SamplingParameters(temperature=args.temperature, seed=args.seed),
        stopping=generate_pb2.StoppingCriteria(max_tokens=args.max_tokens or None, stop=args.stop),
    )
    if args.raw:
        request.prompt = args.prompt
    else:
        request.chat.messages.add(role="user", content=args.prompt)
    finished = None
    for response in stub.Generate(request):
        if args.json:
            print(message_json(response), flush=True)
        elif response.HasField("token"):
            sys.stdout.write(response.token.text)
            sys.stdout.flush()
        if response.HasField("finished"):
            finished = response.finished
    if finished is None:
        print("airouter: the stream ended without a final message", file=sys.stderr)
        return 1
    if not args.json:
        print()
    if finished.reason == generate_pb2.FINISH_REASON_ERROR:
        print(f"airouter: generation failed: {finished.error_message}", file=sys.stderr)
        return 1
    return 0


def _embed(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    texts: Iterable[str] = args.texts or (line.rstrip("\n") for line in sys.stdin)
    inputs = 0
    tokens = 0
    for chunk in _chunks(texts, EMBED_CHUNK):
        request = embed_pb2.EmbedRequest(
            model=args.model,
            inputs=[embed_pb2.EmbedInput(text=text) for text in chunk],
            dimensions=args.dimensions,
        )
        answer = stub.Embed(gateway_pb2.GatewayEmbedRequest(request=request))
        for embedding in answer.response.embeddings:
            print(json.dumps(list(embedding.values)))
        sys.stdout.flush()
        inputs += len(chunk)
        tokens += answer.response.prompt_tokens
    if not inputs:
        print("airouter: nothing to embed: give TEXT arguments or lines on stdin", file=sys.stderr)
        return 2
    print(f"airouter: {inputs} embedded, {tokens} tokens", file=sys.stderr)
    return 0


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _models(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> int:
    response = stub.ListModels(gateway_pb2.GatewayListModelsRequest())
    if args.json:
        print(message_json(response, indent=2))
        return 0
    print(
        f"{'MODEL':<24} {'ALIASES':<14} {'STATE':<11} {'CONTEXT':>7} {'SLOTS':>5}  "
        f"{'CAPABILITIES':<14} HOSTS"
    )
    for m in response.models:
        state = _state_name(m.state)
        hosts = ", ".join(h + (" (resident)" if h in m.resident_hosts else "") for h in m.hosts)
        print(
            f"{m.name:<24} {','.join(m.aliases) or '-':<14} {state:<11} {m.context_length:>7} "
            f"{m.slots:>5}  {','.join(m.capabilities):<14} {hosts}"
        )
    for host in response.unreachable_hosts:
        print(f"(unreachable: {host})", file=sys.stderr)
    return 0


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def _open(address: str, args: argparse.Namespace) -> grpc.Channel:
    """A channel to address: TLS when --ca is given, with the token when there is one."""
    if args.ca:
        channel = grpc.secure_channel(address, channel_credentials(args.ca))
    else:
        channel = grpc.insecure_channel(address)
    token = read_secret(args.token_file, TOKEN_ENV)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def _status(args: argparse.Namespace) -> int:
    with _open(args.modelhost, args) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        if not args.watch:
            status = stub.GetStatus(model_host_pb2.GetStatusRequest(), timeout=10).status
            _print_status(status, args.json)
            return 0
        redraw = sys.stdout.isatty() and not args.json
        for update in stub.WatchStatus(model_host_pb2.WatchStatusRequest()):
            if redraw:
                print("\033[H\033[2J", end="")  # clear the terminal
            elif not args.json:
                print()  # a pipe or a file gets one table after another, no escapes
            _print_status(update.status, args.json)
            sys.stdout.flush()
    return 0


def _hosts(args: argparse.Namespace) -> int:
    addresses = args.modelhost or os.environ.get("AIROUTER_MODELHOSTS", "").split(",")
    addresses = [a for a in addresses if a]
    if addresses:  # ask each modelhost directly
        with ThreadPoolExecutor(len(addresses)) as pool:
            hosts = list(pool.map(lambda a: _host_info(a, args), addresses))
    else:  # ask the gateway about every host it knows
        with _open(args.gateway, args) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            hosts = list(stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts)
    if args.json:
        response = gateway_pb2.ListHostsResponse(hosts=hosts)
        print(message_json(response, indent=2))
    else:
        print(format_hosts(hosts))
    return 0 if all(h.state == gateway_pb2.HOST_STATE_UP for h in hosts) else 1


def _host_info(address: str, args: argparse.Namespace) -> gateway_pb2.HostInfo:
    with _open(address, args) as channel:
        try:
            response = model_host_pb2_grpc.ModelHostStub(channel).GetStatus(
                model_host_pb2.GetStatusRequest(), timeout=5
            )
        except grpc.RpcError as exc:
            return gateway_pb2.HostInfo(
                address=address,
                state=gateway_pb2.HOST_STATE_DOWN,
                state_detail=f"{exc.code().name}: {exc.details()}",
            )
    return gateway_pb2.HostInfo(
        address=address, state=gateway_pb2.HOST_STATE_UP, status=response.status
    )


def format_hosts(hosts: list[gateway_pb2.HostInfo]) -> str:
    """One line per modelhost: its state (and why, when it is not up), memory, resident
    models and load."""
    lines = [
        f"{'HOST':<22} {'STATE':<12} {'DEVICE':<6} {'MEMORY (MODELS/BUDGET)':<24} {'SLOTS':>7} "
        f"{'QUEUE':>5} {'TOK/S':>7}  RESIDENT"
    ]
    for host in hosts:
        state = enum_label(gateway_pb2.HostState, host.state)
        if not host.HasField("status"):
            lines.append(f"{host.address:<22} {state:<12} {host.state_detail}")
            continue
        status = host.status
        resident = [m for m in status.models if m.state == generate_pb2.MODEL_STATE_READY]
        used, budget = status.memory.models_bytes, status.memory.budget_bytes
        memory = f"{format_bytes(used)} / {format_bytes(budget)}"
        busy = sum(m.slots_busy for m in resident)
        slots = sum(m.slots for m in resident)
        lines.append(
            f"{host.address:<22} {state:<12} {status.device:<6} {memory:<24} "
            f"{f'{busy}/{slots}':>7} {sum(m.queue_depth for m in resident):>5} "
            f"{sum(m.recent_tokens_per_second for m in resident):>7.1f}  "
            f"{', '.join(m.name for m in resident) or '-'}"
        )
        if host.state != gateway_pb2.HOST_STATE_UP and host.state_detail:
            lines.append(f"  {host.state_detail}")
    return "\n".join(lines)


def _print_status(status: host_status_pb2.HostStatus, as_json: bool) -> None:
    if as_json:
        print(message_json(status), flush=True)
        return
    print(format_status(status), flush=True)


def format_status(status: host_status_pb2.HostStatus) -> str:
    """A modelhost's status as a readable table."""
    m, c = status.memory, status.cache
    lines = [
        f"host {status.host_name}  device {status.device}  memory: models "
        f"{format_bytes(m.models_bytes)} of a {format_bytes(m.budget_bytes)} budget; device "
        f"{format_bytes(m.used_bytes)} used of {format_bytes(m.total_bytes)}",
        f"cache: {c.hits} hits, {c.misses} misses, {c.evictions} evictions, {c.loads} loads "
        f"({c.load_seconds_total:.1f} s), {c.load_failures} failed loads",
        *(
            f"gpu {g.index} {g.name}: {format_bytes(g.memory_used_bytes)} of "
            f"{format_bytes(g.memory_total_bytes)} used, {g.utilization_percent}% busy, "
            f"{g.temperature_celsius} C, {g.power_watts:.0f} W"
            for g in status.gpus
        ),
        "",
        f"{'MODEL':<22} {'ENGINE':<9} {'STATE':<11} {'MEMORY':>10} {'SLOTS':>7} {'QUEUE':>5} "
        f"{'TOK/S':>7} {'TTFT ms':>8} {'LOAD s':>6}  {'KEEP-ALIVE':<10} LAST USED",
    ]
    now = time.time()
    for model in status.models:
        state = _state_name(model.state)
        memory = format_bytes(model.footprint_bytes) + ("" if model.footprint_measured else "~")
        if model.pinned:
            keep = "pinned"
        elif model.keep_alive_seconds < 0:
            keep = "always"
        else:
            keep = f"{model.keep_alive_seconds:g} s"
        used = "never"
        if model.HasField("last_used"):
            used = f"{now - model.last_used.ToNanoseconds() / 1e9:.0f} s ago"
        lines.append(
            f"{model.name:<22} {model.engine:<9} {state:<11} {memory:>10} "
            f"{f'{model.slots_busy}/{model.slots}':>7} {model.queue_depth:>5} "
            f"{model.recent_tokens_per_second:>7.1f} {model.recent_time_to_first_token_ms:>8.1f} "
            f"{model.load_seconds:>6.2f}  {keep:<10} {used}"
        )
        if model.state_detail:
            lines.append(f"  {model.state_detail}")
    return "\n".join(lines)


def _state_name(state: int) -> str:
    return enum_label(generate_pb2.ModelState, state)


if __name__ == "__main__":
    sys.exit(main())
