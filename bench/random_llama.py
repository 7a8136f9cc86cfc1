"""Randomly initialised Llama models written with `gguf`, for benchmarks where only the shape
matters: no download, any vocabulary size, any size up to an 8B's.

    python -m bench.random_llama OUT.gguf [--shape llama-8b] [--vocab 128256] [--q4-0]

The vocabulary is SentencePiece-like (<unk>, <s>, </s>, the 256 byte tokens, then words), so
llama.cpp tokenizes and detokenizes it as it does a real one. Logits spread like a real
model's (a few hundred tokens within 8 of the top). With Q4_0 the weight matrices are written
as raw Q4_0 blocks (random 4-bit values, one small scale per 32), as llama.cpp's quantize
would leave them: no float copy of an 8B's weights is ever made, and the matrices of the 32
layers share one block buffer per shape, so writing one takes seconds and little memory.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q4_0_BLOCK = 32  # weights per block: a float16 scale and 16 bytes of 4-bit values


@dataclass(frozen=True)
class Shape:
    n_embd: int
    layers: int
    n_ff: int
    n_head: int
    n_head_kv: int


SHAPES = {
    # bench.engine_overhead's: llama_decode costs little, so the Python around it shows.
    "tiny": Shape(n_embd=32, layers=1, n_ff=64, n_head=2, n_head_kv=2),
    # Llama 3.1 8B's: a 3090-class step time on a GPU.
    "llama-8b": Shape(n_embd=4096, layers=32, n_ff=14336, n_head=32, n_head_kv=8),
}


def write_model(
    path: Path, vocab: int, shape: Shape = SHAPES["tiny"], *, q4_0: bool = False
) -> Path:
    """Writes the model to `path` and returns it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    words = vocab - len(tokens)
    tokens += [("\u2581" + _word(i)).encode() for i in range(words)]
    types = [2, 3, 3] + [6] * 256 + [1] * words  # unknown, control, byte, normal
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(words)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    # Logits of spread ~3: a few hundred tokens within 8 of the top, as in a real model.
    add_llama(writer, vocab, shape, q4_0=q4_0, output_scale=3 / shape.n_embd**0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_llama(
    writer: gguf.GGUFWriter,
    vocab: int,
    shape: Shape,
    *,
    q4_0: bool = False,
    output_scale: float = 0.5,
) -> None:
    """A Llama's hyperparameters and seeded random weights for a `vocab`-token vocabulary,
    into `writer` (the tokenizer is the caller's): float32, or raw Q4_0 blocks."""
    n_embd, head_dim = shape.n_embd, shape.n_embd // shape.n_head
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if q4_0 else gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(0)
    shared: dict[tuple[int, int, float], np.ndarray] = {}

    def matrix(name: str, rows: int, columns: int, scale: float = 0.5) -> None:
        """A weight matrix of `rows` outputs by `columns` inputs."""
        if not q4_0:
            data = (rng.standard_normal((rows, columns)) * scale).astype(np.float32)
            writer.add_tensor(name, data)
            return
        if (rows, columns, scale) not in shared:
            shared[(rows, columns, scale)] = _q4_0_blocks(rng, rows, columns, scale)
        # The blocks' byte shape; gguf works out the weights' (rows x columns) from it.
        blocks = shared[(rows, columns, scale)]
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    matrix("token_embd.weight", vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    matrix("output.weight", vocab, n_embd, scale=output_scale)
    kv = shape.n_head_kv * head_dim
    for i in range(shape.layers):
        block = f"blk.{i}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(n_embd, np.float32))
        matrix(block + "attn_q.weight", n_embd, n_embd)
        matrix(block + "attn_k.weight", kv, n_embd)
        matrix(block + "attn_v.weight", kv, n_embd)
        matrix(block + "attn_output.weight", n_embd, n_embd)
        matrix(block + "ffn_gate.weight", shape.n_ff, n_embd)
        matrix(block + "ffn_up.weight", shape.n_ff, n_embd)
        matrix(block + "ffn_down.weight", n_embd, shape.n_ff)


def _q4_0_blocks(rng: np.random.Generator, rows: int, columns: int, scale: float) -> np.ndarray:
    """Q4_0 blocks for a rows x columns matrix: per 32 weights a float16 scale, then 16 bytes
    of 4-bit values (0-15, 8 meaning zero), whose weights spread about `scale`."""
    if columns % Q4_0_BLOCK:
        raise ValueError(f"{columns} inputs are not a whole number of Q4_0 blocks")
    blocks = columns // Q4_0_BLOCK
    data = np.empty((rows, blocks, 2 + Q4_0_BLOCK // 2), np.uint8)
    data[:, :, :2] = np.frombuffer(np.float16(scale / 4).tobytes(), np.uint8)
    data[:, :, 2:] = rng.integers(0, 256, (rows, blocks, Q4_0_BLOCK // 2), np.uint8)
    return data.reshape(rows, blocks * (2 + Q4_0_BLOCK // 2))


def _word(i: int) -> str:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    word = ""
    i += 1
    while i:
        i, r = divmod(i - 1, len(letters))
        word += letters[r]
    return word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="llama-8b")
    parser.add_argument("--vocab", type=int, default=128256, help="tokens (Llama 3: 128256)")
    parser.add_argument("--q4-0", action="store_true", help="Q4_0 weights (default float32)")
    args = parser.parse_args()
    if args.vocab < 260:
        parser.error("--vocab must hold the 259 special and byte tokens and a word")
    if args.out.exists():
        parser.error(f"{args.out} exists; name a new file")
    write_model(args.out, args.vocab, SHAPES[args.shape], q4_0=args.q4_0)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
