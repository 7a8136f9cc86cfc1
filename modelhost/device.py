"""Which accelerator the host decodes on: `--device auto|cpu|cuda|metal`, as the present
hardware and the installed engines allow."""

import os
import platform
import sys

from modelhost.engines import ENGINES, backend

DEVICES = ("auto", "cpu", "cuda", "metal")


def default_threads() -> int:
    """Threads for decoding: every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _engine_support(device: str) -> tuple[bool, str]:
    """Whether some installed engine decodes on `device`, and why each cannot."""
    why_not = {name: backend(name).unsupported(device) for name in ENGINES}
    supported = any(why is None for why in why_not.values())
    return supported, "; ".join(f"{name}: {why}" for name, why in why_not.items() if why)


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
    if requested == "cuda":
        names, why_none = cuda_devices()
        if not names:
            raise DeviceError(
                f"--device cuda: no CUDA device found ({why_none}). "
                "Run with --device cpu, or --device auto to use what is present."
            )
        supported, why = _engine_support("cuda")
        if not supported:
            raise DeviceError(
                f"--device cuda: found {', '.join(names)}, but no installed engine can use it "
                f"({why})"
            )
        return "cuda"
    if requested == "metal":
        if not _is_apple_silicon():
            raise DeviceError(
                "--device metal needs an Apple Silicon Mac; run with --device cpu or --device auto"
            )
        supported, why = _engine_support("metal")
        if not supported:
            raise DeviceError(f"--device metal: no installed engine can use Metal ({why})")
        return "metal"
    if _is_apple_silicon() and _engine_support("metal")[0]:
        return "metal"
    if cuda_devices()[0] and _engine_support("cuda")[0]:
        return "cuda"
    return "cpu"
