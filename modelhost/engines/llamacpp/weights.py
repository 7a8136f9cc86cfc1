"""llama.cpp's backend, its log, and loading a GGUF's weights, now or ahead of their model.

This module imports nothing of the modelhost and only llama-cpp-python beside the standard
library, so that `modelhost serve` can start loading weights before it imports the rest of
itself (modelhost.early_load).
"""

import ctypes
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

# ggml's log levels; everything below WARN is llama.cpp's load chatter.
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_CONT = 5
_backend_ready = False
_init_lock = threading.Lock()
# Loads are serialised so that the lines one logs (the buffers it allocates, which measure
# the model's footprint) are not mixed with another's. A load's warnings are logged when it
# ends: a load ahead starts before logging is set up.
_load_lock = threading.Lock()
_captured: list[tuple[int, str]] | None = None  # (level, line) of the load in progress
# Weights loading ahead of their model, by (file, GPU layers).
_prefetched: dict[tuple[str, int], "Future[Weights | None]"] = {}


def _is_warning(level: int) -> bool:
    return _GGML_LOG_LEVEL_WARN <= level < _GGML_LOG_LEVEL_CONT


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _forward_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if _captured is not None:
        if _is_warning(level) or b"buffer size" in text or b"layers to GPU" in text:
            _captured.append((level, text.decode("utf-8", "replace")))
    elif _is_warning(level):
        log_warnings([(level, text.decode("utf-8", "replace"))])


def log_warnings(lines: list[tuple[int, str]]) -> None:
    """Logs the warnings among llama.cpp's (level, line) pairs."""
    import structlog  # here: a load ahead must not wait for it

    log = structlog.get_logger()
    for level, line in lines:
        if _is_warning(level):
            log.warning("llama_cpp", message=line.strip())


def init_backend() -> None:
    global _backend_ready
    with _init_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, ...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


@contextmanager
def capturing_load() -> Iterator[list[tuple[int, str]]]:
    """Holds the load lock and collects the warnings and buffer lines llama.cpp logs
    meanwhile."""
    global _captured
    with _load_lock:
        lines: list[tuple[int, str]] = []
        _captured = lines
        try:
            yield lines
        finally:
            _captured = None


@dataclass
class Weights:
    model: Any  # llama_model_p; NULL when llama.cpp could not load the file
    lines: list[tuple[int, str]]  # what llama.cpp logged while loading it (capturing_load)


def load_weights(path: Path, gpu_layers: int) -> Weights:
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    with capturing_load() as lines:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    return Weights(model, lines)


def prefetch_weights(path: Path, gpu_layers: int) -> None:
    """Starts loading a GGUF's weights on a thread of their own. The model later opened from
    the same file with the same GPU layers takes them (take_prefetched) instead of loading
    them again, so the load runs beside whatever the process does meanwhile.
    release_prefetched frees weights that nothing took."""
    init_backend()
    future: Future[Weights | None] = Future()
    _prefetched[_key(path, gpu_layers)] = future

    def load() -> None:
        try:
            future.set_result(load_weights(path, gpu_layers))
        except Exception:  # the model's own load then tries, and reports what went wrong
            future.set_result(None)

    threading.Thread(target=load, name="prefetch-weights", daemon=True).start()


def take_prefetched(path: Path, gpu_layers: int) -> Weights | None:
    """The weights prefetched for this file and GPU layers, once they have loaded; None when
    none were."""
    future = _prefetched.pop(_key(path, gpu_layers), None) if _prefetched else None
    return future.result() if future is not None else None


def release_prefetched() -> None:
    """Frees prefetched weights that nothing took, once their load ends."""

    def free(done: "Future[Weights | None]") -> None:
        weights = done.result()
        if weights is not None and weights.model:
            llama_cpp.llama_model_free(weights.model)

    while _prefetched:
        _, future = _prefetched.popitem()
        future.add_done_callback(free)


def _key(path: Path, gpu_layers: int) -> tuple[str, int]:
    # Without a GPU backend the layers to offload change nothing that loads.
    return str(path.resolve()), gpu_layers if supports_gpu_offload() else 0
