"""The llama.cpp engine (llama-cpp-python): GGUF files on CPU, CUDA and Metal.

This module imports without llama-cpp-python; the engine's modules import it when a model
is estimated, opened, or a device is asked about.
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from modelhost.engines.interface import Engine, EngineBackend, HostSettings
from modelhost.engines.llamacpp.bert import cached_gguf, is_bert_directory

if TYPE_CHECKING:
    from modelhost.config import ModelConfig

_MISSING = (
    "llama-cpp-python is not installed here; install it with pip install llama-cpp-python "
    "(see the README for the CMAKE_ARGS of CPU, CUDA and Metal builds)"
)
_CUDA_BUILD_HINT = (
    'reinstall it with CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
    "--no-cache-dir llama-cpp-python"
)


class LlamaBackend(EngineBackend):
    name = "llama.cpp"

    def claims(self, path: Path) -> bool:
        # A GGUF file, or a BERT embedding model's directory (converted to a GGUF once).
        return not path.is_dir() or is_bert_directory(path)

    def unsupported(self, device: str) -> str | None:
        try:
            from modelhost.engines.llamacpp.weights import supports_gpu_offload
        except ImportError:
            return _MISSING
        if device == "cpu":
            return None
        if not supports_gpu_offload():
            if device == "cuda":
                return f"this llama-cpp-python was built without a GPU backend; {_CUDA_BUILD_HINT}"
            return (
                "this llama-cpp-python was built without Metal; reinstall it with "
                "pip install --force-reinstall --no-cache-dir llama-cpp-python"
            )
        if device == "metal" and sys.platform != "darwin":
            return "Metal is macOS's"
        return None

    def build(self) -> dict[str, object]:
        # Which instruction sets llama.cpp was built for: a build with -march=native on one
        # CPU (or AMX on a Xeon) crashes in llama_decode on another; this says what to rebuild.
        try:
            from modelhost.engines.llamacpp.model import build_features
            from modelhost.engines.llamacpp.weights import supports_gpu_offload
        except ImportError:
            return {"installed": False}
        return {"features": build_features(), "gpu_offload": supports_gpu_offload()}

    def model_files(self, config: "ModelConfig", host: HostSettings) -> Path:
        path = config.model_path(host.cache_dir)
        if path.is_dir() and is_bert_directory(path):
            return cached_gguf(path, host.cache_dir / "models")
        return path

    def estimate_bytes(self, config: "ModelConfig", path: Path, device: str) -> int:
        from modelhost.engines.llamacpp.loading import estimate_bytes

        return estimate_bytes(config, path, device)

    def open(self, config: "ModelConfig", path: Path, host: HostSettings) -> Engine:
        try:
            from modelhost.engines.llamacpp.loading import open_engine
        except ImportError:
            raise RuntimeError(_MISSING) from None
        return open_engine(config, path, host.device, host.threads)

    def release_prefetched(self) -> None:
        weights = sys.modules.get("modelhost.engines.llamacpp.weights")  # none loaded without it
        if weights is not None:
            weights.release_prefetched()


BACKEND = LlamaBackend()
