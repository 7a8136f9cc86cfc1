"""The engines a model can run on, registered by name. Each is a package under
modelhost/engines/ whose BACKEND (an EngineBackend) says which model files it runs, on which
devices, and opens them; a new engine is one folder and one line in ENGINES. A package is
imported when first asked about, and its engine's library only when a model needs it, so a
host lacks only the engines it does not use. Only this package imports an engine's library.
"""

import importlib
from functools import cache
from pathlib import Path

from modelhost.config import ModelConfig
from modelhost.engines.interface import Engine, EngineBackend, EngineLoad, HostSettings

__all__ = [
    "ENGINES",
    "Engine",
    "EngineBackend",
    "EngineLoad",
    "HostSettings",
    "backend",
    "engine_for",
    "engine_kind",
    "estimate_bytes",
    "model_files",
    "open_engine",
    "release_prefetched",
]

# name (models.toml's `engine`) -> the package that registers it. With engine = "auto" the
# first that claims a model's path runs it.
ENGINES = {
    "llama.cpp": "modelhost.engines.llamacpp",
    "mlx": "modelhost.engines.mlxlm",
}


@cache
def backend(name: str) -> EngineBackend:
    """The registered engine of that name."""
    module = importlib.import_module(ENGINES[name])
    found: EngineBackend = module.BACKEND
    return found


def engine_kind(config: ModelConfig) -> str:
    """The engine that runs the model, known from its config alone."""
    return engine_for(config, config.path or Path("embedded.gguf"))


def engine_for(config: ModelConfig, path: Path) -> str:
    """The engine that runs the model: as configured, else the first that claims its path."""
    if config.engine != "auto":
        return config.engine
    return next((name for name in ENGINES if backend(name).claims(path)), "llama.cpp")


def model_files(config: ModelConfig, host: HostSettings) -> Path:
    """What the model's engine loads (the embedded GGUF is assembled on first use)."""
    path = config.model_path(host.cache_dir)
    return backend(engine_for(config, path)).model_files(config, host)


def estimate_bytes(config: ModelConfig, path: Path, device: str) -> int:
    """The model's footprint before it loads, from its files."""
    return backend(engine_for(config, path)).estimate_bytes(config, path, device)


def open_engine(config: ModelConfig, path: Path, host: HostSettings) -> Engine:
    """Loads the model and starts its engine; blocking (call it from a worker thread)."""
    return backend(engine_for(config, path)).open(config, path, host)


def release_prefetched() -> None:
    """Frees the weights engines loaded ahead of models the host then did not load."""
    for name in ENGINES:
        backend(name).release_prefetched()
