"""Continuous batching with mlx-lm, on a thread that owns the model.

mlx-lm's BatchGenerator decodes every generating sequence in one step and prefills newly
inserted prompts beside them; requests are inserted and removed between steps. Everything
that touches MLX runs on the engine thread (MLX streams belong to the thread that made them).
A finished request's KV cache is kept, as a llama.cpp slot keeps its cells: a later prompt
that starts the same way is inserted with the cache cut back to the shared prefix, and only
the rest is computed. Caches kept and caches in use together never exceed `slots`.
"""

import json
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from airouter.errors import InvalidArgument
from airouter.labels import format_bytes
from modelhost.constraints import ConstraintCompiler, TokenConstraint
from modelhost.engines.mlxlm import BLAS
from modelhost.engines.scheduler import (
    Blocks,
    Sequence,
    StepLoopEngine,
    common_prefix,
    summarize_prefixes,
)
from modelhost.generation import EngineRequest, FinishReason, Sampling
from modelhost.logprobs import step_logprobs
from modelhost.text_stream import TextStream

# Repetition penalty looks back this many tokens, as llama.cpp's penalty_last_n default.
PENALTY_WINDOW = 64
# Memory beyond weights and KV: logits, activations and MLX's buffer cache.
OVERHEAD_BYTES = 64 << 20


class MlxModelError(ValueError):
    """A model directory mlx-lm cannot serve; the message says what is wrong with it."""


@dataclass
class _Kept:
    """A finished request's KV cache, kept for a later prompt that starts the same way."""

    tokens: list[int]  # the tokens whose keys and values the cache holds
    cache: list[Any]
    blocks: Blocks
    last_used: float


@dataclass(eq=False)
class _Sequence(Sequence):
    uid: int = -1


_limits_lock = threading.Lock()
_limits_set = False


def own_memory_limits(mx: Any, generator: Any, budget_bytes: int) -> None:
    """Metal's wired and cache limits belong to the host, set once per process from its budget.
    mlx-lm's BatchGenerator sets the wired limit when it starts and restores the previous one
    when it closes, so two models closing out of order could leave either value; each
    generator's restore is therefore cancelled, and the host's limits set (again) here."""
    global _limits_set
    generator._old_wired_limit = None  # mlx-lm restores this at close; the host owns it
    with _limits_lock:
        recommended = mx.device_info().get("max_recommended_working_set_size") or budget_bytes
        wired = min(budget_bytes, recommended) if budget_bytes else recommended
        mx.set_wired_limit(wired)
        if not _limits_set:
            # Freed buffers kept for reuse: at most a tenth of the budget, not all of memory.
            mx.set_cache_limit(max(wired // 10, 1 << 28))
            _limits_set = True


class MlxEngine(StepLoopEngine[_Sequence]):
    """Decodes up to `slots` requests together with mlx-lm's BatchGenerator."""

    kind = "mlx"
    # A constrained sequence's logits processor moves its constraint on (_ConstraintMask).
    advances_constraints = False

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        slots: int,
        max_queue: int,
        context_per_slot: int,
        batch_tokens: int,
        device: str,
        budget_bytes: int = 0,
    ) -> None:
        super().__init__(name=name, slots=slots, max_queue=max_queue)
        self._budget_bytes = budget_bytes
        self._path = path
        self._context = context_per_slot
        self._batch_tokens = batch_tokens
        self._device_name = device
        self.config = read_config(path)
        settings = _tokenizer_settings(path)
        self._tokenizer = _load_tokenizer(path)
        self._vocabulary = _token_table(self._tokenizer, settings)
        self.longest_token_bytes = max(len(b) for b in self._vocabulary.pieces)
        self._end_of_generation = _end_of_generation(path, self.config, self._tokenizer, settings)
        self._template_source = _template_source(path, settings)
        self._template = _compile_template(self._template_source)
        text_config = self.config.get("text_config", self.config)
        logits_width = int(text_config.get("vocab_size") or len(self._vocabulary.pieces))
        self._constraints = ConstraintCompiler(self._guidance_tokenizer, logits_width)
        self._kept: list[_Kept] = []
        self._by_uid: dict[int, _Sequence] = {}
        self.weights_bytes = 0
        self._start()

    @property
    def context_per_request(self) -> int:
        return self._context

    def tokenize(self, text: str) -> list[int]:
        bos = self._vocabulary.bos
        # A template that writes the BOS itself gets no second one.
        add_special = not (bos and text.startswith(bos))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special).ids)

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> str | None:
        from jinja2.exceptions import TemplateError

        if self._template is None:
            return None
        try:
            return str(
                self._template.render(
                    messages=[{"role": role, "content": content} for role, content in messages],
                    add_generation_prompt=True,
                    bos_token=self._vocabulary.bos,
                    eos_token=self._vocabulary.eos,
                )
            )
        except TemplateError as exc:
            raise InvalidArgument(
                f"the model's chat template refused these messages: {exc}"
            ) from None

    def chat_template_source(self) -> str | None:
        return self._template_source

    def constraints(self) -> ConstraintCompiler:
        return self._constraints

    def _guidance_tokenizer(self) -> Any:
        """The vocabulary as llguidance's tokenizer: each token's bytes, special ones marked
        with 0xFF as llguidance expects; the end-of-generation tokens end a constrained
        output."""
        import llguidance

        added = self._tokenizer.get_added_tokens_decoder()
        pieces = list(self._vocabulary.pieces)
        for token, info in added.items():
            if info.special and token < len(pieces):
                pieces[token] = b"\xff" + info.content.encode()
        special = [t for t, info in added.items() if info.special]
        eos = min(self._end_of_generation) if self._end_of_generation else 0
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_GuidanceTokens(self._tokenizer, pieces, eos, special)),
            n_vocab=self._constraints.n_vocab,
            eos_token=sorted(self._end_of_generation) or None,
        )

    def footprint_bytes(self, device: str) -> int:
        """The weights as MLX measured them once loaded, and the KV cache at full use."""
        return (
            self.weights_bytes + kv_bytes(self.config, self._slots, self._context) + OVERHEAD_BYTES
        )

    def describe(self) -> dict[str, object]:
        return {
            "mlx_device": self._device_name,
            "blas": BLAS if self._device_name == "cpu" else "",
            "weights": format_bytes(self.weights_bytes),
        }

    # --- engine thread ---------------------------------------------------------------

    def _prepare(self) -> None:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.utils import load_model

        device = mx.gpu if self._device_name != "cpu" and mx.is_available(mx.gpu) else mx.cpu
        self._device_name = "gpu" if device == mx.gpu else "cpu"
        mx.set_default_device(device)
        self._stream = mx.new_stream(device)
        before = mx.get_active_memory()
        try:
            with mx.stream(self._stream):
                self._model, _ = load_model(self._path, strict=True)
                mx.eval(self._model.parameters())
        except Exception as exc:
            raise MlxModelError(f"mlx-lm cannot load {self._path}: {exc}") from exc
        self.weights_bytes = mx.get_active_memory() - before
        self._generator = BatchGenerator(
            self._model,
            max_tokens=self._context,
            completion_batch_size=self._slots,
            prefill_batch_size=self._slots,
            prefill_step_size=self._batch_tokens,
            stream=self._stream,
        )
        if self._device_name == "gpu":
            own_memory_limits(mx, self._generator, self._budget_bytes)

    def _free(self) -> None:
        import mlx.core as mx

        self._kept.clear()
        self._generator.close()
        del self._generator, self._model
        mx.clear_cache()

    def _leave_thread(self) -> None:
        import mlx.core as mx

        mx.clear_streams()  # the thread's MLX work ends here (see mlxlm.on_own_thread)

    def _is_end_of_generation(self, token: int) -> bool:
        return token in self._end_of_generation

    def _token_bytes(self, token: int) -> bytes:
        pieces = self._vocabulary.pieces
        return pieces[token] if 0 <= token < len(pieces) else b""

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self._slots:
            request = self._waiting.popleft()
            try:
                sampler, processors = self._sampling(request)
            except Exception as exc:
                self._cannot_sample(request, exc)
                continue
            self._dequeued()
            cache, reused = self._take_cache(request.prompt)
            # One more than the request may generate: the engine, not mlx-lm, ends it.
            (uid,) = self._generator.insert(
                [request.prompt[reused:]],
                max_tokens=[request.max_tokens + 1],
                caches=[cache],
                all_tokens=[request.prompt[:reused]],
                samplers=[sampler],
                logits_processors=[processors],
            )
            seq = _Sequence(
                request=request,
                text=TextStream(request.stop),
                admitted=time.perf_counter(),
                reused=reused,
                uid=uid,
            )
            self._running[request] = seq
            self._by_uid[uid] = seq
            self._prompt_tokens_reused += reused

    def _take_cache(self, prompt: list[int]) -> tuple[Any, int]:
        """The kept cache holding the longest prefix of the prompt, cut back to it, and that
        prefix's length; (None, 0) when none helps. The last prompt token is always computed:
        its logits pick the first token. Frees the least recently used kept caches so caches
        in use and kept stay within `slots`."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        best, reused = None, 0
        for kept in self._kept:
            n = min(common_prefix(kept.tokens, prompt), len(prompt) - 1)
            # A sliding window that has rotated cannot be cut back, only extended.
            if n > reused and (n == len(kept.tokens) or can_trim_prompt_cache(kept.cache)):
                best, reused = kept, n
        if best is not None:
            self._kept.remove(best)
            trim_prompt_cache(best.cache, len(best.tokens) - reused)
        while self._kept and len(self._kept) + len(self._running) >= self._slots:
            self._kept.remove(min(self._kept, key=lambda k: k.last_used))
        self._summarize_prefixes()
        return (best.cache if best else None), reused

    def _sampling(self, request: EngineRequest) -> tuple[Any, list[Any]]:
        sampler, processors = make_sampler(
            request.sampling, self._end_of_generation if request.ignore_eos else ()
        )
        if request.constraint is not None:
            processors.append(_ConstraintMask(request.constraint))  # last: after penalties
        return sampler, processors

    def _step(self) -> None:
        _, responses = self._generator.next()
        if not responses:
            return
        self._decode_steps += 1
        now = time.perf_counter()
        touched = []
        for response in responses:
            seq = self._by_uid.get(response.uid)
            if seq is None or seq.request not in self._running:
                continue
            constraint = seq.request.constraint
            if constraint is not None and constraint.error:
                self._finish(
                    seq, FinishReason.ERROR, f"the output constraint failed: {constraint.error}"
                )
                touched.append(seq)
                continue
            top = seq.request.top_logprobs
            logprobs = None
            if top is not None:
                import numpy as np

                row = np.array(response.logprobs, dtype=np.float32)
                logprobs = step_logprobs(row, response.token, top)
            self._accept(seq, response.token, now, logprobs)
            touched.append(seq)
        for seq in touched:
            self._deliver(seq)

    def _release(self, seq: _Sequence, reason: FinishReason) -> None:
        """Takes the sequence out of the batch; keeps its cache unless it was cancelled or
        failed (then its memory is freed at once)."""
        del self._by_uid[seq.uid]
        keep = reason in (FinishReason.STOP, FinishReason.LENGTH)
        caches = self._generator.remove([seq.uid], return_prompt_caches=keep)
        if keep and seq.uid in caches:
            cache, tokens = caches[seq.uid]
            self._kept.append(_Kept(list(tokens), cache, seq.request.blocks, time.perf_counter()))
        self._summarize_prefixes()

    def _summarize_prefixes(self) -> None:
        self._cached_prefixes = summarize_prefixes(
            (kept.blocks, partial(_holds, kept)) for kept in self._kept
        )


def _holds(kept: _Kept, n: int) -> bool:
    return n <= len(kept.tokens)


class _GuidanceTokens:
    """What llguidance.TokenizerWrapper reads of a tokenizer."""

    def __init__(self, tokenizer: Any, pieces: list[bytes], eos: int, special: list[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens = pieces
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = special

    def __call__(self, text: str | bytes) -> list[int]:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


class _ConstraintMask:
    """A constrained sequence's logits processor: the row of every token the constraint
    rejects set to -inf. mlx-lm computes a step while the previous one's token is still
    being read, so the processor, not the engine, moves the constraint on: by the token the
    last call led to (reading it waits for that step)."""

    def __init__(self, constraint: TokenConstraint) -> None:
        self._constraint = constraint
        self._calls = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        if self._calls:
            self._constraint.advance(int(tokens[-1].item()))
        self._calls += 1
        row = np.zeros(logits.shape[-1], dtype=np.float32)
        if not self._constraint.mask(row):
            return logits  # the matcher failed: its error ends the sequence at the next token
        return logits + mx.array(row)[None, :]


def make_sampler(sampling: Sampling, banned: Any) -> tuple[Any, list[Any]]:
    """The request's sampler and logits processors, as mlx-lm takes them. Filters run as
    llama.cpp's chain orders them (top-k, top-p, min-p, then temperature); a seed gives the
    request a random key of its own, so its draws repeat whatever else is in the batch."""
    import mlx.core as mx
    from mlx_lm.sample_utils import (
        apply_min_p,
        apply_top_k,
        apply_top_p,
        make_repetition_penalty,
    )

    processors = []
    if sampling.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(sampling.repetition_penalty, PENALTY_WINDOW))
    ban = list(banned)
    if ban:
        banned_ids = mx.array(ban)

        def no_end(tokens: Any, logits: Any) -> Any:
            logits[:, banned_ids] = -float("inf")
            return logits

        processors.append(no_end)
    if sampling.temperature <= 0:
        return _greedy, processors
    key = [mx.random.key(sampling.seed if sampling.seed is not None else random.getrandbits(62))]
    inverse_temperature = 1 / sampling.temperature

    def sample(logprobs: Any) -> Any:
        if 0 < sampling.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, sampling.top_k)
        if sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        if sampling.min_p > 0.0:
            logprobs = apply_min_p(logprobs, sampling.min_p)
        key[0], draw = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inverse_temperature, key=draw)

    return sample, processors


def _greedy(logprobs: Any) -> Any:
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an mlx-lm model directory; MlxModelError says what is missing."""
    if not path.is_dir():
        raise MlxModelError(f"{path} is not a directory; an MLX model is a directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise MlxModelError(f"{path} has no config.json; is it an MLX model directory?") from None
    except (OSError, ValueError) as exc:
        raise MlxModelError(f"{path}/config.json is unreadable: {exc}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise MlxModelError(f"{path}/config.json names no model_type")
    return config


def estimate_bytes(path: Path, slots: int, context_per_slot: int) -> int:
    """The footprint before loading: the safetensors files, the KV cache at full use, and
    an allowance for activations."""
    config = read_config(path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if not weights:
        raise MlxModelError(f"{path} has no *.safetensors weights")
    return weights + kv_bytes(config, slots, context_per_slot) + OVERHEAD_BYTES


def kv_bytes(config: dict[str, Any], slots: int, context_per_slot: int) -> int:
    """Keys and values for `slots` requests of `context_per_slot` tokens; sliding-window
    layers hold at most their window."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads", heads))
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(heads, 1))
    window = int(text.get("sliding_window") or 0)
    pattern = int(text.get("sliding_window_pattern") or 0)
    dtype = 4 if text.get("torch_dtype", config.get("torch_dtype")) == "float32" else 2
    total = 0
    for layer in range(layers):
        sliding = window > 0 and pattern > 0 and (layer + 1) % pattern != 0
        tokens = min(context_per_slot, window) if sliding else context_per_slot
        total += tokens * kv_heads * head_dim * 2 * dtype
    return total * slots


@dataclass(frozen=True)
class _Vocabulary:
    pieces: list[bytes]  # each token's bytes; special tokens render as nothing
    bos: str
    eos: str


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise MlxModelError(f"{path} has no tokenizer.json; copy it from the model's source")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:
        raise MlxModelError(
            f"{file} is not a tokenizer the tokenizers library reads: {exc}"
        ) from None


def _token_table(tokenizer: Any, settings: dict[str, Any]) -> _Vocabulary:
    """Every token's bytes, read from the vocabulary as the tokenizer's decoder would write
    them: byte-level BPE (GPT-2, Llama 3, Qwen) maps characters back to bytes; SentencePiece
    style (Gemma, Llama 2) writes '▁' as a space and <0xAB> as that byte."""
    # The decoder's own JSON (small), not tokenizer.json again (33 MB for Gemma).
    decoder = tokenizer.decoder.__getstate__() if tokenizer.decoder is not None else b""
    byte_level = b'"ByteLevel"' in decoder
    added = tokenizer.get_added_tokens_decoder()
    special = frozenset(token for token, info in added.items() if info.special)
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    pieces: list[bytes] = []
    for token in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        piece = tokenizer.id_to_token(token)
        if piece is None or token in special:
            pieces.append(b"")
        elif byte_level:
            pieces.append(
                bytes(to_byte[c] for c in piece)
                if all(c in to_byte for c in piece)
                else piece.encode()
            )
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            pieces.append(bytes([int(piece[3:5], 16)]))
        else:
            pieces.append(piece.replace("▁", " ").encode())
    bos, eos = _token_text(settings.get("bos_token")), _token_text(settings.get("eos_token"))
    return _Vocabulary(pieces, bos, eos)


def _tokenizer_settings(path: Path) -> dict[str, Any]:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    settings = json.loads(file.read_text())
    return settings if isinstance(settings, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<bos>", ...}
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _end_of_generation(
    path: Path, config: dict[str, Any], tokenizer: Any, settings: dict[str, Any]
) -> frozenset[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer's eos_token."""
    ids: set[int] = set()
    sources = [config]
    generation = path / "generation_config.json"
    if generation.is_file():
        sources.append(json.loads(generation.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    eos = _token_text(settings.get("eos_token"))
    if eos and (token := tokenizer.token_to_id(eos)) is not None:
        ids.add(token)
    return frozenset(ids)


def _template_source(path: Path, settings: dict[str, Any]) -> str | None:
    """The model's Jinja chat template; None when the model has none."""
    source = settings.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        source = (path / "chat_template.jinja").read_text()
    return source if isinstance(source, str) else None


def _compile_template(source: str | None) -> Any:
    """A chat template compiled as transformers does (sandboxed, blocks trimmed)."""
    if source is None:
        return None
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(source)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
