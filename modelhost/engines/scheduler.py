"""The step-loop scheduler: an Engine that decodes up to `slots` requests together, one step
at a time, on a thread of its own. The queue bound, deadlines in the queue, cancellation, stop
strings, timings and the Finish event live here; an engine built on it supplies how requests
take a slot, one decode step, and what a token's bytes are. An engine with a scheduler of its
own implements modelhost.engines.interface.Engine directly.
"""

import asyncio
import queue
import threading
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import structlog

from airouter.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from airouter.output import TokenLogprob
from modelhost.engines.interface import Engine, EngineLoad
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    FinishReason,
    Rejected,
    StepLogprobs,
    Timings,
)
from modelhost.text_stream import TextStream

_log = structlog.get_logger()

# Prefix blocks each slot reports holding at most: its first REPORTED_FIRST and its last.
REPORTED_BLOCKS = 16
REPORTED_FIRST = 4
# A prefix block: (hash, tokens up to the block's end), as EngineRequest.blocks holds them.
Blocks = tuple[tuple[int, int], ...]


@dataclass(eq=False)
class Sequence:
    """A request that has a slot: what every engine tracks while it generates."""

    request: EngineRequest
    text: TextStream
    admitted: float
    reused: int  # prompt tokens whose KV cells came from an earlier request
    last_token: int = -1
    generated: int = 0
    unreported: int = 0  # generated tokens not yet covered by a Delta
    first_token_at: float | None = None
    events: list[Event] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens not yet in a Delta


S = TypeVar("S", bound=Sequence)

# The parts of a decode step a StepProfile times (bench.engine_overhead).
STEP_PHASES = ("build", "decode", "fetch", "sample", "detokenize", "deliver")


@dataclass
class StepProfile:
    """Seconds an engine's decode steps spent in each phase, summed, and how many steps they
    were. Attached to an engine's `profile` by a benchmark; the engine times its steps
    regardless (a few perf_counter calls) and adds them only then."""

    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))

    def record(self, **seconds: float) -> None:
        self.steps += 1
        for phase, spent in seconds.items():
            self.seconds[phase] += spent


class StepLoopEngine(Engine, Generic[S]):
    """Decodes up to `slots` requests together on a dedicated thread, a step at a time."""

    # Whether `_accept` moves a sequence's constraint on by each token; an engine whose
    # logits processors do it themselves (MLX: they see each token a step later) says False.
    advances_constraints = True

    def __init__(self, *, name: str, slots: int, max_queue: int) -> None:
        self._name = name
        self._slots = slots
        self._max_queue = max_queue
        self._inbox: queue.SimpleQueue[tuple[str, EngineRequest | None]] = queue.SimpleQueue()
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[EngineRequest, S] = {}
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet in a slot; guarded by _lock
        self._tokens_generated = 0
        self._prompt_tokens_reused = 0
        self._decode_steps = 0
        self._cached_prefixes: dict[int, int] = {}  # replaced whole on the engine thread
        self._closing = False
        self.failure: str | None = None  # why the engine thread stopped, if it failed
        self.profile: StepProfile | None = None
        # Events for requests received on an event loop, handed over once a step (_hand_off).
        self._outgoing: dict[asyncio.AbstractEventLoop, list[tuple[EngineRequest, list[Event]]]]
        self._outgoing = {}
        # Bytes of the longest token; None until known (see scan_vocabulary).
        self.longest_token_bytes: int | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    def _start(self) -> None:
        """Starts the engine thread and waits for `_prepare` on it; raises what it raised."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    # --- the host's side -------------------------------------------------------------

    def load(self) -> EngineLoad:
        with self._lock:
            queued = self._queued
        return EngineLoad(
            self._slots,
            len(self._running),
            queued,
            self._tokens_generated,
            self._prompt_tokens_reused,
            self._decode_steps,
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

    # --- what each engine does on its thread -----------------------------------------

    @abstractmethod
    def _prepare(self) -> None:
        """Runs first on the engine thread (loading, warming up); raising fails the start."""

    @abstractmethod
    def _admit(self) -> None:
        """Moves waiting requests into free slots (`_waiting` -> `_running`)."""

    @abstractmethod
    def _step(self) -> None:
        """One decode step over the running sequences; calls `_accept` with each new token
        and `_deliver` for each sequence that has events."""

    @abstractmethod
    def _release(self, seq: S, reason: FinishReason) -> None:
        """Frees the finished sequence's slot, keeping its cells for reuse where they are
        good."""

    @abstractmethod
    def _free(self) -> None:
        """Frees the model: the engine thread's last work after a successful `_prepare`."""

    def _leave_thread(self) -> None:
        """The very last work on the engine thread, whether `_prepare` succeeded or not."""

    @abstractmethod
    def _is_end_of_generation(self, token: int) -> bool: ...

    @abstractmethod
    def _token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens render as nothing."""

    # --- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._prepare()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            self._leave_thread()
            return
        self._started.set()
        try:
            self._serve()
        finally:
            self._free()
            self._leave_thread()

    def _serve(self) -> None:
        try:
            while not self._closing:
                self._take_inbox(block=not (self._running or self._waiting))
                if self._closing:
                    break
                self._drop_expired()
                self._admit()
                if self._running:
                    self._step()
                self._hand_off()
        except Exception as exc:
            _log.exception("engine_failed", model=self._name)
            with self._lock:
                self.failure = str(exc) or type(exc).__name__
            self._take_inbox(block=False)
            self._finish_everything(FinishReason.ERROR, f"engine failed: {exc}")
            self._hand_off()
            # The model stays until close(): requests already past submit may still tokenize.
            while not self._closing:
                self._take_inbox(block=True)
            return
        self._finish_everything(FinishReason.CANCELLED, "")
        self._hand_off()

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
            self._emit(request, [Rejected(error)])

    def _finish_waiting(
        self, request: EngineRequest, reason: FinishReason, error: str = ""
    ) -> None:
        """Ends a request that never got a slot; the caller has taken it off the queue."""
        self._dequeued()
        waited_ms = (time.perf_counter() - request.arrived) * 1e3
        timings = Timings(queue_ms=waited_ms, total_ms=waited_ms)
        self._emit(request, [self._finish_event(request, reason, 0, 0, timings, error)])

    def _cannot_sample(self, request: EngineRequest, exc: Exception) -> None:
        """Ends a request whose sampling settings the engine could not set up; the caller has
        taken it off the queue, and the other requests go on."""
        _log.exception("sampler_failed", model=self._name, request_id=request.id)
        self._finish_waiting(
            request, FinishReason.ERROR, f"cannot sample with these settings: {exc}"
        )

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _accept(self, seq: S, token: int, now: float, logprobs: StepLogprobs | None = None) -> None:
        """Takes one generated token: its constraint, text, log probability, stop strings,
        end of generation, max_tokens."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        if self._is_end_of_generation(token) and not seq.request.ignore_eos:
            self._finish(seq, FinishReason.STOP)
            return
        constraint = seq.request.constraint if self.advances_constraints else None
        if constraint is not None:
            constraint.advance(token)
        seq.generated += 1
        seq.unreported += 1
        self._tokens_generated += 1
        piece = self._token_bytes(token)
        if logprobs is not None:
            top = tuple(TokenLogprob(self._token_bytes(t), lp) for t, lp in logprobs.top)
            seq.logprobs.append(TokenLogprob(piece, logprobs.logprob, top))
        text = seq.text.feed(piece)
        if text:
            seq.events.append(Delta(text, seq.unreported, self._take_logprobs(seq)))
            seq.unreported = 0
        if seq.text.stopped or (constraint is not None and constraint.complete):
            self._finish(seq, FinishReason.STOP)
        elif seq.generated >= seq.request.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
        else:
            seq.last_token = token

    def _finish(self, seq: S, reason: FinishReason, error: str = "") -> None:
        """Ends a sequence: final text and Finish into its events, its slot free for the next
        request."""
        now = time.perf_counter()
        rest = seq.text.flush() if reason is not FinishReason.ERROR else ""
        if rest:
            seq.events.append(Delta(rest, seq.unreported, self._take_logprobs(seq)))
        request = seq.request
        first = seq.first_token_at
        timings = Timings(
            queue_ms=(seq.admitted - request.arrived) * 1e3,
            prefill_ms=((first or now) - seq.admitted) * 1e3,
            decode_ms=(now - first) * 1e3 if first else 0.0,
            time_to_first_token_ms=(first - request.arrived) * 1e3 if first else 0.0,
            total_ms=(now - request.arrived) * 1e3,
        )
        finish = self._finish_event(request, reason, seq.generated, seq.reused, timings, error)
        if seq.text.matched:
            finish = replace(finish, stop_sequence=seq.text.matched)
        seq.events.append(finish)
        del self._running[request]
        self._release(seq, reason)

    @staticmethod
    def _take_logprobs(seq: S) -> tuple[TokenLogprob, ...]:
        if not seq.logprobs:
            return ()
        taken, seq.logprobs = tuple(seq.logprobs), []
        return taken

    def _deliver(self, seq: S) -> None:
        if seq.events:
            events, seq.events = seq.events, []
            self._emit(seq.request, events)

    def _emit(self, request: EngineRequest, events: list[Event]) -> None:
        if request.loop is None:
            _emit(request, events)
        else:
            self._outgoing.setdefault(request.loop, []).append((request, events))

    def _hand_off(self) -> None:
        """Hands the step's events to their event loops: one wake-up of each loop a step,
        not one a request (at 64 sequences that was most of the delivery's cost)."""
        outgoing, self._outgoing = self._outgoing, {}
        for loop, batch in outgoing.items():
            try:
                loop.call_soon_threadsafe(_emit_all, batch)
            except RuntimeError:  # the loop closed: nobody is left to receive them
                _log.warning("event_loop_closed", model=self._name, requests=len(batch))

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
        return Finish(
            reason, len(request.prompt), generated, timings, error, self._name, reused, self.kind
        )


def summarize_prefixes(
    held_by_slots: Iterable[tuple[Blocks, Callable[[int], bool]]],
) -> dict[int, int]:
    """What a host reports holding: for each slot (its request's blocks, and whether it can
    stand in for the first n tokens), its first and last prefix blocks that it still holds
    (a bounded summary: a conversation's next turn extends its last, a new one shares its
    first)."""
    held: dict[int, int] = {}
    for blocks, holds in held_by_slots:
        if len(blocks) > REPORTED_BLOCKS:
            blocks = blocks[:REPORTED_FIRST] + blocks[REPORTED_FIRST - REPORTED_BLOCKS :]
        for block, tokens in blocks:
            if tokens > held.get(block, 0) and holds(tokens):
                held[block] = tokens
    return held


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _emit_all(batch: list[tuple[EngineRequest, list[Event]]]) -> None:
    for request, events in batch:
        _emit(request, events)


def _emit(request: EngineRequest, events: list[Event]) -> None:
    try:
        request.on_events(events)
    except Exception:  # a receiver that went away must not stop the engine
        _log.warning("event_delivery_failed", request_id=request.id, exc_info=True)
