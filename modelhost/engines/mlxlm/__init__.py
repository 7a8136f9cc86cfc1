"""The MLX engine (mlx-lm): MLX model directories on Apple Silicon's GPU, or on the CPU.

The mlx[cpu] wheel for Linux bundles a reference BLAS that makes float32 decoding about 8x
slower than OpenBLAS. When the system has OpenBLAS (Debian: libopenblas0-pthread) it is
loaded into the global symbol scope, ahead of the bundled one, so mlx's BLAS calls bind to
it: everything under this package imports mlx only after this module ran.
"""

import ctypes
import ctypes.util
import importlib.util
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from modelhost.engines.interface import Engine, EngineBackend, HostSettings

if TYPE_CHECKING:
    from modelhost.config import ModelConfig

T = TypeVar("T")

BLAS = "bundled"
if sys.platform == "linux":
    _openblas = ctypes.util.find_library("openblas")
    if _openblas:
        try:
            ctypes.CDLL(_openblas, mode=ctypes.RTLD_GLOBAL)
            BLAS = _openblas
        except OSError:
            pass


def on_own_thread(work: Callable[[], T]) -> T:
    """Runs MLX work on a thread of its own and clears that thread's streams when it ends.

    MLX streams belong to the thread that made them. Left to process exit, tearing them down
    aborts now and then ("terminate called without an active exception"); cleared with
    mx.clear_streams() they are gone for the thread's life (its default stream too), so the
    clearing can only come where a thread's MLX work ends: hence a thread per piece of work."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        import mlx.core as mx

        try:
            result.append(work())
        except BaseException as exc:
            failure.append(exc)
        finally:
            mx.clear_streams()

    thread = threading.Thread(target=run, name="mlx-work")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


_MISSING = "the MLX engine is not installed here; install it with pip install 'airouter[mlx]'"


class MlxBackend(EngineBackend):
    name = "mlx"

    def claims(self, path: Path) -> bool:
        return path.is_dir()  # an mlx-lm model directory (a GGUF it takes only when asked)

    def unsupported(self, device: str) -> str | None:
        if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
            return _MISSING
        if device == "cuda":
            return "MLX does not run on CUDA"
        if device == "metal" and not (sys.platform == "darwin" and platform.machine() == "arm64"):
            return "MLX's Metal backend needs an Apple Silicon Mac"
        return None

    def build(self) -> dict[str, object]:
        return {"installed": self.unsupported("cpu") is None, "blas": BLAS}

    def model_files(self, config: "ModelConfig", host: HostSettings) -> Path:
        """A GGUF is converted once into the cache directory: to 8 bits on a GPU, to float32
        on the CPU (where mlx's quantized kernels are slower than a float32 BLAS)."""
        path = config.model_path(host.cache_dir)
        if path.is_file():
            from modelhost.engines.mlxlm.convert import cached_conversion

            quantize = "none" if host.device == "cpu" else "q8"
            path = cached_conversion(path, host.cache_dir / "mlx", quantize=quantize)
        return path

    def estimate_bytes(self, config: "ModelConfig", path: Path, device: str) -> int:
        from modelhost.engines.mlxlm.engine import estimate_bytes

        return estimate_bytes(path, config.slots, config.context_length)

    def open(self, config: "ModelConfig", path: Path, host: HostSettings) -> Engine:
        try:
            from modelhost.engines.mlxlm.engine import MlxEngine
        except ImportError:
            raise RuntimeError(_MISSING) from None
        if host.device == "cpu" and sys.platform == "linux" and BLAS == "bundled":
            structlog.get_logger().warning(
                "mlx_without_openblas",
                model=config.name,
                detail="mlx[cpu] has only its bundled reference BLAS: decoding is ~8x slower "
                "and requests are not batched; install OpenBLAS (Debian: apt install "
                "libopenblas0-pthread) and restart",
            )
        return MlxEngine(
            path,
            name=config.name,
            slots=config.slots,
            max_queue=config.max_queue,
            context_per_slot=config.context_length,
            batch_tokens=config.batch_tokens,
            device=host.device,
            budget_bytes=host.budget_bytes,
        )

    def release_prefetched(self) -> None:
        pass  # it loads nothing ahead of a model


BACKEND = MlxBackend()
