"""Constrained decoding, one path for every engine: llguidance matchers over the model's own
vocabulary, checked token by token.

Each constrained sequence carries a TokenConstraint. The engine samples as it would without
one, then asks the constraint whether the token may follow (a few microseconds); only when it
may not does the constraint compute the whole vocabulary's mask and the engine sample again
from the masked row, as llama.cpp's server does with its grammars. Most tokens of a
well-prompted model pass the check, so a constrained sequence costs about what a free one
does, and the free sequences of the same batch pay nothing.

A grammar is compiled once per model and cached; each request gets a copy of the compiled
matcher (microseconds).
"""

import collections
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from airouter.errors import InvalidArgument

# Compiled matchers kept per model, by grammar text.
CACHED_GRAMMARS = 256


class TokenConstraint:
    """One sequence's constraint: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._mask = np.empty(((n_vocab + 31) // 32,), dtype=np.int32)
        self._mask_state: bool | None = None  # compute_mask's answer for the current state
        self.masks_computed = 0

    def allows(self, token: int) -> bool:
        return bool(self._matcher.validate_tokens([token]))

    def advance(self, token: int) -> None:
        """Takes a token `allows` accepted."""
        self._matcher.consume_token(token)
        self._mask_state = None

    @property
    def complete(self) -> bool:
        """Nothing more may follow: the sequence is done."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is whole (the sequence may end here)."""
        return bool(self._matcher.is_accepting())

    def compute_mask(self) -> bool:
        """Computes which tokens may come next (then `allowed` and `mask` read it), once per
        state: an engine may have done it ahead, off its thread (llguidance releases the GIL
        while it works). False when none may (the matcher has failed: error says why)."""
        if self._mask_state is None:
            self.masks_computed += 1
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            self._mask_state = not self._matcher.is_error() and bool(self._mask.any())
        return self._mask_state

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """Which of these tokens the computed mask lets through (a few gathers, not a pass
        over the vocabulary)."""
        return ((self._mask[ids >> 5] >> (ids & 31)) & 1).astype(bool)

    def allowed_ids(self, at_most: int | None = None) -> np.ndarray | None:
        """Every token the computed mask lets through, read from the mask's nonzero words: a
        mask that allows few tokens (JSON's punctuation) costs little to read. None when more
        than `at_most` words of 32 tokens are nonzero (the caller looks elsewhere)."""
        words = np.flatnonzero(self._mask)
        if at_most is not None and len(words) > at_most:
            return None
        bits = np.unpackbits(self._mask[words].view(np.uint8), bitorder="little")
        rows, columns = np.nonzero(bits.reshape(-1, 32))
        ids = words[rows] * 32 + columns
        return ids[ids < self._n_vocab]

    def mask(self, logits: np.ndarray) -> bool:
        """Sets the logits of every token that may not come next to -inf, in place (a pass
        over the whole row); False when none may."""
        if not self.compute_mask():
            return False
        self.apply(logits)
        return True

    def apply(self, logits: np.ndarray) -> None:
        """The computed mask applied to a row, in place."""
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little", count=len(logits))
        np.copyto(logits, -np.inf, where=~bits.view(bool))

    @property
    def error(self) -> str:
        return (
            str(self._matcher.get_error()).strip().splitlines()[0]
            if self._matcher.is_error()
            else ""
        )


def compute_masks(constraints: list[TokenConstraint]) -> None:
    """Each constraint's next mask, ahead of the sampler that may need it (engines run this
    on a worker thread while the model computes the step)."""
    for constraint in constraints:
        constraint.compute_mask()


class ConstraintCompiler:
    """A model's grammars compiled against its vocabulary. The llguidance tokenizer is built
    on first use (a walk over the vocabulary: seconds for a 262k one), so hosts that never see
    a constraint never pay for it. Thread-safe; call from worker threads, never the loop."""

    def __init__(self, build_tokenizer: Callable[[], Any], n_vocab: int) -> None:
        self._build_tokenizer = build_tokenizer
        self.n_vocab = n_vocab  # the width of a logits row, which masks must cover
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def constraint(self, grammar: str, where: str) -> TokenConstraint:
        """A fresh constraint for one sequence; InvalidArgument naming `where` when the
        grammar does not compile for this model."""
        import llguidance

        tokenizer = self.tokenizer()
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if compiled.is_error():
                error = str(compiled.get_error()).strip().splitlines()[0][:300]
                raise InvalidArgument(f"{where}: cannot be used: {error}")
            with self._lock:
                self._compiled[grammar] = compiled
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return TokenConstraint(compiled.deep_copy(), self.n_vocab)
