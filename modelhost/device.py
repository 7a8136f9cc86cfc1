"""Which accelerator the host decodes on: `--device auto|cpu|cuda|metal`."""

import platform
import sys

from modelhost.engines.llamacpp.model import supports_gpu_offload

DEVICES = ("auto", "cpu", "cuda", "metal")
_CUDA_BUILD_HINT = (
    'reinstall it with CUDA: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
    "--no-cache-dir llama-cpp-python"
)


class DeviceError(Exception):
    """The requested device is not usable here; the message says what to do."""


def cuda_devices() -> tuple[list[str], str]:
    """Names of the CUDA devices NVML sees, and why there are none when the list is empty."""
    try:
        import pynvml
    except ImportError:
        return [], "the nvidia-ml-py package is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML could not start ({exc}); is the NVIDIA driver installed?"
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = [
            pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)
        ]
    finally:
        pynvml.nvmlShutdown()
    return [n if isinstance(n, str) else n.decode() for n in names], "NVML reports 0 devices"


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_device(requested: str) -> str:
    """The device to use for `requested`; raises DeviceError when it is not usable."""
    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    gpu_build = supports_gpu_offload()
    if requested == "cuda":
        names, why_none = cuda_devices()
        if not names:
            raise DeviceError(
                f"--device cuda: no CUDA device found ({why_none}). "
                "Run with --device cpu, or --device auto to use what is present."
            )
        if not gpu_build:
            raise DeviceError(
                f"--device cuda: found {', '.join(names)}, but this llama-cpp-python was built "
                f"without a GPU backend; {_CUDA_BUILD_HINT}"
            )
        return "cuda"
    if requested == "metal":
        if not _is_apple_silicon():
            raise DeviceError(
                "--device metal needs an Apple Silicon Mac; run with --device cpu or --device auto"
            )
        if not gpu_build:
            raise DeviceError(
                "--device metal: this llama-cpp-python was built without Metal; reinstall it with "
                "pip install --force-reinstall --no-cache-dir llama-cpp-python"
            )
        return "metal"
    if gpu_build and _is_apple_silicon():
        return "metal"
    if gpu_build and cuda_devices()[0]:
        return "cuda"
    return "cpu"
