"""Opening a GGUF with llama.cpp, and its footprint before it loads."""

from pathlib import Path

import llama_cpp
import structlog

from modelhost.config import ModelConfig
from modelhost.engines.interface import Engine
from modelhost.engines.llamacpp.embedding import LlamaEmbedder
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.gguf_header import read_gguf_header
from modelhost.memory import estimate_footprint

_log = structlog.get_logger()
# llama.cpp's enum llama_pooling_type, by models.toml's names.
POOLING = {"mean": 1, "cls": 2, "last": 3}
POOLING_NONE = 0


def gpu_layers(config: ModelConfig, device: str) -> int:
    """Layers to offload: as configured, else all of them on a GPU and none on the CPU."""
    if config.gpu_layers is not None:
        return config.gpu_layers
    return 0 if device == "cpu" else -1


def estimate_bytes(config: ModelConfig, path: Path, device: str) -> int:
    """The footprint from the GGUF header: weights on the device, KV cache, compute buffers."""
    header = read_gguf_header(path)
    layers = max(header.arch_int("block_count"), 1)
    offloaded = gpu_layers(config, device)
    if device == "cpu":
        share = 1.0
    else:
        share = 1.0 if offloaded < 0 else min(offloaded / (layers + 1), 1.0)
    return estimate_footprint(
        header,
        on_device_share=share,
        context_tokens=config.slots * config.context_length,
        batch_tokens=config.batch_tokens,
        cache_type_k=config.cache_type_k,
        cache_type_v=config.cache_type_v,
        slots=config.slots,
        full_swa_cache=config.full_swa_cache,
        embedding=config.kind == "embedding",
    )


def open_engine(config: ModelConfig, path: Path, device: str, threads: int) -> Engine:
    embedding = config.kind == "embedding"
    model = LlamaModel(
        path,
        gpu_layers=gpu_layers(config, device),
        settings=ContextSettings(
            slots=config.slots,
            context_per_slot=config.context_length,
            batch_tokens=config.batch_tokens,
            threads=threads,
            flash_attention=config.flash_attention,
            cache_type_k=config.cache_type_k,
            cache_type_v=config.cache_type_v,
            full_swa_cache=config.full_swa_cache,
            embeddings=embedding,
            pooling=POOLING[config.pooling] if config.pooling else -1,
        ),
        chat_template=config.chat_template,
    )
    if config.context_length > model.context_train and not embedding:  # embedders cap it
        _log.warning(
            "context_beyond_training",
            model=config.name,
            context_length=config.context_length,
            trained_on=model.context_train,
        )
    try:
        if embedding and llama_cpp.llama_pooling_type(model.ctx) == POOLING_NONE:
            raise RuntimeError(
                f"{path} declares no pooling, so it makes no single vector per text; set "
                'pooling = "mean", "cls" or "last" as the model was trained'
            )
        if embedding:
            return LlamaEmbedder(
                model, name=config.name, slots=config.slots, max_queue=config.max_queue
            )
        return LlamaEngine(
            model,
            name=config.name,
            slots=config.slots,
            max_queue=config.max_queue,
            sample_in_graph=config.sample_in_graph,
        )
    except BaseException:
        model.close()
        raise
