"""What sampling costs on a large vocabulary (the embedded Gemma: 262k tokens).

    python -m bench.sampling [--rounds 3] [--streams 8] [--tokens 64]

1. Per token, in-process, on logits rows the model produced (greedy decoding of a few
   prompts): TokenSampler for greedy, the default settings (top-k 40), and top_k = 0 (top-p
   0.95 and min-p 0.05 over the whole vocabulary; also top-p alone), against llama.cpp's own
   chain over the whole vocabulary, which is what top_k = 0 cost before numpy did the
   truncation.
2. Served, a modelhost process with 8 slots: aggregate tok/s of --streams concurrent requests
   with each setting, and a mixed batch (half default, half top_k = 0), interleaved round by
   round.
"""

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import grpc
import llama_cpp
import numpy as np

from airouter.v1 import model_host_pb2, model_host_pb2_grpc
from modelhost.config import embedded_model_config
from modelhost.device import default_threads
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.engines.llamacpp.sampler import TokenSampler, _llama_chain
from modelhost.generation import Sampling
from tests.processes import ServerProcess

SETTINGS = {
    "greedy": Sampling(temperature=0.0),
    "default (top-k 40)": Sampling(),
    "top_k 0 (top-p .95, min-p .05)": Sampling(top_k=0),
    "top_k 0, top-p .95 only": Sampling(top_k=0, min_p=0.0),
}
PROMPTS = [
    "The history of the printing press begins",
    "def quicksort(items):",
    "Dear hiring manager, I am writing to",
    "The three most important rules of chess are",
]


def logits_rows(model: LlamaModel, tokens: int) -> list[np.ndarray]:
    """The logits of greedy decoding `tokens` steps from each prompt."""
    rows = []
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    for prompt in PROMPTS:
        llama_cpp.llama_memory_clear(model.memory, True)
        ids = model.tokenize(prompt)
        for step in range(tokens):
            chunk = ids if step == 0 else ids[-1:]
            start = 0 if step == 0 else len(ids) - 1
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(chunk) - 1
            assert llama_cpp.llama_decode(model.ctx, batch) == 0
            row = llama_cpp.llama_get_logits_ith(model.ctx, len(chunk) - 1)
            rows.append(np.ctypeslib.as_array(row, (model.n_vocab,)).copy())
            ids.append(int(rows[-1].argmax()))
    llama_cpp.llama_batch_free(batch)
    return rows


def ms_per_token(rows: list[np.ndarray], sampling: Sampling, *, llama_chain: bool) -> float:
    sampler = TokenSampler(sampling, len(rows[0]), [])
    if llama_chain:  # before: every token a candidate of llama.cpp's whole chain
        sampler.close()
        sampler._truncate = False
        sampler._chain = _llama_chain(sampling)
    row = np.empty_like(rows[0])
    elapsed = 0.0
    for source in rows:
        row[:] = source  # the sampler may write into its row
        started = time.perf_counter()
        sampler.sample(row)
        elapsed += time.perf_counter() - started
    sampler.close()
    return elapsed / len(rows) * 1e3


async def served(
    address: str, model: str, settings: list[Sampling], tokens: int, tag: str
) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)

        async def one(i: int, sampling: Sampling) -> int:
            request = model_host_pb2.GenerateRequest(model=model, prompt=f"{tag} {PROMPTS[i % 4]}")
            request.sampling.temperature = sampling.temperature
            request.sampling.top_k = sampling.top_k
            request.sampling.top_p = sampling.top_p
            request.sampling.min_p = sampling.min_p
            request.stopping.max_tokens = tokens
            request.stopping.ignore_eos = True
            generated = 0
            async for response in stub.Generate(request, timeout=600):
                if response.HasField("finished"):
                    generated = response.finished.usage.completion_tokens
            return generated

        started = time.perf_counter()
        done = await asyncio.gather(*(one(i, s) for i, s in enumerate(settings)))
        return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    config = embedded_model_config()
    path = config.model_path(Path.home() / ".cache" / "airouter")
    model = LlamaModel(
        path, gpu_layers=0, settings=ContextSettings(1, 1024, 512, default_threads())
    )
    rows = logits_rows(model, 16)
    model.close()
    print(f"1. per token, {len(rows)} logits rows of {config.name} ({len(rows[0])} tokens)\n")
    print("| setting | TokenSampler ms | llama.cpp chain over the vocabulary ms |")
    print("|---|---|---|")
    for name, sampling in SETTINGS.items():
        ours = statistics.median(ms_per_token(rows, sampling, llama_chain=False) for _ in range(3))
        chain = ""
        if sampling.top_k == 0:
            runs = [ms_per_token(rows, sampling, llama_chain=True) for _ in range(3)]
            chain = f"{statistics.median(runs):.2f}"
        print(f"| {name} | {ours:.2f} | {chain} |")

    mixes = {
        "greedy": [SETTINGS["greedy"]] * args.streams,
        "default": [SETTINGS["default (top-k 40)"]] * args.streams,
        "top_k 0": [SETTINGS["top_k 0 (top-p .95, min-p .05)"]] * args.streams,
        "half default, half top_k 0": [
            SETTINGS["default (top-k 40)"] if i % 2 else SETTINGS["top_k 0 (top-p .95, min-p .05)"]
            for i in range(args.streams)
        ],
    }
    host = ServerProcess("modelhost", "serve", "--device", "cpu")
    rates: dict[str, list[float]] = {name: [] for name in mixes}
    try:
        asyncio.run(served(host.address, config.name, mixes["greedy"], 8, "warm-up"))
        for round_ in range(args.rounds):
            for name, settings in mixes.items():
                tag = f"round {round_} {name}"
                rates[name].append(
                    asyncio.run(served(host.address, config.name, settings, args.tokens, tag))
                )
    finally:
        host.stop()
    print(
        f"\n2. served: {args.streams} concurrent streams of {args.tokens} tokens, the embedded "
        f"model's 8 slots, {args.rounds} interleaved rounds (median)\n"
    )
    print("| sampling | aggregate tok/s | / greedy |")
    print("|---|---|---|")
    greedy = statistics.median(rates["greedy"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / greedy:.2f} |")


if __name__ == "__main__":
    main()
