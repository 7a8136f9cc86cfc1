"""Embeddings over one llama.cpp embedding context, on a thread that owns it.

Each step encodes as many waiting inputs as fit together (at most `slots` sequences and
`batch_tokens` tokens, in arrival order), every input its own sequence, and reads one pooled
vector per sequence (`llama_get_embeddings_seq`). A non-causal model (BERT) keeps no cells
between steps; a causal one's are cleared after each. An input is never split across steps:
llama.cpp pools a sequence only within one batch.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
import structlog

from airouter.errors import (
    AirouterError,
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from modelhost.embedding import EmbeddingRequest
from modelhost.engines.interface import Engine, EngineLoad
from modelhost.engines.llamacpp.model import LlamaModel
from modelhost.generation import EngineRequest

_log = structlog.get_logger()


@dataclass(eq=False)
class _Job:
    request: EmbeddingRequest
    vectors: np.ndarray
    placed: int = 0  # inputs handed to a step so far
    left: int = 0  # inputs whose vectors have not arrived

    def __post_init__(self) -> None:
        self.left = len(self.request.inputs)


@dataclass
class _Step:
    jobs: list[tuple[_Job, int]] = field(default_factory=list)  # (job, input index) per sequence
    tokens: int = 0


class LlamaEmbedder(Engine):
    """Encodes the inputs of queued embedding requests together, a step at a time."""

    kind = "llama.cpp"

    def __init__(self, model: LlamaModel, *, name: str, slots: int, max_queue: int) -> None:
        self._model = model
        self._name = name
        self._slots = slots
        self._max_queue = max_queue
        # An input is encoded whole in one batch, within the positions the model learned.
        self._room = min(model.batch_tokens, model.context_per_slot, model.context_train)
        self.vocabulary_size = model.n_vocab
        self.embedding_size = model.embedding_size
        self._memory = model.memory  # None for a non-causal model: it keeps no cells
        self._batch = llama_cpp.llama_batch_init(model.batch_tokens, 0, 1)
        self._changed = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._busy = 0
        self._steps = 0
        self._closing = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"embed-{name}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    @property
    def context_per_request(self) -> int:
        return self._room

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> str | None:
        return None

    def footprint_bytes(self, device: str) -> int:
        return self._model.footprint_bytes(device)

    def describe(self) -> dict[str, object]:
        return {**self._model.describe(), "embedding_size": self.embedding_size}

    def scan_vocabulary(self) -> None:
        self.longest_token_bytes = self._model.scan_vocabulary()

    def load(self) -> EngineLoad:
        with self._changed:
            return EngineLoad(self._slots, self._busy, len(self._waiting), 0, 0, self._steps)

    def submit(self, request: EngineRequest) -> None:
        raise FailedPrecondition(
            f"model {self._name!r} makes embeddings and generates no text; send it to Embed "
            "(/v1/embeddings)"
        )

    def cancel(self, request: EngineRequest) -> None:
        pass  # it never takes generation requests

    def embed(self, request: EmbeddingRequest) -> None:
        with self._changed:
            if self.failure is not None:
                raise Unavailable(
                    f"model {self._name!r} stopped encoding after an error ({self.failure}); "
                    "unload and load it again, or retry on another host"
                )
            if len(self._waiting) > self._max_queue:
                raise ResourceExhausted(
                    f"the queue of model {self._name!r} is full: {len(self._waiting)} "
                    "requests wait, the most its max_queue allows; retry later or on another "
                    "host"
                )
            vectors = np.empty((len(request.inputs), self.embedding_size), dtype=np.float32)
            self._waiting.append(_Job(request, vectors))
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()

    # --- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._encode([[max(llama_cpp.llama_vocab_bos(self._model.vocab), 0)]])  # warm up
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            self._free()
            return
        self._started.set()
        try:
            while (step := self._next_step()) is not None:
                self._run_step(step)
        finally:
            with self._changed:
                left, self._waiting = list(self._waiting), deque()
            for job in left:
                job.request.on_done(Unavailable(f"model {self._name!r} was unloaded; retry"))
            self._free()

    def _free(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        self._model.close()

    def _next_step(self) -> _Step | None:
        """The inputs of the next step, in arrival order; None once the engine closes."""
        with self._changed:
            while True:
                self._busy = 0
                self._drop_finished()
                if self._closing:
                    return None
                if self._waiting:
                    break
                self._changed.wait()
            step = _Step()
            for job in self._waiting:
                inputs = job.request.inputs
                while job.placed < len(inputs) and len(step.jobs) < self._slots:
                    size = len(inputs[job.placed])
                    if step.tokens + size > self._model.batch_tokens:
                        break
                    step.jobs.append((job, job.placed))
                    step.tokens += size
                    job.placed += 1
                if job.placed < len(inputs):
                    break  # the rest waits for the next step, in order
            while self._waiting and self._waiting[0].placed == len(self._waiting[0].request.inputs):
                self._waiting.popleft()  # all placed: it completes when this step ends
            self._busy = len(step.jobs)
            return step

    def _drop_finished(self) -> None:
        """Drops waiting requests whose client left or whose deadline passed before any of
        their inputs was placed."""
        now = time.perf_counter()
        kept: deque[_Job] = deque()
        for job in self._waiting:
            request = job.request
            if request.cancelled:
                continue
            if request.deadline is not None and now > request.deadline and job.placed == 0:
                request.on_done(
                    DeadlineExceeded(
                        f"the request's deadline passed while it waited for model "
                        f"{self._name!r}; retry with a longer deadline"
                    )
                )
                continue
            kept.append(job)
        self._waiting = kept

    def _run_step(self, step: _Step) -> None:
        try:
            vectors = self._encode([job.request.inputs[i] for job, i in step.jobs])
        except AirouterError as exc:
            done = {id(job): job for job, _ in step.jobs}
            for job in done.values():
                job.request.on_done(exc)
            with self._changed:
                self._waiting = deque(j for j in self._waiting if id(j) not in done)
            return
        self._steps += 1
        for (job, i), vector in zip(step.jobs, vectors, strict=True):
            job.vectors[i] = vector
            job.left -= 1
            if job.left == 0:
                job.request.on_done(job.vectors)

    def _encode(self, inputs: list[list[int]]) -> np.ndarray:
        """One batch of inputs, each its own sequence, to one pooled vector each."""
        batch, ctx = self._batch, self._model.ctx
        n = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        # A model without a KV cache (non-causal) is encoded; llama_decode would say so.
        run = llama_cpp.llama_encode if self._memory is None else llama_cpp.llama_decode
        code = run(ctx, batch)
        try:
            if code != 0:
                if code < 0:
                    self.failure = f"llama.cpp returned {code}"
                raise Unavailable(
                    f"llama.cpp could not encode a batch of {len(inputs)} inputs for model "
                    f"{self._name!r} (it returned {code}); retry"
                )
            out = np.empty((len(inputs), self.embedding_size), dtype=np.float32)
            for seq in range(len(inputs)):
                pointer = llama_cpp.llama_get_embeddings_seq(ctx, seq)
                out[seq] = np.ctypeslib.as_array(pointer, shape=(self.embedding_size,))
            return out
        finally:
            if self._memory is not None:
                llama_cpp.llama_memory_clear(self._memory, True)
