"""Embeddings as the host offers them: validate, tokenize, hand the inputs to the model's
embedding engine, then cut and normalize what it returns.

Nothing here touches grpc; the servicer translates wire messages to and from these types.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import structlog

from airouter.errors import AirouterError, FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from modelhost.config import ModelConfig
    from modelhost.engines import Engine
    from modelhost.metrics import RequestMetrics
    from modelhost.residency import Residency

_log = structlog.get_logger()

# Inputs one request may carry (OpenAI's limit for /v1/embeddings).
MAX_INPUTS = 2048
# Inputs this short are tokenized on the event loop (tens of microseconds); a hop to a worker
# thread would cost more than the work.
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class EmbedSpec:
    """One embedding request: texts or token ids, each embedded on its own."""

    model: str
    inputs: list[str | list[int]]
    dimensions: int | None = None  # fewer leading dimensions (Matryoshka models only)
    request_id: str = ""


@dataclass(frozen=True)
class Embeddings:
    """The answer: one vector per input, in input order."""

    vectors: np.ndarray  # float32, (inputs, dimensions)
    prompt_tokens: int
    model: str  # the configured name of the model that made them


@dataclass(eq=False)
class EmbeddingRequest:
    """Inputs as token ids for an embedding engine. The engine calls `on_done` once, from its
    thread, with one pooled vector per input, or with the error that ended the request."""

    id: str
    inputs: list[list[int]]
    on_done: Callable[[np.ndarray | AirouterError], None]
    deadline: float | None = None  # time.perf_counter() after which it is dropped
    arrived: float = field(default_factory=time.perf_counter)
    # Set by the client's side when it leaves; the engine skips what it has not yet encoded.
    cancelled: bool = False


class EmbeddingService:
    """Runs embedding requests against the host's resident embedding models."""

    def __init__(self, residency: "Residency", metrics: "RequestMetrics") -> None:
        self.residency = residency
        self.metrics = metrics

    async def embed(self, spec: EmbedSpec, time_left_s: float | None) -> Embeddings:
        if not spec.inputs:
            raise InvalidArgument("the request has no inputs; send at least one text")
        if len(spec.inputs) > MAX_INPUTS:
            raise InvalidArgument(
                f"the request has {len(spec.inputs)} inputs; at most {MAX_INPUTS} are allowed, "
                "send the rest in further requests"
            )
        for i, item in enumerate(spec.inputs):
            if not item:
                raise InvalidArgument(f"input[{i}] is empty; every input needs text or tokens")
        if spec.dimensions is not None and spec.dimensions < 1:
            raise InvalidArgument(f"dimensions is {spec.dimensions}; it must be at least 1")
        resident = self.residency.resolve(spec.model)
        config = resident.config
        if config.kind != "embedding":
            raise FailedPrecondition(
                f"model {config.name!r} generates text and makes no embeddings; name an "
                'embedding model (kind = "embedding" in models.toml)'
            )
        try:
            async with self.residency.use(resident, time_left_s) as engine:
                _check_dimensions(spec.dimensions, engine.embedding_size, config)
                if sum(len(i) for i in spec.inputs) <= INLINE_TOKENIZE_CHARS:
                    tokens = _tokens(spec.inputs, engine, config.name)  # microseconds
                else:
                    tokens = await asyncio.to_thread(_tokens, spec.inputs, engine, config.name)
                pooled = await _run(engine, spec, tokens, time_left_s)
        except AirouterError as exc:
            self.metrics.refused(config.name, exc)
            raise
        vectors = _shape(pooled, spec.dimensions, config.normalize)
        prompt_tokens = sum(len(t) for t in tokens)
        self.metrics.embedded(config.name, len(tokens), prompt_tokens)
        return Embeddings(vectors, prompt_tokens, config.name)


def _tokens(inputs: list[str | list[int]], engine: "Engine", name: str) -> list[list[int]]:
    """Each input's tokens (texts with the model's special tokens, as it was trained; token
    ids as given), each checked against what the model can encode at once. Blocking."""
    room = engine.context_per_request
    longest = engine.longest_token_bytes or 64
    vocabulary = engine.vocabulary_size
    out: list[list[int]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            # No token stands for more bytes than the longest: refused before tokenizing.
            if len(item.encode()) > room * longest:
                raise InvalidArgument(
                    f"input[{i}] is {len(item.encode())} bytes, more than model {name!r} can "
                    f"embed at once ({room} tokens); split it"
                )
            tokens = engine.tokenize(item)
        else:
            bad = next((t for t in item if not 0 <= t < vocabulary), None)
            if bad is not None:
                raise InvalidArgument(
                    f"input[{i}] holds token id {bad}; model {name!r} has ids 0 to {vocabulary - 1}"
                )
            tokens = list(item)
        if len(tokens) > room:
            raise InvalidArgument(
                f"input[{i}] is {len(tokens)} tokens; model {name!r} embeds at most {room} "
                "at once: split it"
            )
        out.append(tokens)
    return out


async def _run(
    engine: "Engine", spec: EmbedSpec, tokens: list[list[int]], time_left_s: float | None
) -> np.ndarray:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[np.ndarray | AirouterError] = loop.create_future()

    def settle(result: np.ndarray | AirouterError) -> None:
        if not done.done():
            done.set_result(result)

    def deliver(result: np.ndarray | AirouterError) -> None:
        loop.call_soon_threadsafe(settle, result)

    now = time.perf_counter()
    request = EmbeddingRequest(
        id=spec.request_id or uuid.uuid4().hex,
        inputs=tokens,
        on_done=deliver,
        deadline=None if time_left_s is None else now + time_left_s,
    )
    engine.embed(request)
    try:
        result = await done
    finally:
        request.cancelled = True  # harmless when done; frees the engine when the client left
    if isinstance(result, AirouterError):
        raise result
    return result


def _check_dimensions(dimensions: int | None, size: int, config: "ModelConfig") -> None:
    if dimensions is None or dimensions == size:
        return
    if not config.matryoshka:
        raise InvalidArgument(
            f"model {config.name!r} makes {size}-dimension embeddings and cannot shorten "
            "them; omit dimensions (models trained for it set matryoshka = true)"
        )
    if dimensions > size:
        raise InvalidArgument(
            f"dimensions is {dimensions}; model {config.name!r} makes at most {size}"
        )


def _shape(pooled: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The vectors cut to `dimensions` (checked already) and scaled to length 1."""
    if dimensions is not None:
        pooled = pooled[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.where(norms > 0, norms, 1.0)
    return np.ascontiguousarray(pooled, dtype=np.float32)
