"""Continuous batching over one llama.cpp context, on a thread that owns it.

Each step is one llama_decode holding the next token of every generating sequence plus
prompt chunks of newly admitted ones. Each slot is one llama.cpp sequence. A slot keeps the
KV cells of its last request after it finishes, so a later prompt that starts the same way
(a shared system prompt, the next turn of a chat) is evaluated only from where it differs; the
cells are shared with `llama_memory_seq_cp`, which costs nothing in the unified KV cache.
"""

import ctypes
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import llama_cpp
import numpy as np
import structlog

from airouter.infill import Infill
from modelhost.constraints import ConstraintCompiler, compute_masks
from modelhost.engines.llamacpp.model import LlamaModel
from modelhost.engines.llamacpp.sampler import (
    GRAPH_TOP_K,
    NoTokenAllowed,
    TokenSampler,
    sample_rows,
)
from modelhost.engines.scheduler import (
    Blocks,
    Sequence,
    StepLoopEngine,
    common_prefix,
    summarize_prefixes,
)
from modelhost.generation import EngineRequest, FinishReason
from modelhost.text_stream import TextStream

_log = structlog.get_logger()

# A waiting prompt that shares this many tokens with a prompt being computed waits for it.
SHARED_PREFILL_MIN = 128
# A prompt that shares this fraction of an idle slot's tokens is decoded in that slot.
CONTINUES = 0.5
_NO_CANDIDATES = (
    "llama.cpp returned no candidates from its graph; sample_in_graph is off for this model "
    "until it loads again: retry the request"
)


@dataclass
class _Slot:
    """One llama.cpp sequence and the tokens whose KV cells it holds, from position 0."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    last_used: float = 0.0  # when a request last finished in it or copied its cells
    # The prefix blocks of the request that filled it: (hash, tokens up to the block's end).
    blocks: Blocks = ()
    # The top-k chain llama.cpp runs in its graph for this sequence (sample_in_graph) while
    # its requests can take their tokens from its candidates; None: its rows come back.
    chain: ctypes.c_void_p | None = None


@dataclass(eq=False)
class _Sequence(Sequence):
    slot: _Slot = field(default_factory=lambda: _Slot(-1))
    sampler: TokenSampler | None = None
    prompt_done: int = 0  # prompt tokens already in the KV cache

    @property
    def prefilled(self) -> bool:
        return self.prompt_done == len(self.request.prompt)


class LlamaEngine(StepLoopEngine[_Sequence]):
    """Decodes up to `slots` requests together in one llama.cpp context."""

    kind = "llama.cpp"

    def __init__(
        self,
        model: LlamaModel,
        *,
        name: str,
        slots: int,
        max_queue: int,
        sample_in_graph: bool = False,
    ) -> None:
        super().__init__(name=name, slots=slots, max_queue=max_queue)
        self._model = model
        # Plain requests' tokens from the GRAPH_TOP_K candidates llama.cpp finds inside the
        # decode (on the GPU, their rows of logits never cross to the host); see _sample_where.
        self._sample_in_graph = sample_in_graph
        self._all_slots = [_Slot(seq_id) for seq_id in range(slots)]
        self._idle = list(self._all_slots)
        self._batch = llama_cpp.llama_batch_init(model.batch_tokens, 0, 1)
        self._logits_address: int | None = None
        self._logits = np.empty((0, model.n_vocab), np.float32)
        # A step found no KV room for its prompt chunks: the next one decodes only generating
        # sequences (llama_decode returned 1, which is back-pressure, not a failure).
        self._prompts_deferred = False
        self._constraints = ConstraintCompiler(model.guidance_tokenizer, model.n_vocab)
        # Computes constrained sequences' next masks while llama_decode runs (_step).
        self._masks = ThreadPoolExecutor(1, thread_name_prefix=f"masks-{name}")
        self._start()

    @property
    def context_per_request(self) -> int:
        return self._model.context_per_slot

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def infill(self, infill: Infill, room: int) -> list[int] | None:
        return self._model.infill(infill, room)

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> str | None:
        return self._model.apply_chat_template(messages)

    def chat_template_source(self) -> str | None:
        template = self._model.chat_template
        # A llama.cpp built-in name ("chatml", "gemma") is not a Jinja template.
        return template.decode("utf-8", "replace") if template and b"{" in template else None

    def constraints(self) -> ConstraintCompiler:
        return self._constraints

    def footprint_bytes(self, device: str) -> int:
        return self._model.footprint_bytes(device)

    def describe(self) -> dict[str, object]:
        return self._model.describe()

    def scan_vocabulary(self) -> None:
        self.longest_token_bytes = self._model.scan_vocabulary()

    # --- engine thread ---------------------------------------------------------------

    def _prepare(self) -> None:
        self._model.warm_up()  # on this thread: see LlamaModel.warm_up

    def _free(self) -> None:
        self._masks.shutdown()
        llama_cpp.llama_batch_free(self._batch)
        self._model.close()
        for slot in self._all_slots:  # the context used them until it was freed
            if slot.chain is not None:
                llama_cpp.llama_sampler_free(slot.chain)
                slot.chain = None

    def _is_end_of_generation(self, token: int) -> bool:
        return self._model.is_end_of_generation(token)

    def _token_bytes(self, token: int) -> bytes:
        return self._model.token_bytes(token)

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
                    self._model.end_of_generation if request.ignore_eos else (),
                    constraint=request.constraint,
                    top_logprobs=request.top_logprobs,
                )
            except Exception as exc:
                self._cannot_sample(request, exc)
                continue
            self._dequeued()
            slot, reused = self._place(request.prompt)
            slot.blocks = request.blocks
            self._sample_where(slot, sampler)
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

    def _sample_where(self, slot: _Slot, sampler: TokenSampler) -> None:
        """Attaches a top-k chain to the slot's sequence when its request can take its token
        from the graph's candidates (TokenSampler.fits_graph), and takes it off when it
        cannot. llama.cpp reserves its graph again before the next decode after either, so a
        slot keeps its chain between requests that fit."""
        want = self._sample_in_graph and sampler.fits_graph
        if want == (slot.chain is not None):
            return
        ctx = self._model.ctx
        if slot.chain is not None:
            llama_cpp.llama_set_sampler(ctx, slot.seq_id, None)
            llama_cpp.llama_sampler_free(slot.chain)
            slot.chain = None
            return
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(GRAPH_TOP_K))
        if llama_cpp.llama_set_sampler(ctx, slot.seq_id, chain):
            slot.chain = chain
            return
        llama_cpp.llama_sampler_free(chain)
        self._sample_in_graph = False
        _log.warning(
            "sampling_in_graph_unsupported",
            model=self._name,
            detail="llama.cpp cannot run a top-k chain in this model's graph here; every "
            "request samples from its row of logits",
        )

    def _shares_a_prefill(self, request: EngineRequest) -> bool:
        """Whether a running sequence is still computing a long prefix of this prompt: then
        the request waits for those cells instead of computing them beside it (a burst that
        shares a document, the choices of one request; SGLang's scheduler does the same within
        a batch). Only where a slot's cells can be lent midway: not on recurrent or
        sliding-window models, except to a request's other choices, which share the whole
        prompt and copy it once computed."""
        siblings = request.siblings
        if siblings is not None and not self._model.recurrent:
            if any(
                s.request.siblings is siblings and not s.prefilled for s in self._running.values()
            ):
                return True
        if self._model.recurrent or self._model.sliding_window > 0:
            return False
        for seq in self._running.values():
            if seq.prefilled:
                continue
            shared = min(common_prefix(seq.request.prompt, request.prompt), len(request.prompt) - 1)
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
            n = min(common_prefix(other.cached, prompt), len(prompt) - 1)
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
        """What the host reports holding: prefix blocks whose cells a slot still holds and
        could lend."""
        self._cached_prefixes = summarize_prefixes(
            (slot.blocks, partial(self._slot_holds, slot)) for slot in self._all_slots
        )

    def _slot_holds(self, slot: _Slot, n: int) -> bool:
        return n <= len(slot.cached) and self._holds_prefix(slot, n)

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
        started = time.perf_counter()
        n, sampling, outputs, generating, chunked = self._fill_batch()
        built = time.perf_counter()
        # A constrained sequence's next mask is needed only when its sampled token is
        # rejected, but then at once: computed ahead, beside llama_decode (both release the
        # GIL), it costs the step nothing on a GPU and little on a CPU.
        constrained = [s.request.constraint for s in sampling if s.request.constraint is not None]
        masks = self._masks.submit(compute_masks, constrained) if constrained else None
        rc = llama_cpp.llama_decode(self._model.ctx, self._batch)
        if masks is not None:
            masks.result()
        decoded = time.perf_counter()
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

        self._decode_steps += bool(sampling)
        samplers: list[TokenSampler] = [seq.sampler for seq in sampling]  # type: ignore[misc]
        in_graph = [i for i, seq in enumerate(sampling) if seq.slot.chain is not None]
        if not in_graph:
            rows = self._logit_rows(sampling)
            fetched = time.perf_counter()
            tokens = sample_rows(samplers, rows)
        else:
            found = [self._graph_candidates(outputs[i]) for i in in_graph]
            fetched = time.perf_counter()
            tokens = self._sample_mixed(samplers, in_graph, found, sampling)
        sampled = time.perf_counter()
        for seq, token in zip(sampling, tokens, strict=True):
            if isinstance(token, NoTokenAllowed):
                self._finish(seq, FinishReason.ERROR, str(token))
            else:
                assert seq.sampler is not None
                self._accept(seq, token, decoded, seq.sampler.logprobs)
        accepted = time.perf_counter()
        for seq in sampling:
            self._deliver(seq)
        if self.profile is not None and generating == n:  # steps that only generate
            delivered = time.perf_counter()
            self.profile.record(
                build=built - started,
                decode=decoded - built,
                fetch=fetched - decoded,
                sample=sampled - fetched,
                detokenize=accepted - sampled,
                deliver=delivered - accepted,
            )

    def _sample_mixed(
        self,
        samplers: list[TokenSampler],
        in_graph: list[int],
        found: list[tuple[np.ndarray, np.ndarray] | None],
        sampling: list[_Sequence],
    ) -> list[int | NoTokenAllowed]:
        """The step's tokens when some sequences sampled in the graph (`in_graph`, with the
        candidates `found` for each): those pick among their candidates, the others from
        their rows, which llama.cpp then copied for every output."""
        tokens: list[int | NoTokenAllowed | None] = [None] * len(samplers)
        for i, candidates in zip(in_graph, found, strict=True):
            if candidates is None:  # no row came back for it either: this request cannot go on
                tokens[i] = NoTokenAllowed(_NO_CANDIDATES)
                self._sample_in_graph = False  # later requests sample from their rows
            else:
                try:
                    tokens[i] = samplers[i].pick_among(*candidates)
                except NoTokenAllowed as exc:
                    tokens[i] = exc
        graph = set(in_graph)
        rest = [i for i in range(len(samplers)) if i not in graph]
        if rest:
            rows = self._logit_rows(sampling)[rest]  # a copy: sample_rows may write in rows
            for i, token in zip(rest, sample_rows([samplers[i] for i in rest], rows), strict=True):
                tokens[i] = token
        return tokens  # type: ignore[return-value]

    def _graph_candidates(self, output: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The ids llama.cpp's chain kept in the graph for the batch's token `output`, and
        their logits; None if it kept none."""
        ctx = self._model.ctx
        count = llama_cpp.llama_get_sampled_candidates_count_ith(ctx, output)
        ids = llama_cpp.llama_get_sampled_candidates_ith(ctx, output)
        logits = llama_cpp.llama_get_sampled_logits_ith(ctx, output)
        if not count or not ids or not logits:
            _log.error("sampling_in_graph_failed", model=self._name, detail=_NO_CANDIDATES)
            return None
        return _array(ids, count, np.int32), _array(logits, count, np.float32)

    def _fill_batch(
        self,
    ) -> tuple[int, list[_Sequence], list[int], int, list[tuple[_Sequence, int]]]:
        """Fills the batch: every generating sequence's last token, then prompt chunks in the
        room left. Returns its token count, the sequences to sample in the order of their
        logit rows and the batch index of each one's output token, how many of them are
        generating, and the prompt chunks added with where each began."""
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
        outputs: list[int] = []
        # Generating sequences first: each costs one token and keeps its stream flowing.
        for seq in self._running.values():
            if seq.prefilled:
                add(seq.last_token, seq.slot, True)
                sampling.append(seq)
                outputs.append(n - 1)
        # Then prompt chunks in the room left, the least left to compute first: a short prompt
        # (a chat's next turn) is not held behind a long document's chunks for its whole
        # prefill, and the document takes what room the short ones leave.
        generating = n
        chunked: list[tuple[_Sequence, int]] = []
        prefilling = [seq for seq in self._running.values() if not seq.prefilled]
        prefilling.sort(key=lambda seq: len(seq.request.prompt) - seq.prompt_done)
        for seq in prefilling:
            room = self._model.batch_tokens - n
            if room <= 0 or self._prompts_deferred:
                break
            prompt = seq.request.prompt
            end = min(len(prompt), seq.prompt_done + room)
            chunked.append((seq, seq.prompt_done))
            for i in range(seq.prompt_done, end):
                add(prompt[i], seq.slot, i == len(prompt) - 1)
            seq.prompt_done = end
            if seq.prefilled:
                sampling.append(seq)
                outputs.append(n - 1)
        batch.n_tokens = n
        return n, sampling, outputs, generating, chunked

    def _logit_rows(self, sampling: list[_Sequence]) -> np.ndarray:
        """The step's logits, one row a sampled sequence in `sampling`'s order: llama.cpp
        keeps the rows of the batch's logits-flagged tokens contiguous, in batch order. The
        numpy view is kept for as long as llama.cpp keeps the buffer where it was."""
        if not sampling:
            return self._logits[:0]
        first = llama_cpp.llama_get_logits(self._model.ctx)
        address = ctypes.cast(first, ctypes.c_void_p).value
        if address != self._logits_address:
            self._logits_address = address
            size = self._model.n_vocab * len(self._all_slots)
            self._logits = _array(first, size, np.float32).reshape(-1, self._model.n_vocab)
        return self._logits[: len(sampling)]

    def _release(self, seq: _Sequence, reason: FinishReason) -> None:
        """The slot keeps its KV cells for prefix reuse unless they may be bad."""
        assert seq.sampler is not None
        seq.sampler.close()
        slot = seq.slot
        if reason is FinishReason.ERROR:
            llama_cpp.llama_memory_seq_rm(self._model.memory, slot.seq_id, -1, -1)
            slot.cached = []
        slot.last_used = time.perf_counter()
        self._idle.append(slot)
        self._summarize_prefixes()


def _recency(slot: _Slot) -> float:
    return slot.last_used


def _array(pointer: Any, count: int, dtype: type[np.generic]) -> np.ndarray:
    """A numpy view of `count` items at a ctypes pointer (np.ctypeslib.as_array makes a
    ctypes array type each call: 80 us for a step's logits)."""
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    size = count * np.dtype(dtype).itemsize
    return np.frombuffer(_bytes(size).from_address(address), dtype, count)


@functools.cache
def _bytes(size: int) -> Any:
    return ctypes.c_char * size
