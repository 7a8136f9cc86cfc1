"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only the engine thread decodes; tokenizing and chat templating read the immutable vocabulary
and may run on any thread.
"""

import ctypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
import structlog

from airouter.infill import FimTokens, Infill, infill_tokens
from airouter.labels import format_bytes
from modelhost.engines.llamacpp.weights import (
    capturing_load,
    init_backend,
    load_weights,
    log_warnings,
    take_prefetched,
)

_log = structlog.get_logger()

# ggml types of the KV cache settings.
KV_CACHE_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
# llama.cpp reports each buffer it allocates while loading, e.g.
# "load_tensors:   CPU_Mapped model buffer size =   241.41 MiB" or
# "llama_kv_cache:      CUDA0 KV buffer size =   576.00 MiB"; a model's measured footprint is
# their sum. "load_tensors: offloaded 19/19 layers to GPU" says how much of it a GPU holds.
_BUFFER_LINE = re.compile(r"(\S+)\s+(?:\w+ )?buffer size\s*=\s*([\d.]+) MiB")
_OFFLOADED_LINE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def build_features() -> dict[str, list[str]]:
    """What this llama.cpp was built with, per backend: {"CPU": ["AVX2", "FMA", ...], ...}
    from llama_print_system_info ("CPU : SSE3 = 1 | AVX2 = 1 | ... |")."""
    init_backend()
    features: dict[str, list[str]] = {}
    backend = "?"
    for part in llama_cpp.llama_print_system_info().decode("utf-8", "replace").split("|"):
        name, _, value = part.strip().partition(" = ")
        if " : " in name:
            backend, _, name = name.partition(" : ")
        if value.strip() == "1":
            features.setdefault(backend.strip(), []).append(name.strip())
    return features


@dataclass(frozen=True)
class ContextSettings:
    """How a model's llama.cpp context is shaped."""

    slots: int  # sequences decoded together
    context_per_slot: int  # tokens of KV cache each sequence may use
    batch_tokens: int  # most tokens in one llama_decode
    threads: int
    flash_attention: bool | None = None  # None lets llama.cpp decide
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    full_swa_cache: bool = False  # sliding-window layers keep every cell (see ModelConfig)
    # An embedding context: pooled vectors out instead of logits, and a batch's worth of
    # cells (each step's sequences are encoded whole, then forgotten).
    embeddings: bool = False
    pooling: int = -1  # llama.cpp's llama_pooling_type; -1: what the GGUF declares


class _EndOfGeneration:
    """A model's end-of-generation tokens as a set (modelhost.engines.llamacpp.sampler's
    TokenSet): membership asks about one token, iterating finds them all (once)."""

    def __init__(self, model: "LlamaModel") -> None:
        self._model = model

    def __contains__(self, token: object, /) -> bool:
        return isinstance(token, int) and self._model.is_end_of_generation(token)

    def __iter__(self) -> Iterator[int]:
        return iter(self._model.end_of_generation_tokens())


class LlamaModel:
    """A loaded GGUF model and one decoding context sized for `settings.slots` sequences."""

    def __init__(
        self,
        path: Path,
        *,
        gpu_layers: int,
        settings: ContextSettings,
        chat_template: str | None = None,
    ) -> None:
        init_backend()
        prefetched = take_prefetched(path, gpu_layers)
        # Whether the weights loaded ahead, while the host started (modelhost.early_load).
        self.loaded_ahead = prefetched is not None
        weights = prefetched or load_weights(path, gpu_layers)
        if not weights.model:
            log_warnings(weights.lines)
            raise RuntimeError(f"llama.cpp could not load {path}; is it a GGUF file?")
        lines = list(weights.lines)
        try:
            with capturing_load() as context_lines:
                self._load(weights.model, path, settings, chat_template)
        finally:
            lines += context_lines
            log_warnings(lines)
        # Bytes llama.cpp allocated, by buffer type: "CPU", "CPU_Mapped", "CUDA0", ...
        self.buffers: dict[str, int] = {}
        # Layers on the GPU and layers in all, as "19/19"; None on a build without GPU offload.
        self.offloaded_layers: str | None = None
        for _, line in lines:
            if match := _BUFFER_LINE.search(line):
                name, mib = match.group(1), float(match.group(2))
                self.buffers[name] = self.buffers.get(name, 0) + int(mib * (1 << 20))
            elif match := _OFFLOADED_LINE.search(line):
                self.offloaded_layers = f"{match.group(1)}/{match.group(2)}"

    def _load(
        self, model: Any, path: Path, settings: ContextSettings, chat_template: str | None
    ) -> None:
        """The context over loaded weights (which it frees if it cannot be made)."""
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.context_train = llama_cpp.llama_model_n_ctx_train(model)
        # Attention window of the sliding-window layers (Gemma 3: 512); 0 when there are none.
        self.sliding_window = llama_cpp.llama_model_n_swa(model)
        # Recurrent (Mamba, RWKV) and hybrid (Jamba, Granite-4-H, LFM2, ...) models keep a
        # state per sequence that cannot be rolled back to an earlier position.
        self.recurrent = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        self._end_of_generation: list[int] | None = None
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._is_eog = bytearray(self.n_vocab)
        self.end_of_generation = _EndOfGeneration(self)

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = settings.slots * settings.context_per_slot
        ctx_params.n_batch = settings.batch_tokens
        ctx_params.n_ubatch = settings.batch_tokens
        ctx_params.n_seq_max = settings.slots
        ctx_params.n_threads = settings.threads
        ctx_params.n_threads_batch = settings.threads
        # One KV buffer shared by all slots: measured faster for batched decode on CPU. Each
        # request is still held to context_per_slot tokens, so the slots together never
        # outgrow it.
        ctx_params.kv_unified = True
        ctx_params.no_perf = True
        if settings.embeddings:
            # Cells for one step's sequences; no more positions than the model learned (a
            # non-causal model keeps no cells and still encodes batch_tokens at once).
            ctx_params.n_ctx = min(settings.batch_tokens, self.context_train)
            ctx_params.embeddings = True
            ctx_params.pooling_type = settings.pooling
        if settings.flash_attention is not None:
            ctx_params.flash_attn_type = 1 if settings.flash_attention else 0
        ctx_params.swa_full = settings.full_swa_cache
        ctx_params.type_k = KV_CACHE_TYPES[settings.cache_type_k]
        ctx_params.type_v = KV_CACHE_TYPES[settings.cache_type_v]
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError(
                f"llama.cpp could not create a context of {ctx_params.n_ctx} tokens for {path}; "
                "lower context_length or slots"
            )
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.context_per_slot = settings.context_per_slot
        # What llama.cpp allows in one batch (a causal model's is capped to its context).
        self.batch_tokens = min(settings.batch_tokens, llama_cpp.llama_n_batch(ctx))
        # A configured template (a llama.cpp built-in name or a template) wins over the GGUF's.
        template = chat_template.encode() if chat_template else None
        self.chat_template: bytes | None = template or llama_cpp.llama_model_chat_template(
            model, None
        )
        self._piece_buffer = ctypes.create_string_buffer(256)

    @property
    def embedding_size(self) -> int:
        return int(llama_cpp.llama_model_n_embd(self._model))

    def footprint_bytes(self, device: str) -> int:
        """Bytes of llama.cpp's buffers on `device`: on cuda the GPU's buffers only, on cpu
        and metal (unified memory) all of them."""
        if device != "cuda":
            return sum(self.buffers.values())
        return sum(n for name, n in self.buffers.items() if re.fullmatch(r"CUDA\d+", name))

    def describe(self) -> dict[str, object]:
        buffers = {name: format_bytes(n) for name, n in self.buffers.items()}
        return {
            "offloaded_layers": self.offloaded_layers,
            "buffers": buffers,
            "weights_loaded_ahead": self.loaded_ahead,
        }

    def warm_up(self) -> None:
        """Decodes one token and forgets it, as llama.cpp's own server does, so the first
        request does not pay for faulting in weights and buffers. Call it from the thread
        that will decode: ggml sets up its CPU threadpool on the first decode, and decoding
        from another thread afterwards measured about 10% slower here."""
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        try:
            batch.token[0] = max(llama_cpp.llama_vocab_bos(self.vocab), 0)
            batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 0, 1, 0, True
            batch.n_tokens = 1
            llama_cpp.llama_decode(self.ctx, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Frees the context and the weights; the object is unusable afterwards."""
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def fim_tokens(self) -> FimTokens | None:
        """The vocabulary's fill-in-the-middle tokens (read from the GGUF, or recognised by
        their text by llama.cpp); None when it lacks any of prefix, suffix and middle."""
        pre, suf, mid, sep = (
            llama_cpp.llama_vocab_fim_pre(self.vocab),
            llama_cpp.llama_vocab_fim_suf(self.vocab),
            llama_cpp.llama_vocab_fim_mid(self.vocab),
            llama_cpp.llama_vocab_fim_sep(self.vocab),
        )
        if min(pre, suf, mid) < 0:
            return None
        return FimTokens(pre, suf, mid, sep if sep >= 0 else None)

    def infill(self, infill: Infill, room: int) -> list[int] | None:
        """A fill-in-the-middle prompt in at most `room` tokens; None without FIM tokens."""
        fim = self.fim_tokens()
        if fim is None:
            return None
        bos = None
        if llama_cpp.llama_vocab_get_add_bos(self.vocab):
            bos = llama_cpp.llama_vocab_bos(self.vocab)
        return infill_tokens(infill, fim, partial(self.tokenize, special=False), room, bos)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of text with the model's BOS, special tokens written in it honoured; with
        `special` False, text as text: no BOS, and "<fim_middle>" in it is not that token."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, special, special
        )
        if n < 0:  # more tokens than bytes is impossible for BPE/SPM, but the API allows it
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, special, special
            )
        return list(tokens[:n])

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> str | None:
        """The prompt for a conversation, ending with the assistant's turn; None when the model
        has no chat template or llama.cpp does not recognise it."""
        if self.chat_template is None:
            return None
        encoded = [(role.encode(), content.encode()) for role, content in messages]
        chat = (llama_cpp.llama_chat_message * len(encoded))(
            *(llama_cpp.llama_chat_message(role=r, content=c) for r, c in encoded)
        )
        size = sum(len(r) + len(c) for r, c in encoded) * 2 + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(
                self.chat_template, chat, len(encoded), True, buf, size
            )
            if n < 0:
                return None
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        return None

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; control tokens render as nothing. Kept once asked:
        a call into llama.cpp a token was a tenth of the engine's work per sequence."""
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buffer
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        known = self._is_eog[token]  # 0: not asked yet, 1: no, 2: yes
        if not known:
            ends = llama_cpp.llama_vocab_is_eog(self.vocab, token)
            known = self._is_eog[token] = 2 if ends else 1
        return known == 2

    def scan_vocabulary(self) -> int:
        """Finds the end-of-generation tokens and returns the longest token's bytes: a walk
        over the whole vocabulary (~0.3 s for Gemma's 262k tokens), done once after a load."""
        self.end_of_generation_tokens()
        buf = ctypes.create_string_buffer(256)  # its own: the engine thread uses the model's
        longest = 1
        for token in range(self.n_vocab):
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            longest = max(longest, n if n >= 0 else -n)
        return longest

    def guidance_tokenizer(self) -> Any:
        """The vocabulary as llguidance's tokenizer, for constrained decoding; every
        end-of-generation token ends a constrained output. A walk over the vocabulary (about
        a second for 262k tokens), done once per load, on first use. As
        llguidance.llamacpp.lltokenizer_from_vocab, less its deprecated per-token call (a
        warning each, which made it ten times slower)."""
        import llguidance

        pieces: list[bytes] = []
        buf = ctypes.create_string_buffer(256)
        lib = llama_cpp.llama_cpp._lib  # the C functions: no wrapper per call
        to_piece, attribute = lib.llama_token_to_piece, lib.llama_vocab_get_attr
        control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        for token in range(self.n_vocab):
            n = to_piece(self.vocab, token, buf, len(buf), 0, True)
            piece = buf.raw[:n] if n >= 0 else self._long_piece(token, -n)
            attr = attribute(self.vocab, token)
            # Control tokens, and user-defined ones that look like them, are special: 0xFF
            # marks them so, as llguidance expects.
            if attr & control or (attr & user and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
            pieces.append(piece)
        tokenize = ctypes.cast(lib.llama_tokenize, ctypes.c_void_p).value
        return llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
            tokens=pieces,
            vocab_ptr=self.vocab,
            tokenize_fptr=tokenize,
            eos_token=self.end_of_generation_tokens() or llama_cpp.llama_vocab_eos(self.vocab),
            slices=None,
        )

    def _long_piece(self, token: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_cpp._lib.llama_token_to_piece(self.vocab, token, buf, size, 0, True)
        return buf.raw[:n]

    def end_of_generation_tokens(self) -> list[int]:
        """Every token that ends generation (EOS, end-of-turn, ...); found on first use."""
        if self._end_of_generation is None:
            is_eog = llama_cpp.llama_vocab_is_eog
            self._end_of_generation = [t for t in range(self.n_vocab) if is_eog(self.vocab, t)]
        return self._end_of_generation
