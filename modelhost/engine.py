"""Continuous batching over one llama.cpp context, on a thread that owns it.

Each step is one llama_decode holding the next token of every generating sequence plus
prompt chunks of newly admitted ones. Each slot is one llama.cpp sequence. A slot keeps the
KV cells of its last request after it finishes, so a later prompt that starts the same way
(a shared system prompt, the next turn of a chat) is evaluated only from where it differs; the
cells are shared with `llama_memory_seq_cp`, which costs nothing in the unified KV cache. The
event loop only enqueues work (`submit`, `cancel`) and receives events through each request's
`on_events` callback, which the engine calls from its own thread.
"""

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import structlog

from airouter.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    FinishReason,
    Rejected,
    Timings,
)
from modelhost.llama import LlamaModel
from modelhost.sampler import TokenSampler
from modelhost.text_stream import TextStream

_log = structlog.get_logger()

# A waiting prompt that shares this many tokens with a prompt being computed waits for it.
SHARED_PREFILL_MIN = 128
# A prompt that shares this fraction of an idle slot's tokens is decoded in that slot.
CONTINUES = 0.5
# Prefix blocks each slot reports holding at most: its first REPORTED_FIRST and its last.
REPORTED_BLOCKS = 16
REPORTED_FIRST = 4


@dataclass
class _Slot:
    """One llama.cpp sequence and the tokens whose KV cells it holds, from position 0."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    last_used: float = 0.0  # when a request last finished in it or copied its cells
    # The prefix blocks of the request that filled it: (hash, tokens up to the block's end).
    blocks: tuple[tuple[int, int], ...] = ()


@dataclass
class _Sequence:
    request: EngineRequest
    slot: _Slot
    sampler: TokenSampler
    text: TextStream
    admitted: float
    reused: int  # prompt tokens whose KV cells came from an earlier request
    prompt_done: int  # prompt tokens already in the KV cache
    last_token: int = -1
    generated: int = 0
    unreported: int = 0  # generated tokens not yet covered by a Delta
    batch_index: int = -1  # where this sequence's logits are in the current batch
    first_token_at: float | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def prefilled(self) -> bool:
        return self.prompt_done == len(self.request.prompt)


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of how busy an engine is."""

    slots: int
    slots_busy: int
    queued: int
    tokens_generated: int
    prompt_tokens_reused: int
    # Prefix blocks whose cells some slot holds: hash -> tokens up to the block's end.
    cached_prefixes: dict[int, int] = field(default_factory=dict)


class Engine:
    """Decodes up to `slots` requests together on a dedicated thread."""

    def __init__(self, model: LlamaModel, *, name: str, slots: int, max_queue: int) -> None:
        self._model = model
        self._name = name
        self._slots = slots
        self._max_queue = max_queue
        self._inbox: queue.SimpleQueue[tuple[str, EngineRequest | None]] = queue.SimpleQueue()
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[EngineRequest, _Sequence] = {}
        self._all_slots = [_Slot(seq_id) for seq_id in range(slots)]
        self._idle = list(self._all_slots)
        self._batch = llama_cpp.llama_batch_init(model.batch_tokens, 0, 1)
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet in a slot; guarded by _lock
        self._tokens_generated = 0
        self._prompt_tokens_reused = 0
        self._cached_prefixes: dict[int, int] = {}  # replaced whole on the engine thread
        # A step found no KV room for its prompt chunks: the next one decodes only generating
        # sequences (llama_decode returned 1, which is back-pressure, not a failure).
        self._prompts_deferred = False
        self._closing = False
        self.failure: str | None = None  # why the engine thread stopped, if it failed
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def context_per_request(self) -> int:
        return self._model.context_per_slot

    def load(self) -> EngineLoad:
        with self._lock:
            queued = self._queued
        return EngineLoad(
            self._slots,
            len(self._running),
            queued,
            self._tokens_generated,
            self._prompt_tokens_reused,
            self._cached_prefixes,
        )

    def submit(self, request: EngineRequest) -> None:
        """Queues a request; raises ResourceExhausted when it would have to wait for a slot
        and max_queue requests already do. One that will take a free slot is never refused;
        max_queue = 0 means no waiting."""
        with self._lock:
            if self.failure is not None:
                raise Unavailable(
                    f"model {self._name!r} stopped decoding after an error ({self.failure}); "
                    "unload and load it again (UnloadModel, LoadModel), or retry on another host"
                )
            # Submitted requests take the free slots first; the rest wait.
            waiting = self._queued + len(self._running) - self._slots
            if waiting >= 0 and waiting >= self._max_queue:
                raise ResourceExhausted(
                    f"the queue of model {self._name!r} is full: {self._queued} requests wait "
                    f"for its {self._slots} slots, the most its max_queue allows; retry later "
                    "or on another host"
                )
            self._queued += 1
            # Under the lock, so a failing engine thread sees every request let in.
            self._inbox.put(("submit", request))

    def cancel(self, request: EngineRequest) -> None:
        """Stops a request before the next decode step; harmless if it already finished."""
        self._inbox.put(("cancel", request))

    def close(self) -> None:
        """Cancels what is left, stops the thread and frees the model."""
        self._inbox.put(("close", None))
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._model.close()

    # --- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._model.warm_up()  # on this thread: see LlamaModel.warm_up
            while not self._closing:
                self._take_inbox(block=not (self._running or self._waiting))
                if self._closing:
                    break
                self._drop_expired()
                self._admit()
                if self._running:
                    self._step()
        except Exception as exc:
            _log.exception("engine_failed", model=self._name)
            with self._lock:
                self.failure = str(exc) or type(exc).__name__
            self._take_inbox(block=False)
            self._finish_everything(FinishReason.ERROR, f"engine failed: {exc}")
            return
        self._finish_everything(FinishReason.CANCELLED, "")

    def _take_inbox(self, *, block: bool) -> None:
        try:
            kind, payload = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                self._handle(kind, payload)
                kind, payload = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, kind: str, request: EngineRequest | None) -> None:
        if kind == "close":
            self._closing = True
            return
        assert request is not None
        if kind == "submit":
            self._waiting.append(request)
        elif kind == "cancel":
            self._cancel(request)

    def _cancel(self, request: EngineRequest) -> None:
        seq = self._running.get(request)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED)
            self._deliver(seq)
        elif request in self._waiting:
            self._waiting.remove(request)
            self._finish_waiting(request, FinishReason.CANCELLED)

    def _drop_expired(self) -> None:
        """Ends queued requests whose deadline passed: a slot must not go to a client that
        has given up."""
        if not self._waiting:
            return
        now = time.perf_counter()
        expired = [r for r in self._waiting if r.deadline is not None and r.deadline <= now]
        for request in expired:
            self._waiting.remove(request)
            self._dequeued()
            waited = now - request.arrived
            error = DeadlineExceeded(
                f"the deadline passed after {waited:.1f} s waiting for one of model "
                f"{self._name!r}'s {self._slots} slots; allow more time, or retry on a less "
                "busy host"
            )
            _emit(request, [Rejected(error)])

    def _finish_waiting(
        self, request: EngineRequest, reason: FinishReason, error: str = ""
    ) -> None:
        """Ends a request that never got a slot; the caller has taken it off the queue."""
        self._dequeued()
        waited_ms = (time.perf_counter() - request.arrived) * 1e3
        timings = Timings(queue_ms=waited_ms, total_ms=waited_ms)
        _emit(request, [self._finish_event(request, reason, 0, 0, timings, error)])

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _admit(self) -> None:
        deferred: list[EngineRequest] = []
        while self._waiting and self._idle:
            request = self._waiting.popleft()
            if self._shares_a_prefill(request):
                deferred.append(request)
                continue
            try:
                sampler = TokenSampler(
                    request.sampling,
                    self._model.n_vocab,
                    self._model.end_of_generation_tokens() if request.ignore_eos else [],
                )
            except Exception as exc:  # this request cannot run; the others go on
                _log.exception("sampler_failed", model=self._name, request_id=request.id)
                self._finish_waiting(
                    request, FinishReason.ERROR, f"cannot sample with these settings: {exc}"
                )
                continue
            self._dequeued()
            slot, reused = self._place(request.prompt)
            slot.blocks = request.blocks
            self._summarize_prefixes()
            self._prompt_tokens_reused += reused
            self._running[request] = _Sequence(
                request=request,
                slot=slot,
                sampler=sampler,
                text=TextStream(request.stop),
                admitted=time.perf_counter(),
                reused=reused,
                prompt_done=reused,
            )
        self._waiting.extendleft(reversed(deferred))

    def _shares_a_prefill(self, request: EngineRequest) -> bool:
        """Whether a running sequence is still computing a long prefix of this prompt: then
        the request waits for those cells instead of computing them beside it (a burst that
        shares a document; SGLang's scheduler does the same within a batch). Only where a
        slot's cells can be lent midway: not on recurrent or sliding-window models."""
        if self._model.recurrent or self._model.sliding_window > 0:
            return False
        for seq in self._running.values():
            if seq.prefilled:
                continue
            shared = min(
                _common_prefix(seq.request.prompt, request.prompt), len(request.prompt) - 1
            )
            if shared >= SHARED_PREFILL_MIN and seq.prompt_done < shared:
                return True
        return False

    def _place(self, prompt: list[int]) -> tuple[_Slot, int]:
        """Takes an idle slot for a prompt and fills its KV cache with the longest prefix of
        the prompt any slot holds. Returns the slot and that length.

        The slot is the idle one that holds that prefix itself when the prompt continues most
        of what it holds (a chat's next turn, in place: as llama-server's slot similarity),
        else the least recently used idle slot. A slot whose cells are copied counts as used,
        so a prefix many requests share (a system prompt, a document) is not the first to be
        overwritten."""
        source, reused = None, 0
        for other in self._all_slots:
            # The last prompt token is always evaluated: its logits pick the first token.
            n = min(_common_prefix(other.cached, prompt), len(prompt) - 1)
            if n > reused and self._holds_prefix(other, n):
                source, reused = other, n
        continues = source is not None and reused >= len(source.cached) * CONTINUES
        slot = source if continues and source in self._idle else min(self._idle, key=_recency)
        self._idle.remove(slot)
        memory = self._model.memory
        if source is slot:
            kept = llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, reused, -1)
        else:
            kept = llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            if source is not None:
                llama_cpp.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, 0, reused)
                source.last_used = time.perf_counter()
        if not kept:  # the memory could not drop just the tail: evaluate the whole prompt
            llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            reused = 0
        slot.cached = prompt[:reused]
        return slot, reused

    def _summarize_prefixes(self) -> None:
        """What the host reports holding: each slot's first and last prefix blocks (a bounded
        summary; a conversation's next turn extends its last, a new one shares its first)
        whose cells the slot still holds and could lend."""
        held: dict[int, int] = {}
        for slot in self._all_slots:
            blocks = slot.blocks
            if len(blocks) > REPORTED_BLOCKS:
                blocks = blocks[:REPORTED_FIRST] + blocks[REPORTED_FIRST - REPORTED_BLOCKS :]
            for block, tokens in blocks:
                if tokens <= len(slot.cached) and tokens > held.get(block, 0):
                    if self._holds_prefix(slot, tokens):
                        held[block] = tokens
        self._cached_prefixes = held

    def _holds_prefix(self, slot: _Slot, n: int) -> bool:
        """Whether slot's cells can stand in for the first n tokens. Sliding-window layers
        drop cells that fell out of their window, and the next token needs the last
        `window` of them."""
        if self._model.recurrent:
            # A recurrent state stands for exactly the tokens it has seen: it serves a prefix
            # only when it ends there (a chat's next turn), and cannot be cut back to one.
            return len(slot.cached) == n
        window = self._model.sliding_window
        if window <= 0:
            return True
        oldest = llama_cpp.llama_memory_seq_pos_min(self._model.memory, slot.seq_id)
        return oldest <= max(0, n - window)

    def _step(self) -> None:
        batch = self._batch
        n = 0

        def add(token: int, slot: _Slot, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            slot.cached.append(token)
            n += 1

        sampling: list[_Sequence] = []
        # Generating sequences first: each costs one token and keeps its stream flowing.
        for seq in self._running.values():
            if seq.prefilled:
                seq.batch_index = n
                add(seq.last_token, seq.slot, True)
                sampling.append(seq)
        # Then prompt chunks, oldest admission first, in the room left.
        generating = n  # one token each: sampling[:generating] are these sequences
        chunked: list[tuple[_Sequence, int]] = []  # prompt chunks added, with where they began
        for seq in self._running.values():
            room = self._model.batch_tokens - n
            if room <= 0 or self._prompts_deferred:
                break
            if seq.prefilled:
                continue
            prompt = seq.request.prompt
            end = min(len(prompt), seq.prompt_done + room)
            chunked.append((seq, seq.prompt_done))
            for i in range(seq.prompt_done, end):
                add(prompt[i], seq.slot, i == len(prompt) - 1)
            seq.prompt_done = end
            if seq.prefilled:
                seq.batch_index = n - 1
                sampling.append(seq)
        batch.n_tokens = n

        rc = llama_cpp.llama_decode(self._model.ctx, batch)
        if rc == 1 and 0 < generating < n:
            # No KV room for the prompt chunks (nothing was decoded): undo this step and let
            # the generating sequences go on alone; the prompts follow as cells free up.
            for seq in sampling[:generating]:
                seq.slot.cached.pop()
            for seq, done in chunked:
                del seq.slot.cached[len(seq.slot.cached) - (seq.prompt_done - done) :]
                seq.prompt_done = done
            self._prompts_deferred = True
            _log.warning("decode_backpressure", model=self._name, tokens=n)
            return
        self._prompts_deferred = False
        if rc != 0:
            _log.error("decode_failed", model=self._name, code=rc, tokens=n)
            for seq in list(self._running.values()):
                self._finish(seq, FinishReason.ERROR, f"llama_decode failed with code {rc}")
                self._deliver(seq)
            return

        now = time.perf_counter()
        for seq in sampling:
            logits = llama_cpp.llama_get_logits_ith(self._model.ctx, seq.batch_index)
            self._accept(seq, seq.sampler.sample(logits), now)
        for seq in sampling:
            self._deliver(seq)

    def _accept(self, seq: _Sequence, token: int, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
        if self._model.is_end_of_generation(token):
            self._finish(seq, FinishReason.STOP)
            return
        seq.generated += 1
        seq.unreported += 1
        self._tokens_generated += 1
        text = seq.text.feed(self._model.token_bytes(token))
        if text:
            seq.events.append(Delta(text, seq.unreported))
            seq.unreported = 0
        if seq.text.stopped:
            self._finish(seq, FinishReason.STOP)
        elif seq.generated >= seq.request.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
        else:
            seq.last_token = token

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str = "") -> None:
        """Ends a sequence: final text and Finish into its events, its slot free for the next
        request. The slot keeps its KV cells for prefix reuse unless they may be bad."""
        now = time.perf_counter()
        rest = seq.text.flush() if reason is not FinishReason.ERROR else ""
        if rest:
            seq.events.append(Delta(rest, seq.unreported))
        request = seq.request
        first = seq.first_token_at
        timings = Timings(
            queue_ms=(seq.admitted - request.arrived) * 1e3,
            prefill_ms=((first or now) - seq.admitted) * 1e3,
            decode_ms=(now - first) * 1e3 if first else 0.0,
            time_to_first_token_ms=(first - request.arrived) * 1e3 if first else 0.0,
            total_ms=(now - request.arrived) * 1e3,
        )
        seq.events.append(
            self._finish_event(request, reason, seq.generated, seq.reused, timings, error)
        )
        seq.sampler.close()
        slot = seq.slot
        if reason is FinishReason.ERROR:
            llama_cpp.llama_memory_seq_rm(self._model.memory, slot.seq_id, -1, -1)
            slot.cached = []
        slot.last_used = now
        self._idle.append(slot)
        del self._running[request]
        self._summarize_prefixes()

    def _deliver(self, seq: _Sequence) -> None:
        if seq.events:
            events, seq.events = seq.events, []
            _emit(seq.request, events)

    def _finish_everything(self, reason: FinishReason, error: str) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, reason, error)
            self._deliver(seq)
        while self._waiting:
            self._finish_waiting(self._waiting.popleft(), reason, error)

    def _finish_event(
        self,
        request: EngineRequest,
        reason: FinishReason,
        generated: int,
        reused: int,
        timings: Timings,
        error: str = "",
    ) -> Finish:
        return Finish(reason, len(request.prompt), generated, timings, error, self._name, reused)


def _recency(slot: _Slot) -> float:
    return slot.last_used


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _emit(request: EngineRequest, events: list[Event]) -> None:
    try:
        request.on_events(events)
    except Exception:  # a receiver that went away must not stop the engine
        _log.warning("event_delivery_failed", request_id=request.id, exc_info=True)
