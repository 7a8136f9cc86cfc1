"""What constrained decoding costs, measured side by side in one run on the real models.

    python -m bench.structured [--streams 8] [--tokens 1200] [--tools 100 256] [--rounds 2]
        [--models gemma-3-270m smollm2-135m]

For Gemma 3 270M (262k-token vocabulary) and SmolLM2-135M (49k), with `--streams` requests
always in flight in one engine (a finished request is replaced at once), seeded draws at
temperature 0.8, it decodes `--tokens` tokens constrained two ways and the same prompts free
(ignore_eos, as many tokens a request as the constrained run averaged, so only the constraint
differs), `--rounds` times each in A B B A order after a warm-up, and prints the median
aggregate tok/s of each while `--streams` ran (until `--tokens` were out; the requests still
running then finish untimed) and their ratio:

- schema: every request constrained by a nested JSON Schema;
- tools N: every request constrained to call one of N realistic tools (tool_choice required:
  the grammar the host builds for it), for each N in `--tools`.

It also prints what the constraint cost on the engine thread per token (checking the sampled
token, picking again when it was rejected, advancing the matcher): p50, p99 and max in
microseconds; how often a token was rejected; the masks computed ahead beside llama_decode, in
microseconds of CPU per token; and the grammar's size and compile time, first and cached.
"""

import argparse
import functools
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airouter.output import Constraint, ConstraintKind, OutputOptions, Tool, ToolChoice, grammar_of
from modelhost.config import embedded_chat_model_config, embedded_model_config
from modelhost.constraints import ConstraintCompiler, TokenConstraint
from modelhost.device import default_threads
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.engines.llamacpp.sampler import TokenSampler
from modelhost.generation import Delta, EngineRequest, Event, Finish, Sampling
from modelhost.tools import CallFormat, call_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def realistic_tools(count: int, seed: int = 0) -> tuple[Tool, ...]:
    """`count` tools shaped like the ones agents carry: a verb and an object for a name, a
    sentence of description, two to six parameters of every JSON type, some nested, some
    enums, some required."""
    rng = random.Random(seed)
    verbs = ["get", "list", "create", "update", "delete", "search", "send", "schedule"]
    nouns = ["invoice", "ticket", "user", "order", "file", "event", "message", "report", "repo"]
    tools = []
    for i in range(count):
        properties: dict[str, Any] = {}
        for p in range(rng.randint(2, 6)):
            kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"])
            name = f"{rng.choice(['id', 'name', 'limit', 'query', 'status', 'tags', 'when'])}_{p}"
            if kind == "enum":
                properties[name] = {"enum": rng.sample(["low", "mid", "high", "open", "done"], 3)}
            elif kind == "array":
                properties[name] = {"type": "array", "items": {"type": "string"}, "maxItems": 5}
            elif kind == "object":
                properties[name] = {
                    "type": "object",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                    "required": ["from"],
                }
            else:
                properties[name] = {"type": kind, "description": f"the {name} to use"}
        required = rng.sample(sorted(properties), rng.randint(1, len(properties)))
        schema = {"type": "object", "properties": properties, "required": required}
        name = f"{rng.choice(verbs)}_{rng.choice(nouns)}_{i}"
        tools.append(Tool(name, f"{name.replace('_', ' ')} in the system", json.dumps(schema)))
    return tuple(tools)


@dataclass
class Costs:
    """What constraining cost: on the engine thread, per token a constraint advanced by (the
    check, picking again after a rejection, advancing); beside it, masks computed ahead."""

    pending: dict[int, float] = field(default_factory=dict)
    per_token: list[float] = field(default_factory=list)
    rejected: int = 0
    ahead_s: float = 0.0


def instrument(costs: Costs) -> Callable[[], None]:
    """Wraps the constraint's and the sampler's methods with timers; returns the function
    that unwraps them."""
    targets = [
        (TokenConstraint, "allows"),
        (TokenConstraint, "advance"),
        (TokenConstraint, "compute_mask"),
        (TokenSampler, "_pick_allowed"),
    ]
    originals = [(cls, name, getattr(cls, name)) for cls, name in targets]

    def timed(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                spent = time.perf_counter() - started
                if not threading.current_thread().name.startswith("engine-"):
                    costs.ahead_s += spent  # a mask computed beside llama_decode
                elif name != "compute_mask":
                    key = id(args[-1]) if name == "_pick_allowed" else id(self)
                    costs.pending[key] = costs.pending.get(key, 0.0) + spent
                    if name == "_pick_allowed":
                        costs.rejected += 1
                    elif name == "advance":
                        costs.per_token.append(costs.pending.pop(key))

        return wrapper

    def restore() -> None:
        for cls, name, original in originals:
            setattr(cls, name, original)

    for cls, name, original in originals:
        setattr(cls, name, timed(name, original))
    return restore


def run(
    engine: LlamaEngine,
    prompts: list[list[int]],
    streams: int,
    tokens: int,
    make: Callable[[int, list[int], Callable[[list[Event]], None]], EngineRequest],
) -> tuple[float, float]:
    """Keeps `streams` requests in flight until `tokens` tokens are out; the aggregate tok/s
    until then (the requests still running drain untimed: a long last request decoding alone
    is not the rate at `streams` streams), and the tokens a request generated on average."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"tokens": 0, "submitted": 0, "running": 0, "finished_tokens": 0, "finished": 0}
    reached: list[float] = []  # when `tokens` were out
    counted = 0  # the tokens out then

    def submit() -> None:
        n = state["submitted"]
        state["submitted"] += 1
        state["running"] += 1
        engine.submit(make(n, prompts[n % len(prompts)], on_events))

    def on_events(events: list[Event]) -> None:
        nonlocal counted
        with lock:
            for event in events:
                if isinstance(event, Delta):
                    state["tokens"] += event.token_count
                    if state["tokens"] >= tokens and not reached:
                        reached.append(time.perf_counter())
                        counted = state["tokens"]
                elif isinstance(event, Finish):
                    state["running"] -= 1
                    state["finished"] += 1
                    state["finished_tokens"] += event.completion_tokens
                    if not reached:
                        submit()
                    elif state["running"] == 0:
                        done.set()

    started = time.perf_counter()
    with lock:
        for _ in range(streams):
            submit()
    assert done.wait(1800), "the run did not finish"
    return counted / (reached[0] - started), state["finished_tokens"] / state["finished"]


def constrained(
    compiler: ConstraintCompiler,
    grammar: str,
    n: int,
    prompt: list[int],
    on_events: Callable[[list[Event]], None],
) -> EngineRequest:
    return EngineRequest(
        id=str(n), prompt=prompt, sampling=Sampling(temperature=0.8, seed=n), max_tokens=256,
        stop=[], on_events=on_events, arrived=time.perf_counter(),
        constraint=compiler.constraint(grammar, "bench"),
    )  # fmt: skip


def free(
    length: int, n: int, prompt: list[int], on_events: Callable[[list[Event]], None]
) -> EngineRequest:
    return EngineRequest(
        id=str(n), prompt=prompt, sampling=Sampling(temperature=0.8, seed=n), max_tokens=length,
        stop=[], on_events=on_events, arrived=time.perf_counter(), ignore_eos=True,
    )  # fmt: skip


def measure(label: str, path: Path, args: argparse.Namespace) -> None:
    settings = ContextSettings(
        slots=args.streams, context_per_slot=512, batch_tokens=256, threads=default_threads()
    )
    model = LlamaModel(path, gpu_layers=0, settings=settings)
    engine = LlamaEngine(model, name=label, slots=args.streams, max_queue=args.streams)
    try:
        compiler = engine.constraints()
        started = time.perf_counter()
        compiler.tokenizer()
        print(f"\n{label}: {model.n_vocab}-token vocabulary (llguidance's view of it built in "
              f"{time.perf_counter() - started:.1f} s, once per load)")  # fmt: skip
        # As a user of structured output prompts a small model: the fields named, an example.
        example = {
            "name": "Ann",
            "age": 41,
            "role": "user",
            "tags": ["x"],
            "address": {"city": "Oslo"},
        }
        prompts = [
            model.tokenize(
                f"People as JSON objects with name, age, height_m, role (admin, user or guest), "
                f"tags and address.city.\nPerson 1: {json.dumps(example)}\nPerson {i + 2}:"
            )
            for i in range(64)
        ]

        schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
        runs = {"schema": (grammar_of(schema, "schema"), prompts)}
        for count in args.tools:
            tools = realistic_tools(count)
            options = OutputOptions(
                tools=tools, tool_choice=ToolChoice.REQUIRED, parallel_tool_calls=False
            )
            # A few-shot prompt of calls, as a model offered the tools writes them.
            shown = "\n".join(f"- {t.name}: {t.description}" for t in tools[:20])
            calls = [
                model.tokenize(f"Tools:\n{shown}\nCall {i}:\n<tool_call>\n") for i in range(64)
            ]
            runs[f"tools {count}"] = (call_grammar(options, CallFormat.HERMES), calls)
        print(
            f"  {'':<10} {'free tok/s':>10} {'tok/s':>7} {'ratio':>5}  the constraint per "
            "token: p50, p99, max us; rejected; masks ahead us/token; grammar: size, compiled, "
            "cached"
        )
        run(engine, prompts, args.streams, args.tokens, functools.partial(free, 64))  # warm-up
        for name, (grammar, asked) in runs.items():
            started = time.perf_counter()
            compiler.constraint(grammar, name)
            first = time.perf_counter() - started
            started = time.perf_counter()
            compiler.constraint(grammar, name)
            cached = time.perf_counter() - started
            costs = Costs()
            rates: dict[str, list[float]] = {"free": [], "constrained": []}
            length = 64.0
            # Rounds in A B B A order, so neither side always runs first on a noisy machine.
            for side in ["constrained", "free", "free", "constrained"] * (args.rounds // 2):
                if side == "free":
                    make = functools.partial(free, round(length))
                    rates[side].append(run(engine, asked, args.streams, args.tokens, make)[0])
                    continue
                restore = instrument(costs)
                try:
                    make = functools.partial(constrained, compiler, grammar)
                    rate, length = run(engine, asked, args.streams, args.tokens, make)
                finally:
                    restore()
                rates[side].append(rate)
            baseline, rate = (statistics.median(rates[s]) for s in ("free", "constrained"))
            us = sorted(c * 1e6 for c in costs.per_token)
            p99 = us[min(len(us) - 1, int(len(us) * 0.99))]
            print(
                f"  {name:<10} {baseline:10.1f} {rate:7.1f} {rate / baseline:5.2f}  "
                f"{statistics.median(us):.0f}, {p99:.0f}, {us[-1]:.0f}; "
                f"{costs.rejected / len(us):.1%}; {costs.ahead_s * 1e6 / len(us):.0f}; "
                f"{len(grammar) >> 10} KiB, {first * 1e3:.1f} ms, {cached * 1e3:.2f} ms"
            )
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1200, help="tokens per run")
    parser.add_argument("--tools", type=int, nargs="*", default=[100, 256])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each side (even)")
    parser.add_argument(
        "--models", nargs="*", default=["gemma-3-270m", "smollm2-135m"], help="which to run"
    )
    args = parser.parse_args()
    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None
    gemma = embedded_model_config().model_path(Path.home() / ".cache" / "airouter")
    print(f"{args.streams} streams, {args.tokens} tokens a run, temperature 0.8, seeded")
    for label, path in (("gemma-3-270m", gemma), ("smollm2-135m", chat.path)):
        if label in args.models:
            measure(label, path, args)


if __name__ == "__main__":
    main()
