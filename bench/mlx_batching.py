"""The MLX engine served through the gateway against mlx-lm's own BatchGenerator.

    python -m bench.mlx_batching [--tokens 64] [--rounds 3] [--streams 1 8] [--device cpu]

Converts the embedded Gemma 3 270M GGUF for the MLX engine (once; float32 on the CPU, 8-bit
on a GPU), starts a modelhost serving it with engine = "mlx" and 8 slots, and a gateway, as
separate processes. For 1 and 8 concurrent greedy streams of --tokens tokens (ignore_eos),
interleaved round by round, it measures aggregate tok/s through the gateway and, in this
process on the same model directory, mlx-lm's BatchGenerator decoding the same number of
prompts (each prompt inserted at once, stop tokens off): the ceiling mlx-lm itself reaches.
Prints the ratio (targets: >= 0.95 at one stream, >= 0.9 at 8) and which BLAS mlx used.
"""

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import modelhost.engines.mlxlm as mlx_engine  # first: it puts OpenBLAS under mlx
from bench.batching import Served, prompt_for, served_decode
from modelhost.config import embedded_model_config
from modelhost.engines import HostSettings, model_files
from tests.processes import ServerProcess
from tests.scratch import scratch_dir

MODEL = "gemma-mlx"


def batch_generator(model: Any, tokenizer: Any, streams: int, tokens: int, tag: str) -> float:
    """mlx-lm's BatchGenerator on `streams` prompts at once, greedy; returns tok/s."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    prompts = [tokenizer.encode(prompt_for(i, tag)).ids for i in range(streams)]
    generator = BatchGenerator(model, max_tokens=tokens, completion_batch_size=8)
    started = time.perf_counter()
    generator.insert(prompts, max_tokens=[tokens] * streams)
    generated = 0
    while generated < streams * tokens:
        generated += len(generator.next_generated())
    elapsed = time.perf_counter() - started
    generator.close()
    mx.clear_cache()
    return generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu", choices=["cpu", "metal"])
    args = parser.parse_args()

    cache = Path.home() / ".cache" / "airouter"
    config = embedded_model_config().model_copy(update={"engine": "mlx"})
    path = model_files(config, HostSettings(device=args.device, threads=2, cache_dir=cache))
    models = scratch_dir() / "models.toml"
    models.write_text(
        f'[[models]]\nname = "{MODEL}"\npath = "{path}"\nslots = 8\ncontext_length = 1024\n'
        "preload = true\n"
    )
    host = ServerProcess("modelhost", "serve", "--device", args.device, "--config", str(models))
    gateway = ServerProcess("gateway", "serve", "--modelhost", host.address)
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from tokenizers import Tokenizer

    model, _ = load_model(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    ours: dict[int, Served] = {s: Served() for s in args.streams}
    theirs: dict[int, list[float]] = {s: [] for s in args.streams}
    try:
        # Warm up both: the model loads, and MLX compiles its kernels for these shapes.
        asyncio.run(served_decode(gateway.address, "gateway", MODEL, 8, 4, Served(), "warm "))
        batch_generator(model, tokenizer, 8, 4, "warm ")
        for round_ in range(args.rounds):
            for streams in args.streams:
                tag = f"r{round_} "
                rate = batch_generator(model, tokenizer, streams, args.tokens, "bg " + tag)
                theirs[streams].append(rate)
                asyncio.run(
                    served_decode(
                        gateway.address,
                        "gateway",
                        MODEL,
                        streams,
                        args.tokens,
                        ours[streams],
                        "gw " + tag,
                    )
                )
            print(f"round {round_ + 1}/{args.rounds} done")
    finally:
        gateway.stop()
        host.stop()
        mx.clear_streams()  # this thread's MLX work ends here (see mlxlm.on_own_thread)
    loaded = next((line for line in host.log if line.get("event") == "model_loaded"), {})
    print(
        f"\nMLX engine through the gateway against mlx-lm's BatchGenerator in-process, "
        f"{args.tokens} tokens a request, {args.rounds} interleaved rounds (medians); "
        f"device {loaded.get('mlx_device')}, BLAS {mlx_engine.BLAS}, model {path.name}\n"
    )
    print(
        "| streams | BatchGenerator tok/s | served through the gateway tok/s | ratio | failures |"
    )
    print("|---|---|---|---|---|")
    for streams in args.streams:
        reference = statistics.median(theirs[streams])
        served = statistics.median(ours[streams].rates) if ours[streams].rates else 0.0
        print(
            f"| {streams} | {reference:.1f} | {served:.1f} | {served / reference:.2f} "
            f"| {ours[streams].failures} |"
        )


if __name__ == "__main__":
    main()
