"""The MLX engine (mlx-lm): MLX model directories on Apple Silicon's GPU, or on the CPU.

The mlx[cpu] wheel for Linux bundles a reference BLAS that makes float32 decoding about 8x
slower than OpenBLAS. When the system has OpenBLAS (Debian: libopenblas0-pthread) it is
loaded into the global symbol scope, ahead of the bundled one, so mlx's BLAS calls bind to
it: everything under this package imports mlx only after this module ran.
"""

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

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
