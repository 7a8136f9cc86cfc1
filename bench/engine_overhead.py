"""What the engine spends around `llama_decode` each step: the Python that a GPU would leave
setting the pace.

    python -m bench.engine_overhead [--steps 48] [--vocab 49152 262144] [--sequences 1 8 64]
        [--device cpu|cuda] [--parallel-logits N] [--sample-in-graph] [--json]

For each vocabulary size it writes a randomly initialised Llama-shaped model with the `gguf`
package (one layer, 32-wide: `llama_decode` is cheap, so what is around it shows; its logits
spread like a real model's, a few hundred tokens within 8 of the top one), and runs the real
engine (LlamaEngine, its thread, events handed to an asyncio loop as the host's serving does)
with 1, 8 and 64 sequences at once, greedy and with the default sampling (temperature 0.8,
top-k 40, top-p 0.95, min-p 0.05, seeded). Over the steps that only generate (no prompt in
the batch) it prints, per step: wall time, time inside `llama_decode`, and the rest split into
batch building, logits fetch, sampling, detokenizing (each token's bytes, text, stop strings)
and delivery to the event loop, in microseconds per step and per sequence; beside it the
floor no engine escapes, `row_scan_us`: one `numpy.argmax` over a row of that many logits,
and the goal (issue 28): overhead <= 100 us per step + per sequence row_scan_us + 15 us
(greedy) or + 40 us (default sampling).

With `--device cuda` every layer and the output run on the GPU, and the logits reach the
host as they do there (copied from the device after each step): the device check runs it,
also with `--parallel-logits` lower than the engine's threshold for reading a step's rows
with several threads (sampler.PARALLEL_LOGITS, measured on a CPU), to see where it pays there,
and with `--sample-in-graph`: the tokens from the candidates llama.cpp finds inside the
decode (models.toml's sample_in_graph), whose rows never reach the host. Then llama_decode
holds the sampling, so compare the wall times; the digests must equal those from the rows.

It also prints a digest of every token generated: greedy text and seeded draws must not
change when the engine gets faster. With --json the last line is one JSON object:
{"rows": [{"vocab": ..., "sampling": ..., "sequences": ..., "overhead_us_per_step": ...,
"row_scan_us": ..., ...}, ...]}.
"""

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from bench.random_llama import write_model
from modelhost.engines.llamacpp import sampler
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.engines.scheduler import STEP_PHASES, StepProfile
from modelhost.generation import Delta, EngineRequest, Event, Finish, Sampling

GREEDY = Sampling(temperature=0.0)
DEFAULT = Sampling()  # llama.cpp's defaults
GOAL_BASE_US = 100.0
GOAL_PER_SEQUENCE_US = {"greedy": 15.0, "default": 40.0}
PROMPT = [1, 300, 301, 302]  # BOS and three words


@dataclass
class Row:
    vocab: int
    sampling: str
    sequences: int
    profile: StepProfile
    row_scan_us: float
    step_scan_us: float  # the same argmax over `sequences` rows at once, per row
    digest: str

    def per_step_us(self, phase: str) -> float:
        return self.profile.seconds[phase] / max(self.profile.steps, 1) * 1e6

    @property
    def wall_us(self) -> float:
        return sum(self.per_step_us(phase) for phase in STEP_PHASES)

    @property
    def overhead_us(self) -> float:
        return self.wall_us - self.per_step_us("decode")

    @property
    def goal_us(self) -> float:
        return self._goal(self.row_scan_us)

    @property
    def goal_at_step_scan_us(self) -> float:
        """The goal with the floor measured over the step's rows (out of cache at 64)."""
        return self._goal(max(self.row_scan_us, self.step_scan_us))

    def _goal(self, scan_us: float) -> float:
        return GOAL_BASE_US + self.sequences * (scan_us + GOAL_PER_SEQUENCE_US[self.sampling])

    def as_json(self) -> dict[str, object]:
        return {
            "vocab": self.vocab,
            "sampling": self.sampling,
            "sequences": self.sequences,
            "steps": self.profile.steps,
            "wall_us_per_step": round(self.wall_us, 1),
            "decode_us_per_step": round(self.per_step_us("decode"), 1),
            "overhead_us_per_step": round(self.overhead_us, 1),
            "overhead_us_per_sequence": round(self.overhead_us / self.sequences, 1),
            **{
                f"{phase}_us_per_step": round(self.per_step_us(phase), 1)
                for phase in STEP_PHASES
                if phase != "decode"
            },
            "row_scan_us": round(self.row_scan_us, 1),
            "step_scan_us": round(self.step_scan_us, 1),
            "goal_us_per_step": round(self.goal_us, 1),
            "meets_goal": self.overhead_us <= self.goal_us,
            "goal_at_step_scan_us_per_step": round(self.goal_at_step_scan_us, 1),
            "meets_goal_at_step_scan": self.overhead_us <= self.goal_at_step_scan_us,
            "digest": self.digest,
        }


def row_scan_us(vocab: int, rows: int = 1) -> float:
    """One numpy.argmax over `rows` float32 rows of `vocab` logits, per row, median of many;
    the rows rewritten before each, as llama_decode writes them (one row stays in cache, 64
    rows of a large vocabulary do not)."""
    logits = np.random.default_rng(1).standard_normal((rows, vocab)).astype(np.float32)
    times = []
    for _ in range(max(200 // rows, 20)):
        logits += 0.0
        started = time.perf_counter()
        logits.argmax(axis=1)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / rows * 1e6


async def run(engine: LlamaEngine, sampling: Sampling, sequences: int, steps: int) -> str:
    """`sequences` requests of `steps` tokens at once; the digest of every token's text."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, list[Event]]] = asyncio.Queue()

    def received(i: int, events: list[Event]) -> None:  # as the host's serving receives them
        inbox.put_nowait((i, events))

    texts: list[list[str]] = [[] for _ in range(sequences)]
    for i in range(sequences):
        seeded = Sampling(**{**sampling.__dict__, "seed": i}) if sampling.temperature else sampling
        engine.submit(
            EngineRequest(
                id=str(i),
                prompt=[*PROMPT, 400 + i],
                sampling=seeded,
                max_tokens=steps,
                stop=[],
                on_events=partial(received, i),
                loop=loop,
                arrived=time.perf_counter(),
                ignore_eos=True,
            )
        )
    finished = 0
    while finished < sequences:
        i, events = await inbox.get()
        for event in events:
            if isinstance(event, Delta):
                texts[i].append(event.text)
            elif isinstance(event, Finish):
                assert event.completion_tokens == steps, event
                finished += 1
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def measure(path: Path, vocab: int, args: argparse.Namespace) -> list[Row]:
    slots = max(args.sequences)
    model = LlamaModel(
        path,
        gpu_layers=0 if args.device == "cpu" else -1,
        settings=ContextSettings(
            slots=slots, context_per_slot=args.steps + 16, batch_tokens=512, threads=args.threads
        ),
    )
    engine = LlamaEngine(
        model,
        name=f"random-{vocab}",
        slots=slots,
        max_queue=0,
        sample_in_graph=args.sample_in_graph,
    )
    scan = row_scan_us(vocab)
    step_scan = {sequences: row_scan_us(vocab, sequences) for sequences in args.sequences}
    rows = []
    try:
        for name, sampling in (("greedy", GREEDY), ("default", DEFAULT)):
            for sequences in args.sequences:
                asyncio.run(run(engine, sampling, sequences, 4))  # warm
                engine.profile = profile = StepProfile()
                digest = asyncio.run(run(engine, sampling, sequences, args.steps))
                engine.profile = None
                rows.append(
                    Row(vocab, name, sequences, profile, scan, step_scan[sequences], digest)
                )
    finally:
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=48, help="tokens each sequence generates")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    parser.add_argument("--sequences", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--parallel-logits",
        type=int,
        default=sampler.PARALLEL_LOGITS,
        help="logits a step needs for its rows to be read by several threads",
    )
    parser.add_argument(
        "--sample-in-graph",
        action="store_true",
        help="tokens from the candidates llama.cpp finds in its graph (models.toml's "
        "sample_in_graph), not from rows of logits",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    sampler.PARALLEL_LOGITS = args.parallel_logits
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for vocab in args.vocab:
            path = write_model(Path(folder) / f"random-{vocab}.gguf", vocab)
            rows += measure(path, vocab, args)
    header = (
        "| vocab | sampling | seqs | wall | llama_decode | overhead | "
        + " | ".join(p for p in STEP_PHASES if p != "decode")
        + " | overhead/seq | row_scan | goal | step_scan | goal at step_scan | digest |"
    )
    where = (
        "sampled in llama.cpp's graph"
        if args.sample_in_graph
        else f"rows read by several threads from {args.parallel_logits} logits a step"
    )
    print(
        f"\nmicroseconds per decode step ({args.steps} tokens a sequence, {args.device}, {where})\n"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        phases = " | ".join(f"{row.per_step_us(p):.0f}" for p in STEP_PHASES if p != "decode")
        verdict = "ok" if row.overhead_us <= row.goal_us else "over"
        at_scan = "ok" if row.overhead_us <= row.goal_at_step_scan_us else "over"
        print(
            f"| {row.vocab} | {row.sampling} | {row.sequences} | {row.wall_us:.0f} | "
            f"{row.per_step_us('decode'):.0f} | {row.overhead_us:.0f} | {phases} | "
            f"{row.overhead_us / row.sequences:.1f} | {row.row_scan_us:.1f} | "
            f"{row.goal_us:.0f} {verdict} | {row.step_scan_us:.1f} | "
            f"{row.goal_at_step_scan_us:.0f} {at_scan} | {row.digest} |"
        )
    if args.json:
        print(json.dumps({"rows": [row.as_json() for row in rows]}))


if __name__ == "__main__":
    main()
