"""The MLX engine (mlx-lm): MLX model directories on Apple Silicon's GPU, or on the CPU.

The mlx[cpu] wheel for Linux bundles a reference BLAS that makes float32 decoding about 8x
slower than OpenBLAS. When the system has OpenBLAS (Debian: libopenblas0-pthread) it is
loaded into the global symbol scope, ahead of the bundled one, so mlx's BLAS calls bind to
it: everything under this package imports mlx only after this module ran.
"""

import ctypes
import ctypes.util
import sys

BLAS = "bundled"
if sys.platform == "linux":
    _openblas = ctypes.util.find_library("openblas")
    if _openblas:
        try:
            ctypes.CDLL(_openblas, mode=ctypes.RTLD_GLOBAL)
            BLAS = _openblas
        except OSError:
            pass
