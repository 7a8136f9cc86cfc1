"""How much memory the host's device has, and how much a model will take on it.

The budget is for the device that holds the weights and KV cache: VRAM (from NVML) on cuda,
unified memory on metal, RAM (from psutil) on cpu. A model's footprint is estimated from its
GGUF header before it loads and measured from llama.cpp's own buffer sizes once it has.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from modelhost.gguf_header import GGUFHeader

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MIB = 1 << 20

# Bytes per element of the KV cache types (ggml block sizes: 32 elements per block).
KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def parse_size(text: str) -> int:
    """Bytes in a size such as "6GiB", "512 MiB" or "8000000000"; ValueError otherwise."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like '6GiB' or '512MiB'")
    return int(float(match.group(1)) * _UNITS[unit])


def reserve_bytes(text: str, total: int) -> int:
    """Bytes a reserve ("15%" of total, or a size) keeps free."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            share = -1
        if not 0 <= share < 100:
            raise ValueError(f"{text!r} is not a share; write it like '15%'")
        return int(total * share / 100)
    return parse_size(text)


@dataclass(frozen=True)
class DeviceMemory:
    total: int
    used: int


@dataclass(frozen=True)
class GpuReading:
    """One NVIDIA GPU's telemetry; a figure NVML cannot give is 0."""

    index: int
    name: str
    memory_total: int
    memory_used: int
    utilization_percent: int
    temperature_celsius: int
    power_watts: float


class MemoryProbe:
    """Reads the device's memory; NVML stays initialised for the life of the probe."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._nvml_handles: list[object] = []
        if device == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self._nvml_handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]

    def read(self) -> DeviceMemory:
        if self._nvml_handles:
            import pynvml

            infos = [pynvml.nvmlDeviceGetMemoryInfo(h) for h in self._nvml_handles]
            return DeviceMemory(sum(i.total for i in infos), sum(i.used for i in infos))
        vm = psutil.virtual_memory()
        return DeviceMemory(vm.total, vm.total - vm.available)

    def gpus(self) -> list[GpuReading]:
        """Each GPU's memory, utilization, temperature and power (NVML; empty off cuda)."""
        if not self._nvml_handles:
            return []
        import pynvml

        def read(call: Callable[..., Any], *args: Any) -> Any:
            try:
                return call(*args)
            except pynvml.NVMLError:  # not every board reports every figure
                return None

        readings = []
        for index, handle in enumerate(self._nvml_handles):
            name = read(pynvml.nvmlDeviceGetName, handle) or ""
            memory = read(pynvml.nvmlDeviceGetMemoryInfo, handle)
            rates = read(pynvml.nvmlDeviceGetUtilizationRates, handle)
            celsius = read(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
            milliwatts = read(pynvml.nvmlDeviceGetPowerUsage, handle)
            readings.append(
                GpuReading(
                    index=index,
                    name=name if isinstance(name, str) else name.decode(),
                    memory_total=int(memory.total) if memory else 0,
                    memory_used=int(memory.used) if memory else 0,
                    utilization_percent=int(rates.gpu) if rates else 0,
                    temperature_celsius=int(celsius or 0),
                    power_watts=(milliwatts or 0) / 1000,
                )
            )
        return readings

    def close(self) -> None:
        if self._nvml_handles:
            import pynvml

            pynvml.nvmlShutdown()
            self._nvml_handles = []


def estimate_footprint(
    header: GGUFHeader,
    *,
    on_device_share: float,
    context_tokens: int,
    batch_tokens: int,
    cache_type_k: str,
    cache_type_v: str,
    slots: int = 1,
    full_swa_cache: bool = False,
    embedding: bool = False,
) -> int:
    """Bytes a model will take on the budgeted device: its weights (the share of layers
    offloaded there), its KV cache for every slot's context (sliding-window layers only for
    their window unless full_swa_cache), and llama.cpp's compute and output buffers. An
    embedding context outputs no logits, and a non-causal (BERT-like) model keeps no KV cache."""
    layers = header.arch_int("block_count")
    embd = header.arch_int("embedding_length")
    heads = max(header.arch_int("attention.head_count", 1), 1)
    kv_heads = header.arch_int("attention.head_count_kv", heads)
    key_length = header.arch_int("attention.key_length", embd // heads)
    value_length = header.arch_int("attention.value_length", embd // heads)
    vocab = header.arch_int("vocab_size") or header.array_lengths.get("tokenizer.ggml.tokens", 0)
    per_layer_token = kv_heads * (
        key_length * KV_TYPE_BYTES[cache_type_k] + value_length * KV_TYPE_BYTES[cache_type_v]
    )
    window = header.arch_int("attention.sliding_window")
    swa_layers = sliding_layers(header, layers) if window and not full_swa_cache else 0
    # llama.cpp's unified cache holds each sequence's window plus a batch, padded to 256.
    swa_cells = min(context_tokens, -(-(window * slots + batch_tokens) // 256) * 256)
    kv_cache = per_layer_token * ((layers - swa_layers) * context_tokens + swa_layers * swa_cells)
    # The graph's largest tensors are the output layer's logits for a batch (f32); the other
    # activations scale with the embedding width.
    compute = batch_tokens * (vocab + 16 * embd) * 4
    if embedding:
        compute = batch_tokens * 16 * embd * 4
        if not header.arch_int("attention.causal", 1):
            kv_cache = 0
    compute_share = 1.0 if on_device_share > 0 else 0.0
    return int((header.file_bytes + kv_cache) * on_device_share + compute * compute_share)


# Every n-th layer attends to the whole context, the others to a sliding window, by
# architecture, as llama.cpp's model code sets them when a GGUF does not say
# (`<arch>.attention.sliding_window_pattern`).
SWA_PATTERNS = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "gemma-embedding": 6,
    "cohere2": 4,
    "llama4": 4,
    "exaone4": 4,
    "olmo2": 4,
    "gpt-oss": 2,
}


def sliding_layers(header: GGUFHeader, layers: int) -> int:
    """How many of the model's layers use a sliding window; 0 when the architecture is not
    known (the estimate then counts every layer's whole context, erring high)."""
    pattern = header.arch_int("attention.sliding_window_pattern") or SWA_PATTERNS.get(
        header.architecture, 0
    )
    if pattern <= 1:
        return 0
    return layers - layers // pattern
