"""Time to first token of fill-in-the-middle, as an editor sees it through the gateway.

    python -m bench.infill [--prefix-tokens 2000] [--rounds 5] [--embd 384] [--layers 6]

Writes a Llama with FIM tokens (tests/tiny_models.py: random weights, SmolLM2's tokenizer, a
width and depth set by --embd and --layers so that a prompt costs what a small code model's
does on this CPU), serves it from an in-process modelhost behind the gateway's HTTP edge, and
streams `/v1/completions` with `suffix` for a file of about --prefix-tokens tokens before the
cursor, as an editor does while someone types:

- cold: a file the host has not seen;
- warm, typed: the same file with one more character at the cursor (all but the last tokens
  come from the slot's cache);
- warm, edited above: a line changed halfway up the file (the cache serves the part before it).

Prints the median time to first token of each over --rounds files, the prompt tokens and the
cached ones the host reported, and the cold / warm ratios.
"""

import argparse
import statistics
import time

import openai

from modelhost.config import ModelConfig
from modelhost.device import default_threads
from tests.conftest import http_stack
from tests.scratch import scratch_dir
from tests.tiny_models import tiny_llama_fim

LINE = "    total = compute(values[{i}], weights[{i}]) + offset  # step {i}\n"


def source(lines: int, seed: int) -> list[str]:
    return [f"def f{seed}_{i}(values, weights, offset):\n" + LINE.format(i=i) for i in range(lines)]


def first_token(client: openai.OpenAI, prefix: str, suffix: str) -> tuple[float, int, int]:
    """Seconds to the first streamed text, and the prompt and cached tokens."""
    started = time.perf_counter()
    ttft = None
    stream = client.completions.create(
        model="coder",
        prompt=prefix,
        suffix=suffix,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    prompt = cached = 0
    for chunk in stream:
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - started
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
            details = chunk.usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
    assert ttft is not None
    return ttft, prompt, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--embd", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    directory = scratch_dir()
    path = tiny_llama_fim(directory / "coder.gguf", n_embd=args.embd, layers=args.layers)
    model = ModelConfig(name="coder", path=path, context_length=4096, slots=2, preload=True)
    lines = max(1, args.prefix_tokens // 30)  # about 30 tokens a function of two lines
    results: dict[str, list[tuple[float, int, int]]] = {"cold": [], "typed": [], "edited": []}
    with http_stack([model]) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
        first_token(client, "def warm_up():\n", "\n")
        for round_ in range(args.rounds):
            code = source(lines, round_)
            prefix, suffix = "".join(code) + "def g(x):\n    return x", "\n\nprint(g(1))\n"
            results["cold"].append(first_token(client, prefix, suffix))
            results["typed"].append(first_token(client, prefix + " ", suffix))
            code[lines // 2] = code[lines // 2].replace("offset", "bias")
            edited = "".join(code) + "def g(x):\n    return x "
            results["edited"].append(first_token(client, edited, suffix))
    print(f"llama {args.embd}x{args.layers}, {default_threads()} threads, {args.rounds} files")
    print(f"  {'':<24} {'TTFT ms':>8} {'prompt':>7} {'cached':>7} {'cold / this':>11}")
    cold = statistics.median(r[0] for r in results["cold"])
    names = {"cold": "cold", "typed": "warm, typed at cursor", "edited": "warm, edited above"}
    for key, label in names.items():
        ttft = statistics.median(r[0] for r in results[key])
        prompt = statistics.median(r[1] for r in results[key])
        cached = statistics.median(r[2] for r in results[key])
        print(f"  {label:<24} {ttft * 1e3:8.1f} {prompt:7.0f} {cached:7.0f} {cold / ttft:11.1f}")


if __name__ == "__main__":
    main()
