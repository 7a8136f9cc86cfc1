"""Greedy sampling in llama.cpp's graph ("backend sampling") against reading the logits.

    python -m bench.backend_sampling [--device cpu|cuda] [--steps 30]

llama.cpp 0.3.36 can run a sampler chain inside the decode's graph, on the device that
computes it (`llama_context_params.samplers`, experimental), and hand back one token per
sequence (`llama_get_sampled_token_ith`) instead of a row of logits per sequence, which the
engine reads and reduces with numpy (1 MB a row at a 262k vocabulary). This measures both
ways on bench.engine_overhead's randomly initialised one-layer models (bench.random_llama),
at 49k and 262k tokens and 8 and 64 sequences, each a greedy decode of `--steps` steps (the
first 5 not counted): per step the time in `llama_decode`, the time to the tokens after it,
and their sum, alternating the two ways twice. Both must pick the same tokens (a digest per way).
Whether the engine should sample in the graph is decided by these sums, on each device.
"""

import argparse
import ctypes
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

from bench.random_llama import write_model
from modelhost.engines.llamacpp.weights import init_backend

WARM_UP_STEPS = 5


def decode_greedy(
    model: object, n_vocab: int, sequences: int, steps: int, in_graph: bool
) -> tuple[float, float, str]:
    """Mean µs per counted step in llama_decode and after it, and a digest of the tokens."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sequences * (steps + 1)
    params.n_batch = params.n_ubatch = max(sequences, 32)
    params.n_seq_max = sequences
    params.kv_unified = True
    params.no_perf = True
    chains = []
    if in_graph:
        configs = (llama_cpp.llama_sampler_seq_config * sequences)()
        for seq in range(sequences):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            configs[seq].seq_id = seq
            configs[seq].sampler = ctypes.cast(chain, ctypes.c_void_p)
            chains.append(chain)
        params.samplers = configs
        params.n_samplers = sequences
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama.cpp could not create the context")
    batch = llama_cpp.llama_batch_init(sequences, 0, 1)
    tokens = [1 + seq for seq in range(sequences)]
    digest = hashlib.sha256()
    in_decode = after = 0.0
    try:
        for step in range(steps):
            batch.n_tokens = sequences
            for seq, token in enumerate(tokens):
                batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = token, step, 1
                batch.seq_id[seq][0], batch.logits[seq] = seq, True
            started = time.perf_counter()
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            decoded = time.perf_counter()
            if in_graph:
                tokens = [llama_cpp.llama_get_sampled_token_ith(ctx, i) for i in range(sequences)]
            else:
                logits = llama_cpp.llama_get_logits(ctx)
                rows = np.ctypeslib.as_array(logits, shape=(sequences, n_vocab))
                tokens = rows.argmax(axis=1).tolist()
            if step >= WARM_UP_STEPS:
                in_decode += decoded - started
                after += time.perf_counter() - decoded
            digest.update(np.array(tokens, dtype=np.int32).tobytes())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        for chain in chains:
            llama_cpp.llama_sampler_free(chain)
    counted = steps - WARM_UP_STEPS
    return in_decode / counted * 1e6, after / counted * 1e6, digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.steps <= WARM_UP_STEPS:
        parser.error(f"--steps must be more than {WARM_UP_STEPS}")
    init_backend()
    print(f"greedy, {args.device}, µs per step (median of 2 runs each way, alternated)\n")
    print("| vocab | seqs | way | llama_decode | after | sum | digest |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for n_vocab in (49152, 262144):
            path = write_model(Path(folder) / f"model-{n_vocab}.gguf", n_vocab)
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0 if args.device == "cpu" else -1
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if not model:
                raise SystemExit(f"llama.cpp could not load {path}")
            try:
                for sequences in (8, 64):
                    runs: dict[bool, list[tuple[float, float, str]]] = {False: [], True: []}
                    for in_graph in (False, True, False, True):
                        runs[in_graph].append(
                            decode_greedy(model, n_vocab, sequences, args.steps, in_graph)
                        )
                    for in_graph, results in runs.items():
                        decode = statistics.median(r[0] for r in results)
                        after = statistics.median(r[1] for r in results)
                        way = "in the graph" if in_graph else "numpy on the logits"
                        print(
                            f"| {n_vocab} | {sequences} | {way} | {decode:.0f} | {after:.0f} | "
                            f"{decode + after:.0f} | {results[0][2]} |"
                        )
            finally:
                llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
