"""A sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json,
1_Pooling/config.json) as a GGUF llama.cpp runs, converted once into the host's cache.

The layout follows llama.cpp's own converter for BERT (convert_hf_to_gguf.py): tensors renamed
by the `gguf` package's name map, matrices as float16 and the rest as float32, the WordPiece
vocabulary in llama.cpp's "phantom space" form (a word's first piece starts with U+2581, a
continuation drops its "##"), non-causal attention and the directory's pooling. Neither torch
nor transformers is needed: safetensors is read with numpy.
"""

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Part of the cache key: a change to what the converter writes makes a new file.
CONVERTER_VERSION = 1
_SAFETENSORS_TYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_STAGING_PREFIX = ".airouter-convert-"
_KEPT_FLOAT32 = {"position_embd.weight", "token_types.weight"}


class BertConversionError(ValueError):
    """The directory is not a BERT model this converter handles; the message says why."""


def is_bert_directory(path: Path) -> bool:
    """Whether path is a Hugging Face BERT directory with safetensors weights."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "bert" and (path / "model.safetensors").is_file()


def directory_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers directory declares (mean, cls or last); None when
    it declares none."""
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            config = json.loads((path / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_mean_tokens"):
                return "mean"
            if config.get("pooling_mode_cls_token"):
                return "cls"
            if config.get("pooling_mode_lasttoken"):
                return "last"
            raise BertConversionError(
                f"{path}: its pooling is none of mean, cls and last tokens, which llama.cpp has"
            )
    return None


def cached_gguf(source: Path, cache_dir: Path) -> Path:
    """The GGUF for the BERT directory `source` under cache_dir, keyed by its files' contents
    and the converter's version; converted on first use."""
    digest = _digest(source.resolve())
    target = cache_dir / f"{source.resolve().name}-{digest[:16]}-f16.gguf"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        convert_bert(source, target)
    return target


def convert_bert(source: Path, target: Path) -> None:
    """Writes the GGUF for `source` to `target`, through a temporary file beside it renamed
    into place (a reader never sees half a file; an interrupted run leaves only its temp)."""
    import gguf  # imported here: only conversion needs it

    config = _read_json(source / "config.json")
    if config.get("model_type") != "bert":
        raise BertConversionError(
            f"{source} holds a {config.get('model_type') or 'unnamed'} model; only BERT "
            "directories are converted (serve other embedding models as GGUF files)"
        )
    tokenizer = _read_json(source / "tokenizer.json")
    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, layers)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]
    fd, staging = tempfile.mkstemp(prefix=_STAGING_PREFIX, suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(staging, arch)
        writer.add_name(source.resolve().name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_block_count(layers)
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
        pooling = directory_pooling(source)
        if pooling is not None:
            writer.add_pooling_type(gguf.PoolingType[pooling.upper()])
        _add_vocabulary(writer, tokenizer, int(config["vocab_size"]), gguf)
        writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
        for name, array in _safetensors(source / "model.safetensors"):
            renamed = _tensor_name(name, names)
            if renamed is None:
                continue
            # Matrices as float16, as llama.cpp's converter writes them, except the position
            # and token-type embeddings: ggml adds those to float32 activations directly.
            half = array.ndim == 2 and renamed not in _KEPT_FLOAT32
            kept = array.astype(np.float16 if half else np.float32)
            writer.add_tensor(renamed, kept)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(staging, 0o644)  # mkstemp makes it private; a model file is not secret
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _tensor_name(name: str, names: Any) -> str | None:
    """The GGUF name of a Hugging Face BERT tensor; None for what llama.cpp does not use (the
    pooler, masked-LM heads, position ids)."""
    name = name.removeprefix("bert.")
    if name == "embeddings.position_ids" or name.startswith(("pooler.", "cls.")):
        return None
    found: str | None = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise BertConversionError(f"the tensor {name!r} is not one of BERT's; cannot convert")
    return found


def _add_vocabulary(writer: Any, tokenizer: dict[str, Any], size: int, gguf: Any) -> None:
    model = tokenizer.get("model", {})
    if model.get("type") != "WordPiece":
        raise BertConversionError("tokenizer.json is not a WordPiece tokenizer, as BERT's is")
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    special = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", []) if t["special"]}
    tokens, types = [], []
    for token_id in range(size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in special:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        else:
            # llama.cpp's WordPiece reads a word's first piece with a leading U+2581.
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {content: token_id for token_id, content in special.items()}
    for content, add in (
        ("[CLS]", writer.add_bos_token_id),
        ("[SEP]", writer.add_sep_token_id),
        ("[PAD]", writer.add_pad_token_id),
        ("[UNK]", writer.add_unk_token_id),
        ("[MASK]", writer.add_mask_token_id),
    ):
        if content in ids:
            add(ids[content])


def _safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of a .safetensors file (an 8-byte header size, a JSON header, then the
    raw data), mapped rather than read."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_TYPES.get(entry["dtype"])
        if dtype is None:
            raise BertConversionError(f"{name} is {entry['dtype']}; only F32, F16 and I64 are read")
        start, end = entry["data_offsets"]
        yield name, data[start:end].view(dtype).reshape(entry["shape"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BertConversionError(f"{path} cannot be read as JSON: {exc}") from None
    return found


@functools.lru_cache(maxsize=16)
def _digest(source: Path) -> str:
    """What the converted file depends on: the converter's version and the directory's
    weights, tokenizer and configs (hashed once per process)."""
    digest = hashlib.sha256(f"bert-gguf-{CONVERTER_VERSION}".encode())
    for name in ("config.json", "tokenizer.json", "modules.json", "model.safetensors"):
        path = source / name
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    pooling = directory_pooling(source)
    digest.update(str(pooling).encode())
    return digest.hexdigest()
