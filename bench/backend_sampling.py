"""Sampling in llama.cpp's graph ("backend sampling") against reading the logits.

    python -m bench.backend_sampling [--device cpu|cuda] [--steps 30]

llama.cpp 0.3.36 can run a sampler chain inside the decode's graph, on the device that
computes it (`llama_context_params.samplers`, experimental), and hand back per sequence a
token (`llama_get_sampled_token_ith`) or a few candidates with their logits
(`llama_get_sampled_candidates_ith`, `llama_get_sampled_logits_ith`) instead of a row of
logits, which the engine reads and reduces with numpy (1 MB a row at a 262k vocabulary). Two
kinds of sampling are measured both ways:

- greedy: an argmax in the graph against `argmax` over the rows;
- top-k: the 40 likeliest in the graph against the engine's `top_k_rows` over the rows (what
  a default-sampling draw needs: the engine's draw among them runs on the host either way).

On bench.engine_overhead's randomly initialised one-layer models (bench.random_llama), at
49k and 262k tokens and 8 and 64 sequences, each decodes `--steps` steps (the first 5 not
counted), every sequence going on with its likeliest token: per step the time in
`llama_decode`, the time to the tokens (or candidates) after it, and their sum, alternating
the two ways twice. Both ways must find the same tokens, and the same top 40 (a digest per
way). Then what attaching a chain to a running sequence costs the next decode (llama.cpp
reserves its graph again): an engine would do it for each request it admits. Whether the
engine should sample in the graph is decided by these figures, on each device.
"""

import argparse
import ctypes
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from bench.random_llama import write_model
from modelhost.engines.llamacpp.sampler import top_k_rows
from modelhost.engines.llamacpp.weights import init_backend
from modelhost.logprobs import largest

WARM_UP_STEPS = 5
TOP_K = 40  # llama.cpp's default top_k


class NotInGraph(Exception):
    """llama.cpp did not run the chain in the graph (its device lacks an op it needs)."""


def context_params(sequences: int, n_ctx: int) -> Any:
    """A context of n_ctx cells for `sequences` decoded together (one unified KV cache)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = max(sequences, 32)
    params.n_seq_max = sequences
    params.kv_unified = True
    params.no_perf = True
    return params


def new_context(model: object, params: Any) -> Any:
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise SystemExit("llama.cpp could not create the context")
    return ctx


def decode(
    model: object, n_vocab: int, sequences: int, steps: int, in_graph: bool, top_k: int | None
) -> tuple[float, float, str]:
    """Mean µs per counted step in llama_decode and after it, and a digest of each step's
    tokens (greedy, top_k None) or sorted top-k candidates."""
    params = context_params(sequences, sequences * (steps + 1))
    chains = []
    if in_graph:
        configs = (llama_cpp.llama_sampler_seq_config * sequences)()
        for seq in range(sequences):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_greedy()
                if top_k is None
                else llama_cpp.llama_sampler_init_top_k(top_k),
            )
            configs[seq].seq_id = seq
            configs[seq].sampler = ctypes.cast(chain, ctypes.c_void_p)
            chains.append(chain)
        params.samplers = configs
        params.n_samplers = sequences
    ctx = new_context(model, params)
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
            found: list[np.ndarray] = []  # each sequence's top_k ids, likeliest first
            if in_graph and top_k is None:
                tokens = [llama_cpp.llama_get_sampled_token_ith(ctx, i) for i in range(sequences)]
                if llama_cpp.LLAMA_TOKEN_NULL in tokens:
                    raise NotInGraph("llama.cpp sampled no token")
            elif in_graph:
                for i in range(sequences):
                    ids = _sampled(
                        llama_cpp.llama_get_sampled_candidates_ith,
                        llama_cpp.llama_get_sampled_candidates_count_ith,
                        ctx,
                        i,
                    )
                    logits = _sampled(
                        llama_cpp.llama_get_sampled_logits_ith,
                        llama_cpp.llama_get_sampled_logits_count_ith,
                        ctx,
                        i,
                    )
                    found.append(ids[np.argsort(-logits, kind="stable")])
            else:
                logits = llama_cpp.llama_get_logits(ctx)
                rows = np.ctypeslib.as_array(logits, shape=(sequences, n_vocab))
                if top_k is None:
                    tokens = rows.argmax(axis=1).tolist()
                else:
                    for row, ids in zip(rows, top_k_rows(rows, top_k), strict=True):
                        ids = largest(row, ids, top_k)
                        found.append(ids[np.argsort(-row[ids], kind="stable")])
            if found:
                tokens = [int(ids[0]) for ids in found]
            if step >= WARM_UP_STEPS:
                in_decode += decoded - started
                after += time.perf_counter() - decoded
            digest.update(np.array(tokens, dtype=np.int32).tobytes())
            for ids in found:
                digest.update(np.sort(ids).astype(np.int32).tobytes())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        for chain in chains:
            llama_cpp.llama_sampler_free(chain)
    counted = steps - WARM_UP_STEPS
    return in_decode / counted * 1e6, after / counted * 1e6, digest.hexdigest()[:16]


def _sampled(get: Any, count_of: Any, ctx: object, i: int) -> np.ndarray:
    """A copy of output i's candidates or their logits, as the graph left them."""
    count = count_of(ctx, i)
    pointer = get(ctx, i)
    if not pointer or not count:
        raise NotInGraph(f"llama.cpp sampled no candidates for output {i}")
    return np.ctypeslib.as_array(pointer, shape=(count,)).copy()


def attach_cost(model: object, sequences: int = 8, steps: int = 5) -> float:
    """How much longer the decode after attaching a top-k chain to one running sequence
    (`llama_set_sampler`, as an engine would for each request it admits) takes than a step
    with every chain in place, in µs, median over the sequences: attaching one makes
    llama.cpp reserve its graph again."""
    ctx = new_context(model, context_params(sequences, sequences * (sequences + 2 * steps + 1)))
    batch = llama_cpp.llama_batch_init(sequences, 0, 1)
    chains = []
    position = 0

    def step() -> float:
        nonlocal position
        batch.n_tokens = sequences
        for seq in range(sequences):
            batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = 1 + seq, position, 1
            batch.seq_id[seq][0], batch.logits[seq] = seq, True
        position += 1
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - started

    try:
        for _ in range(steps):
            step()
        after_attach = []
        for seq in range(sequences):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
            chains.append(chain)
            if not llama_cpp.llama_set_sampler(ctx, seq, chain):
                raise NotInGraph("llama.cpp would not run the chain in the graph")
            after_attach.append(step())
        settled = statistics.median(step() for _ in range(steps))
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        for chain in chains:
            llama_cpp.llama_sampler_free(chain)
    return (statistics.median(after_attach) - settled) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.steps <= WARM_UP_STEPS:
        parser.error(f"--steps must be more than {WARM_UP_STEPS}")
    init_backend()
    print(f"{args.device}, µs per step (median of 2 runs each way, alternated)\n")
    print("| vocab | seqs | sampling | way | llama_decode | after | sum | digest |")
    print("|---|---|---|---|---|---|---|---|")
    attach: dict[int, str] = {}
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
                    for top_k in (None, TOP_K):
                        runs: dict[bool, list[tuple[float, float, str]]] = {False: [], True: []}
                        sampling = "greedy" if top_k is None else f"top-{top_k}"
                        try:
                            for in_graph in (False, True, False, True):
                                runs[in_graph].append(
                                    decode(model, n_vocab, sequences, args.steps, in_graph, top_k)
                                )
                        except NotInGraph as exc:
                            print(f"| {n_vocab} | {sequences} | {sampling} | in the graph: {exc} |")
                            continue
                        for in_graph, results in runs.items():
                            in_decode = statistics.median(r[0] for r in results)
                            after = statistics.median(r[1] for r in results)
                            way = "in the graph" if in_graph else "numpy on the logits"
                            print(
                                f"| {n_vocab} | {sequences} | {sampling} | {way} | "
                                f"{in_decode:.0f} | {after:.0f} | {in_decode + after:.0f} | "
                                f"{results[0][2]} |"
                            )
                try:
                    attach[n_vocab] = f"{attach_cost(model):.0f} us"
                except NotInGraph as exc:
                    attach[n_vocab] = str(exc)
            finally:
                llama_cpp.llama_model_free(model)
    print(
        "\nAttaching a top-k chain to one of 8 running sequences (llama_set_sampler, once a "
        "request), the next llama_decode took longer than a step with every chain in place by: "
        + ", ".join(f"{attach[n_vocab]} at {n_vocab}" for n_vocab in attach)
    )


if __name__ == "__main__":
    main()
