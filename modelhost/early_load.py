"""The launch's head start: `modelhost serve` starts loading the weights of the first model it
preloads before it imports the rest of itself, so that llama.cpp's load (a third of a second
for Gemma 3 270M on a CPU, seconds for larger models) and the Python imports (about half a
second) run side by side.

What loads here is a guess made from the command line and models.toml before either is
validated: a model the host then loads from another file or with other GPU layers loads
again, and weights that no load takes are freed (modelhost.engines.release_prefetched). A
config the guess cannot read is left to the host, which reports it as it starts.
"""

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any


def start(argv: list[str]) -> None:
    """Starts loading the first preloaded model's weights on a thread, when `serve`'s flags
    and models.toml say which GGUF and how many GPU layers."""
    try:
        found = first_preloaded_gguf(argv)
    except (OSError, ValueError):  # unreadable or not TOML: the host says so
        return
    if found is None:
        return
    weights = _weights_module()
    if weights is not None:
        weights.prefetch_weights(*found)


def _weights_module() -> ModuleType | None:
    """modelhost.engines.llamacpp.weights, imported without running its packages' __init__
    first (the engine registry imports most of the modelhost: a fifth of a second before the
    load could start). It is registered under its own name, so the regular import later
    finds this one. None without llama-cpp-python (the host says what to install)."""
    name = "modelhost.engines.llamacpp.weights"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parent / "engines" / "llamacpp" / "weights.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[name]
        return None
    return module


def first_preloaded_gguf(argv: list[str]) -> tuple[Path, int] | None:
    """The GGUF the host will load first and its GPU layers (as modelhost.engines.llamacpp
    counts them); None when that is not a llama.cpp model or cannot be known here."""
    config = _flag(argv, "--config")
    device = _flag(argv, "--device")
    if config is None:  # the embedded models, Gemma 3 270M first
        return _embedded(None, device or "auto", None)
    config_path = Path(config)
    with config_path.open("rb") as file:
        data = tomllib.load(file)
    device = device or data.get("device", "auto")
    models = data.get("models")
    if not isinstance(models, list):
        return None
    first = next((m for m in models if isinstance(m, dict) and m.get("preload") is True), None)
    if first is None or first.get("engine", "auto") not in ("auto", "llama.cpp"):
        return None
    layers = first.get("gpu_layers")
    layers = layers if type(layers) is int else None
    path = first.get("path")
    if path is None:
        return _embedded(data.get("cache_dir"), device, layers)
    if not isinstance(path, str):
        return None
    gguf = config_path.parent / path  # as the config resolves it: against its own folder
    if not gguf.is_file():  # a directory is an MLX model or a BERT one still to convert
        return None
    return gguf, _gpu_layers(device, layers)


def _embedded(cache_dir: Any, device: str, layers: int | None) -> tuple[Path, int] | None:
    """The embedded GGUF, when it is already assembled (assembling it is the host's job)."""
    from airouter.paths import default_cache_dir
    from modelhost.embedded import assembled_embedded_model

    path = assembled_embedded_model(
        Path(cache_dir) if isinstance(cache_dir, str) else default_cache_dir()
    )
    return None if path is None else (path, _gpu_layers(device, layers))


def _gpu_layers(device: str, configured: int | None) -> int:
    """modelhost.engines.llamacpp.loading.gpu_layers, guessing that `auto` finds a GPU where
    llama.cpp can use one (where it cannot, the layers change nothing that loads)."""
    if configured is not None:
        return configured
    return 0 if device == "cpu" else -1


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (the last one, as argparse takes it)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value
