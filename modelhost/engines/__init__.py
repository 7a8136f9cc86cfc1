"""The engines a model can run on: llama.cpp for GGUF files, MLX (mlx-lm) for MLX model
directories. Only this package imports llama_cpp or mlx, and each engine is imported when a
model needs it, so a host without the mlx extra serves GGUF models as before."""

from dataclasses import dataclass
from pathlib import Path

from modelhost.config import ModelConfig
from modelhost.engines.base import Engine, EngineLoad

__all__ = [
    "Engine",
    "EngineLoad",
    "HostSettings",
    "engine_for",
    "engine_kind",
    "estimate_bytes",
    "model_files",
    "open_engine",
]

MLX_MISSING = "the MLX engine is not installed here; install it with pip install 'airouter[mlx]'"


@dataclass(frozen=True)
class HostSettings:
    """What the host decides for every model it loads."""

    device: str  # resolved: cpu, cuda or metal
    threads: int
    cache_dir: Path


def engine_kind(config: ModelConfig) -> str:
    """The engine that runs the model, known from its config alone."""
    return engine_for(config, config.path or Path("embedded.gguf"))


def engine_for(config: ModelConfig, path: Path) -> str:
    """The engine that runs the model: as configured, else MLX for a directory and
    llama.cpp for a file."""
    if config.engine != "auto":
        return config.engine
    return "mlx" if path.is_dir() else "llama.cpp"


def model_files(config: ModelConfig, host: HostSettings) -> Path:
    """What the engine loads: the configured path (the embedded GGUF, assembled on first
    use, when unset); for the MLX engine a GGUF is converted once into the cache directory:
    to 8 bits on a GPU, to float32 on the CPU (where mlx's quantized kernels are slower than
    a float32 BLAS)."""
    path = config.model_path(host.cache_dir)
    if engine_for(config, path) == "mlx" and path.is_file():
        from modelhost.engines.mlxlm.convert import cached_conversion

        quantize = "none" if host.device == "cpu" else "q8"
        path = cached_conversion(path, host.cache_dir / "mlx", quantize=quantize)
    return path


def estimate_bytes(config: ModelConfig, path: Path, device: str) -> int:
    """The model's footprint before it loads, from its files."""
    if engine_for(config, path) == "mlx":
        from modelhost.engines.mlxlm.engine import estimate_bytes as mlx_estimate

        return mlx_estimate(path, config.slots, config.context_length)
    from modelhost.engines.llamacpp import estimate_bytes as llama_estimate

    return llama_estimate(config, path, device)


def open_engine(config: ModelConfig, path: Path, host: HostSettings) -> Engine:
    """Loads the model and starts its engine; blocking (call it from a worker thread)."""
    if engine_for(config, path) == "mlx":
        try:
            from modelhost.engines.mlxlm.engine import MlxEngine
        except ImportError:
            raise RuntimeError(MLX_MISSING) from None
        return MlxEngine(
            path,
            name=config.name,
            slots=config.slots,
            max_queue=config.max_queue,
            context_per_slot=config.context_length,
            batch_tokens=config.batch_tokens,
            device=host.device,
        )
    from modelhost.engines.llamacpp import open_engine as open_llama

    return open_llama(config, path, host.device, host.threads)
