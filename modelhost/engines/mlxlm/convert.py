"""A GGUF file as an mlx-lm model directory: config.json, safetensors and a tokenizer.

    modelhost convert-gguf MODEL.gguf OUT_DIR [--quantize q8|q4|none]

The weights are dequantized with the `gguf` package (mlx cannot read llama.cpp's Q5_0 or
K-quants), renamed to the Hugging Face names mlx-lm's model classes load, and optionally
quantized again by mlx-lm (q8 keeps greedy output equal to llama.cpp's on the GGUF; q4 of
already-quantized weights drifts). The tokenizer is rebuilt from the GGUF's vocabulary with
the `tokenizers` library (no torch, no hub). Supported: Gemma 3 text models; others are
refused by name.
"""

import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from airouter import installed_version
from modelhost.engines.mlxlm import on_own_thread

# Gemma's turn format (the GGUF carries no template): system text opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim ~ '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' ~ (first_user_prefix if loop.first else '') "
    "~ (message['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
QUANTIZATIONS = {"q8": (8, 32), "q4": (4, 32), "none": None}
SUPPORTED = ("gemma3",)

# GGUF tensor name (after "blk.N.") -> the Hugging Face name (after "model.layers.N.").
_GEMMA3_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}

# SentencePiece token types as the GGUF records them.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class ConversionError(ValueError):
    """The conversion cannot be done as asked; the message says why and what to do."""


class UnsupportedGGUF(ConversionError):
    """The file is not a GGUF this converter knows how to turn into an mlx-lm model."""


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unknown: int
    add_bos: bool
    add_space_prefix: bool


def convert_gguf(
    source: Path,
    target: Path,
    *,
    quantize: str = "q8",
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None,
) -> Path:
    """Writes the mlx-lm model directory for `source` to `target` (made afresh) and returns
    it. `progress(items, total, what)` wraps the long loops (a progress bar)."""
    from gguf import GGUFReader  # imported here: only conversion needs it

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize is {quantize!r}; use one of {', '.join(QUANTIZATIONS)}")
    target = _check_target(target)
    _remove_stale_staging(target.parent)
    try:
        reader = GGUFReader(source)
    except Exception as exc:  # any malformed input: gguf raises what numpy or struct does
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UnsupportedGGUF(
            f"{source} is not a readable GGUF file: truncated or not a GGUF ({why})"
        ) from None
    arch = _field(reader, "general.architecture", "")
    if arch not in SUPPORTED:
        raise UnsupportedGGUF(
            f"{source} is a {arch or 'unnamed'} model; convert-gguf supports "
            f"{', '.join(SUPPORTED)}. For others, take an MLX model from the mlx-community "
            "(mlx_lm.convert on the original Hugging Face weights) or serve the GGUF with "
            "llama.cpp"
        )
    config = _gemma3_config(reader)
    vocabulary = _vocabulary(reader)
    wrap = progress or (lambda items, total, what: items)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=target.parent))
    try:
        _mark(staging, {"staging": True})  # ours, should a kill leave it behind
        weights = dict(wrap(_gemma3_weights(reader), len(reader.tensors), "tensors"))
        on_own_thread(partial(_write_float, staging, weights, config))
        del weights
        _write_tokenizer(staging, vocabulary)
        bits_and_group = QUANTIZATIONS[quantize]
        if bits_and_group is not None:
            on_own_thread(partial(_quantize, staging, *bits_and_group))
        files = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
        _mark(staging, {"source": str(source.resolve()), "quantize": quantize, "files": files})
        _check_target(target)  # again: nothing may have appeared there meanwhile
        if target.exists():
            # Swapped by renames; what is removed is only what an earlier conversion wrote.
            old = Path(tempfile.mkdtemp(prefix=_REPLACED, dir=target.parent))
            target.rename(old / "model")
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# What convert-gguf writes beside its files, naming them: a directory holding anything else
# is not its to replace.
MARKER = ".airouter-convert.json"
_STAGING, _REPLACED = ".airouter-convert-", ".airouter-replaced-"


def _mark(directory: Path, fields: dict[str, Any]) -> None:
    body = {"written_by": "modelhost convert-gguf", "version": installed_version(), **fields}
    (directory / MARKER).write_text(json.dumps(body, indent=2) + "\n")


def _check_target(target: Path) -> Path:
    """The directory to write: OUT, or the directory a symlink OUT points to. Refuses one
    that is not the converter's to replace: a file, or a directory holding anything an earlier
    conversion did not write (a mistyped OUT must never delete a home)."""
    if target.is_symlink() and target.resolve().is_dir():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ConversionError(f"{target} exists and is not a directory; choose another OUT")
    present = {p.name for p in target.iterdir()} if target.is_dir() else set()
    if present:
        written = _written(target)
        foreign = sorted(present - written - {MARKER}) if written is not None else sorted(present)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConversionError(
                f"{target} holds files convert-gguf did not write ({shown}); it replaces only "
                "an empty directory or one it wrote itself: choose another OUT, or move them"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _written(directory: Path) -> set[str] | None:
    """The files an earlier conversion wrote in `directory`, from its marker; None without
    one (the directory is not the converter's)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        return set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale_staging(parent: Path) -> None:
    """Staging and replaced directories an interrupted conversion left beside OUT (those
    holding the converter's marker: nothing else is touched)."""
    for leftover in [*parent.glob(f"{_STAGING}*"), *parent.glob(f"{_REPLACED}*")]:
        marked = (leftover / MARKER).is_file() or (leftover / "model" / MARKER).is_file()
        if leftover.is_dir() and marked:
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.is_dir() and not any(leftover.iterdir()):
            leftover.rmdir()


def cached_conversion(source: Path, cache_dir: Path, *, quantize: str = "q8") -> Path:
    """The converted directory for `source` under cache_dir, keyed by the file's sha256 and
    the quantization; converted on first use."""
    stat = source.stat()
    digest = _sha256(source.resolve(), stat.st_size, stat.st_mtime_ns)
    target = cache_dir / f"{source.stem}-{digest[:16]}-mlx-{quantize}"
    if not (target / "config.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        convert_gguf(source, target, quantize=quantize)
    return target


@functools.lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256, once per file version per process: a host asks on every load."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader: Any, name: str, default: Any) -> Any:
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def _gemma3_config(reader: Any) -> dict[str, Any]:
    def arch(key: str, default: Any = None) -> Any:
        value = _field(reader, f"gemma3.{key}", default)
        if value is None:
            raise UnsupportedGGUF(f"the GGUF lacks gemma3.{key}")
        return value

    hidden, heads = int(arch("embedding_length")), int(arch("attention.head_count"))
    layers, head_dim = int(arch("block_count")), int(arch("attention.key_length"))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config: dict[str, Any] = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(arch("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(arch("attention.head_count_kv")),
        "head_dim": head_dim,
        "rms_norm_eps": float(arch("attention.layer_norm_rms_epsilon")),
        "vocab_size": vocab,
        "rope_theta": float(arch("rope.freq_base")),
        "sliding_window": int(arch("attention.sliding_window")),
        "max_position_embeddings": int(arch("context_length")),
        # Fixed in llama.cpp's Gemma 3 code rather than stored in the GGUF.
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers).
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": [int(_field(reader, "tokenizer.ggml.eos_token_id", 1))],
    }
    factor = _field(reader, "gemma3.rope.scaling.factor", None)
    if factor is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return config


def _gemma3_weights(reader: Any) -> Iterable[tuple[str, np.ndarray]]:
    from gguf import dequantize

    for tensor in reader.tensors:
        name = tensor.name
        if name in _GEMMA3_TOP_NAMES:
            hf = _GEMMA3_TOP_NAMES[name]
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk.") and name.split(".", 2)[2] in _GEMMA3_LAYER_NAMES:
            _, layer, rest = name.split(".", 2)
            hf = f"model.layers.{layer}.{_GEMMA3_LAYER_NAMES[rest]}"
        else:
            raise UnsupportedGGUF(f"unexpected tensor {name!r} for a Gemma 3 text model")
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # numpy's shape is the GGUF's reversed: (out, in), as Hugging Face stores it.
        data = data.reshape([int(n) for n in reversed(tensor.shape)])
        if name.endswith("norm.weight"):
            data = data - 1.0  # llama.cpp stores Gemma's RMSNorm weights as w + 1
        yield hf, data


def _write_float(directory: Path, weights: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    import mlx.core as mx

    mx.save_safetensors(
        str(directory / "model.safetensors"),
        {name: mx.array(data) for name, data in weights.items()},
        metadata={"format": "mlx"},
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _quantize(directory: Path, bits: int, group_size: int) -> None:
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(directory, lazy=True)
    model, config = quantize_model(model, config, group_size, bits)
    (directory / "model.safetensors").unlink()
    save_model(directory, model)
    save_config(config, directory / "config.json")


def _vocabulary(reader: Any) -> Vocabulary:
    if _field(reader, "tokenizer.ggml.model", "") != "llama":
        raise UnsupportedGGUF("only SentencePiece (tokenizer.ggml.model = llama) vocabularies")
    return Vocabulary(
        tokens=list(_field(reader, "tokenizer.ggml.tokens", [])),
        scores=[float(s) for s in _field(reader, "tokenizer.ggml.scores", [])],
        types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        bos=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        unknown=int(_field(reader, "tokenizer.ggml.unknown_token_id", 3)),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
    )


def spm_tokenizer(vocabulary: Vocabulary) -> Any:
    """A `tokenizers` Tokenizer that splits text as llama.cpp's SentencePiece-BPE does:
    user-defined and control tokens whole, then merges by score, unknown characters as
    <0xXX> byte tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokens, types = vocabulary.tokens, vocabulary.types
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = BPE(
        vocab=vocab,
        merges=_merges(vocabulary, vocab),
        unk_token=tokens[vocabulary.unknown],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    steps: list[Any] = [normalizers.Replace(" ", "▁")]
    if vocabulary.add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _UNKNOWN)
        ]
    )
    if vocabulary.add_bos:
        bos = tokens[vocabulary.bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocabulary.bos)]
        )
    return tokenizer


def _merges(vocabulary: Vocabulary, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two tokens, highest-scored result first: BPE by
    these ranks merges what SentencePiece's score-ordered merging does."""
    found: list[tuple[float, int, int, int, str, str]] = []
    for token, score, kind in zip(
        vocabulary.tokens, vocabulary.scores, vocabulary.types, strict=True
    ):
        if kind != _NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[token], vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _write_tokenizer(directory: Path, vocabulary: Vocabulary) -> None:
    spm_tokenizer(vocabulary).save(str(directory / "tokenizer.json"))
    tokens = vocabulary.tokens
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tokens[vocabulary.bos],
                "eos_token": tokens[vocabulary.eos],
                "unk_token": tokens[vocabulary.unknown],
                "add_bos_token": vocabulary.add_bos,
                "add_eos_token": False,
                "chat_template": GEMMA_CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    end_of_turn = [i for i, t in enumerate(tokens) if t == "<end_of_turn>"]
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": vocabulary.bos, "eos_token_id": [vocabulary.eos, *end_of_turn]})
        + "\n"
    )
