"""Which models are resident: their registry, their load states and their engines.

Models load in the background so the server answers health at once; a load is single-flight
and requests for a loading model wait for it within their deadline.
"""

import asyncio
import enum
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from airouter.errors import DeadlineExceeded, NotFound, Unavailable
from modelhost.config import ModelConfig
from modelhost.engine import Engine
from modelhost.llama import ContextSettings, LlamaModel

_log = structlog.get_logger()


class ModelState(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    ERROR = "error"


@dataclass
class ResidentModel:
    """A configured model and, once loaded, its model and engine."""

    config: ModelConfig
    state: ModelState = ModelState.NOT_LOADED
    detail: str = ""
    model: LlamaModel | None = None
    engine: Engine | None = None
    _settled: asyncio.Event = field(default_factory=asyncio.Event)
    _load_task: asyncio.Task[None] | None = None


class Residency:
    """The configured models of one host, by name and alias."""

    def __init__(
        self, configs: list[ModelConfig], *, device: str, threads: int, cache_dir: Path
    ) -> None:
        self._device = device
        self._threads = threads
        self._cache_dir = cache_dir
        self.models = [ResidentModel(config) for config in configs]
        self._by_name = {
            name: resident
            for resident in self.models
            for name in [resident.config.name, *resident.config.aliases]
        }

    def resolve(self, name: str) -> ResidentModel:
        """The model called `name` (or aliased so); NotFound lists the names that exist."""
        resident = self._by_name.get(name)
        if resident is None:
            known = ", ".join(sorted(m.config.name for m in self.models))
            raise NotFound(f"model {name!r} is not served by this host; it serves: {known}")
        return resident

    def start_loading_all(self) -> None:
        """Starts loading every configured model in the background."""
        for resident in self.models:
            self._start_load(resident)

    def _start_load(self, resident: ResidentModel) -> None:
        if resident.state is ModelState.NOT_LOADED:
            resident.state = ModelState.LOADING
            resident._settled.clear()
            resident._load_task = asyncio.get_running_loop().create_task(self._load(resident))

    async def _load(self, resident: ResidentModel) -> None:
        config = resident.config
        log = _log.bind(model=config.name, device=self._device)
        log.info("model_loading")
        try:
            model, engine = await asyncio.to_thread(self._load_blocking, config)
        except Exception as exc:
            resident.state, resident.detail = ModelState.ERROR, str(exc)
            log.error("model_load_failed", error=str(exc))
        else:
            resident.model, resident.engine = model, engine
            resident.state, resident.detail = ModelState.READY, ""
            log.info("model_loaded", context_per_request=engine.context_per_request)
        finally:
            resident._load_task = None
            resident._settled.set()

    def _load_blocking(self, config: ModelConfig) -> tuple[LlamaModel, Engine]:
        gpu_layers = config.gpu_layers
        if gpu_layers is None:
            gpu_layers = 0 if self._device == "cpu" else -1
        model = LlamaModel(
            config.gguf_path(self._cache_dir),
            gpu_layers=gpu_layers,
            settings=ContextSettings(
                slots=config.slots,
                context_per_slot=config.context_length,
                batch_tokens=config.batch_tokens,
                threads=self._threads,
                flash_attention=config.flash_attention,
            ),
            chat_template=config.chat_template,
        )
        if config.context_length > model.context_train:
            _log.warning(
                "context_beyond_training",
                model=config.name,
                context_length=config.context_length,
                trained_on=model.context_train,
            )
        engine = Engine(model, name=config.name, slots=config.slots, max_queue=config.max_queue)
        return model, engine

    async def ready(
        self, resident: ResidentModel, time_left_s: float | None
    ) -> tuple[LlamaModel, Engine]:
        """The model's engine, waiting for a load in progress for at most `time_left_s` seconds."""
        if resident.state is not ModelState.READY:
            self._start_load(resident)
            try:
                await asyncio.wait_for(resident._settled.wait(), time_left_s)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model {resident.config.name!r} is still loading and the request's deadline "
                    "passed; retry with a longer deadline"
                ) from None
        if resident.state is ModelState.ERROR:
            raise Unavailable(f"model {resident.config.name!r} failed to load: {resident.detail}")
        assert resident.model is not None and resident.engine is not None
        return resident.model, resident.engine

    async def close(self) -> None:
        """Stops every engine and frees every model."""
        for resident in self.models:
            if resident._load_task is not None:
                await asyncio.gather(resident._load_task, return_exceptions=True)
            if resident.engine is not None:
                resident.state = ModelState.UNLOADING
                await asyncio.to_thread(resident.engine.close)
                resident.engine, resident.model = None, None
                resident.state = ModelState.NOT_LOADED
