"""What the host asks of an engine, and of the package that provides one.

An Engine owns one loaded model and decodes requests for it on a thread of its own: the event
loop only submits and cancels, and receives each request's events through its `on_events`
callback (called on the request's `loop`, a step's events for all of that loop's requests in
one hand-off, where the request names one). An EngineBackend is what an engine package
registers (modelhost.engines.ENGINES): which model files it runs, on which devices, how big a
model will be, and how to open one. Many
engines will reuse the step-loop scheduler (modelhost.engines.scheduler); the interface does
not require it.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from airouter.errors import FailedPrecondition, InvalidArgument
from airouter.infill import Infill
from modelhost.embedding import EmbeddingRequest
from modelhost.generation import EngineRequest

if TYPE_CHECKING:
    from modelhost.config import ModelConfig
    from modelhost.constraints import ConstraintCompiler


@dataclass(frozen=True)
class HostSettings:
    """What the host decides for every model it loads."""

    device: str  # resolved: cpu, cuda or metal
    threads: int
    cache_dir: Path
    budget_bytes: int = 0  # what the models may take from the device together; 0: unknown


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of how busy an engine is."""

    slots: int
    slots_busy: int
    queued: int
    tokens_generated: int
    prompt_tokens_reused: int
    decode_steps: int  # steps that produced tokens: tokens / steps shows how much is batched
    # Prefix blocks whose cells some slot holds: hash -> tokens up to the block's end.
    cached_prefixes: dict[int, int] = field(default_factory=dict)


class Engine(ABC):
    """One loaded model, decoding on its own thread."""

    kind: ClassVar[str]  # the engine's registered name: a label on metrics and traces
    # Why the engine stopped decoding, once it failed; None while it works.
    failure: str | None = None
    # Bytes of the longest token; None until known (see scan_vocabulary).
    longest_token_bytes: int | None = None
    # Tokens in the model's vocabulary (ids are 0 to this less one).
    vocabulary_size: int = 0
    # An embedding model's vector size; 0 for a model that generates text.
    embedding_size: int = 0

    @property
    @abstractmethod
    def context_per_request(self) -> int:
        """Tokens one request may use, prompt and generated together."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokens of text with the model's BOS; special tokens written in text are honoured.
        Safe to call from any thread."""

    def infill(self, infill: Infill, room: int) -> list[int] | None:
        """The tokens of a fill-in-the-middle prompt, at most `room` of them (airouter.infill);
        None when the model has no FIM tokens or the engine cannot lay them out."""
        return None

    @abstractmethod
    def apply_chat_template(self, messages: list[tuple[str, str]]) -> str | None:
        """The prompt for a conversation, ending with the assistant's turn; None when the
        model has no chat template this engine can render."""

    def chat_template_source(self) -> str | None:
        """The model's Jinja chat template (the GGUF's tokenizer.chat_template, or what the
        config sets), for conversations with tools; None when there is none."""
        return None

    def constraints(self) -> "ConstraintCompiler":
        """Compiles output constraints against the model's vocabulary (see
        modelhost.constraints); InvalidArgument where the engine cannot constrain."""
        raise InvalidArgument(f"the {self.kind} engine cannot constrain its output")

    @abstractmethod
    def footprint_bytes(self, device: str) -> int:
        """Memory the loaded model takes from `device`'s budget, measured."""

    def describe(self) -> dict[str, object]:
        """Where the model went, for the load's log line (layers offloaded, buffers, ...)."""
        return {}

    def scan_vocabulary(self) -> None:  # noqa: B027 (optional: most engines need none)
        """Slow look-ups over the vocabulary, run off the engine thread after a load."""

    @abstractmethod
    def load(self) -> EngineLoad:
        """How busy the engine is now; any thread."""

    @abstractmethod
    def submit(self, request: EngineRequest) -> None:
        """Queues a request; raises ResourceExhausted past the queue bound, Unavailable once
        the engine has failed. Events arrive through request.on_events."""

    def embed(self, request: EmbeddingRequest) -> None:
        """Queues an embedding request (an embedding model's engine); the result arrives
        through request.on_done. Raises what submit raises."""
        raise FailedPrecondition(f"this model generates text; its {self.kind} engine embeds none")

    @abstractmethod
    def cancel(self, request: EngineRequest) -> None:
        """Stops a request soon; harmless if it already finished."""

    @abstractmethod
    def close(self) -> None:
        """Ends what is left and frees the model; blocking."""


class EngineBackend(ABC):
    """An engine package as the host sees it before any model is loaded. Its module must
    import without the engine's own library, so that every host can ask every engine."""

    name: ClassVar[str]  # as models.toml's `engine` names it

    @abstractmethod
    def claims(self, path: Path) -> bool:
        """Whether the engine runs the model at path when the config says engine = "auto"."""

    @abstractmethod
    def unsupported(self, device: str) -> str | None:
        """None when the engine can decode on `device` (cpu, cuda, metal) here; else why not
        and what to install, in a sentence."""

    def build(self) -> dict[str, object]:
        """What the engine's library was built with, for the host's start-up log."""
        return {}

    def model_files(self, config: "ModelConfig", host: HostSettings) -> Path:
        """What `open` loads (an engine may convert the configured files once, into the
        cache directory)."""
        return config.model_path(host.cache_dir)

    @abstractmethod
    def estimate_bytes(self, config: "ModelConfig", path: Path, device: str) -> int:
        """The model's footprint before it loads, from its files."""

    @abstractmethod
    def open(self, config: "ModelConfig", path: Path, host: HostSettings) -> Engine:
        """Loads the model and starts its engine; blocking (called on a worker thread)."""

    @abstractmethod
    def release_prefetched(self) -> None:
        """Frees what the engine loaded ahead of a model that the host then did not load
        (modelhost.early_load)."""
