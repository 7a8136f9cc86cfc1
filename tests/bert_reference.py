"""An independent reference for the embedded embedding model: BERT's forward pass written in
numpy from the safetensors weights, tokenized by Hugging Face's `tokenizers` from the
directory's own tokenizer.json, mean-pooled and normalized as sentence-transformers does. It
shares nothing with llama.cpp or airouter's converter."""

import json
from pathlib import Path

import numpy as np


class ReferenceBert:
    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.config = json.loads((directory / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.weights = _read_safetensors(directory / "model.safetensors")

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def embed(self, text: str) -> np.ndarray:
        ids = self.token_ids(text)
        w, c = self.weights, self.config
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: len(ids)]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        eps = c["layer_norm_eps"]
        x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
        heads = c["num_attention_heads"]
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (_linear(x, w, p + f"attention.self.{n}") for n in ("query", "key", "value"))
            split = lambda t: t.reshape(len(ids), heads, -1).transpose(1, 0, 2)  # noqa: E731
            q, k, v = split(q), split(k), split(v)
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attention = (scores / scores.sum(-1, keepdims=True)) @ v
            merged = attention.transpose(1, 0, 2).reshape(len(ids), -1)
            x = _layer_norm(
                x + _linear(merged, w, p + "attention.output.dense"),
                w,
                p + "attention.output.LayerNorm",
                eps,
            )
            hidden = _gelu(_linear(x, w, p + "intermediate.dense"))
            x = _layer_norm(
                x + _linear(hidden, w, p + "output.dense"), w, p + "output.LayerNorm", eps
            )
        pooled = x.mean(axis=0)
        return pooled / np.linalg.norm(pooled)


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    types = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        data = np.frombuffer(
            raw,
            dtype=types[entry["dtype"]],
            offset=8 + size + start,
            count=(end - start) // np.dtype(types[entry["dtype"]]).itemsize,
        )
        out[name] = data.reshape(entry["shape"]).astype(np.float64)
    return out
