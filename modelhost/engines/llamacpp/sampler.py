"""Picks each sequence's next token from its row of logits.

llama.cpp's `llama_sampler_sample` copies the whole vocabulary into a candidate array before
its first sampler runs: about 0.8 ms per token for Gemma's 262k-token vocabulary, which on a
small CPU model is a tenth of a batched decode step. Here numpy does the vocabulary-wide work
(penalties, top-k selection, greedy argmax) in place on the logits, and llama.cpp's own
samplers run only on the top-k candidates, so a seeded draw is the one llama.cpp would make.

With top_k = 0 (no top-k: what many clients mean by "off") llama.cpp's top-p and min-p would
see the whole vocabulary, ~3 ms a token on Gemma's. numpy finds their survivors instead: a
threshold on the logits keeps the few tokens that can be in the nucleus, and only those are
sorted; llama.cpp's temperature and seeded draw then run on the survivors, in the order its
top-p leaves them. The draw is llama.cpp's but for a token whose cumulative probability lies
within float rounding of top_p (llama.cpp sums in float32, numpy here in float64).
"""

import collections
import concurrent.futures
import ctypes
import functools
import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import llama_cpp
import numpy as np
from numpy.lib.stride_tricks import as_strided

from modelhost.constraints import TokenConstraint
from modelhost.device import default_threads
from modelhost.generation import Sampling, StepLogprobs
from modelhost.logprobs import NUCLEUS_THRESHOLDS, largest, step_logprobs, threshold_pool, top_k

# Tokens the repetition penalty looks back over.
PENALTY_WINDOW = 64
# A constrained sequence whose sampled token was rejected picks again (_pick_allowed) among
# the allowed tokens themselves when they fill at most SPARSE_WORDS words of the mask (8192
# tokens at most), else among the allowed ones of (at least) the CANDIDATES likeliest, and
# only when those hold too few from the masked row.
SPARSE_WORDS = 256
CANDIDATES = 256
# top_k_rows folds each row of logits into columns of COLUMNS (with 2048, the columns read
# again, each logit in a cache line of its own, cost more than the narrower partition
# saves), GROUP_LOGITS' worth of rows in one call: rows that fit in cache together are read
# again cheaply (five rows of a 49k vocabulary, one of 152k or 262k).
COLUMNS = 4096
GROUP_LOGITS = 1 << 18
# A step's rows are read by this many threads at once when they hold at least
# PARALLEL_LOGITS logits (in_parts): 64 rows of 262k logits, out of cache, are read 1.7x as
# fast by two threads as by one on a 2-core Xeon; below, handing rows over costs more than
# it saves. llama.cpp's threads are idle while the engine samples.
SCAN_THREADS = min(default_threads(), 4)
PARALLEL_LOGITS = 1 << 22
# Candidates llama.cpp finds in its graph for a sequence that samples there (the model's
# sample_in_graph): llama.cpp's default top_k of 40, and room for the end-of-generation
# tokens an ignore_eos request takes out.
GRAPH_TOP_K = 48

T = TypeVar("T")

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class TokenSet(Protocol):
    """Tokens, as a list holds them or as a model's end-of-generation tokens do: asked about
    one at a time, walked whole only where a sampler needs them all."""

    def __contains__(self, token: object, /) -> bool: ...

    def __iter__(self) -> Iterator[int]: ...


class NoTokenAllowed(Exception):
    """No token may be picked for the sequence (its constraint's matcher failed); says why."""


class TokenSampler:
    """One request's sampling state: its settings, its recent tokens and its seeded RNG; its
    constraint, and whether it reports log probabilities (`top_logprobs` alternatives, None
    for none)."""

    def __init__(
        self,
        sampling: Sampling,
        n_vocab: int,
        banned: TokenSet,
        *,
        constraint: TokenConstraint | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        self._sampling = sampling
        self._constraint = constraint
        self._top_logprobs = top_logprobs
        self.logprobs: StepLogprobs | None = None  # the last sampled token's
        self._pool: np.ndarray | None = None  # this row's likeliest ids, as a draw found them
        self._n_vocab = n_vocab
        self._recent: collections.deque[int] = collections.deque(maxlen=PENALTY_WINDOW)
        self._chain = None
        self._candidates = np.empty(0, dtype=_TOKEN_DATA)
        # top_k = 0 with top-p or min-p: numpy truncates, llama.cpp draws (module docstring).
        self._truncate = sampling.top_k == 0 and (sampling.top_p < 1.0 or sampling.min_p > 0.0)
        if sampling.temperature > 0.0:
            self._chain = _llama_chain(sampling, truncated=self._truncate)
            self._candidates = np.empty(sampling.top_k or n_vocab, dtype=_TOKEN_DATA)
            # One llama_token_data_array over the candidates, refilled for each draw.
            self._data = self._candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
            self._array = llama_cpp.llama_token_data_array(data=self._data, size=0)
            self._array_ref = ctypes.byref(self._array)
        # Tokens it may not pick (e.g. end-of-generation ones): a plain greedy sampler asks
        # about the token it picked (avoiding), the others take them all out of each row.
        self._avoid: TokenSet | None = None
        self._banned = np.empty(0, dtype=np.int64)
        if self.plain_greedy:
            self._avoid = banned or None
        else:
            self._banned = np.fromiter(banned, dtype=np.int64)
        self._banned_set = frozenset(self._banned.tolist())

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is the row's argmax once banned tokens are out: no draw,
        penalty, constraint or log probabilities (see sample_rows)."""
        return (
            self._chain is None
            and self._constraint is None
            and self._top_logprobs is None
            and self._sampling.repetition_penalty == 1.0
        )

    @property
    def plain_draw(self) -> bool:
        """Whether the token is a seeded draw among the row's top_k once banned tokens are
        out: no penalty, constraint, log probabilities or top-p without top-k (see
        sample_rows)."""
        return (
            self._chain is not None
            and self._sampling.top_k > 0
            and self._constraint is None
            and self._top_logprobs is None
            and self._sampling.repetition_penalty == 1.0
        )

    @property
    def fits_graph(self) -> bool:
        """Whether its token can come from the GRAPH_TOP_K candidates llama.cpp finds in the
        decode's graph (pick_among): a plain greedy, or a plain draw whose top_k stays among
        them once its banned tokens are out."""
        if self.plain_greedy:
            return True
        return self.plain_draw and self._sampling.top_k + self._banned.size <= GRAPH_TOP_K

    def pick_among(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """The token from a row's GRAPH_TOP_K likeliest ids and their logits (fits_graph):
        the row's argmax once tokens to avoid are out (the lowest id of the largest), or the
        draw among its top_k that the whole row would give. Raises NoTokenAllowed when every
        candidate is one to avoid."""
        self._pool = None
        if self._chain is None:
            token = int(ids[logits == logits.max()].min())
            while self._avoid is not None and token in self._avoid:
                keep = ids != token
                ids, logits = ids[keep], logits[keep]
                if not len(ids):
                    raise NoTokenAllowed(
                        f"the {GRAPH_TOP_K} likeliest tokens are all end-of-generation tokens, "
                        "which ignore_eos keeps out"
                    )
                token = int(ids[logits == logits.max()].min())
        else:
            if self._banned_set:  # a set lookup each: np.isin costs 10 us on 48 ids
                out = [i for i, token in enumerate(ids.tolist()) if token in self._banned_set]
                if out:
                    ids, logits = np.delete(ids, out), np.delete(logits, out)
            k = min(self._sampling.top_k, len(ids))
            if len(ids) > k:
                chosen = np.argpartition(logits, -k)[-k:]
                ids, logits = ids[chosen], logits[chosen]
            token = self._apply_chain(ids, logits)
        self.took(token)
        return token

    def draw_among(self, logits: np.ndarray, ids: np.ndarray) -> int:
        """A plain draw's token, given ids that hold the row's top_k (sample_rows)."""
        self._pool = None
        token = self._draw(logits, ids)
        self.took(token)
        return token

    def sample(self, logits: np.ndarray) -> int:
        """The next token from a row of logits, which it may overwrite. Raises
        NoTokenAllowed when the constraint admits none."""
        raw = logits.copy() if self._top_logprobs is not None else None
        self.ban(logits)
        if self._recent and self._sampling.repetition_penalty != 1.0:
            self._penalize(logits)
        self._pool = None
        token = self._pick(logits)
        constraint = self._constraint
        if constraint is not None and not constraint.allows(token):
            token = self._pick_allowed(logits, constraint)
        if raw is not None:
            self.logprobs = step_logprobs(raw, token, self._top_logprobs or 0)
        self._recent.append(token)
        return token

    def ban(self, logits: np.ndarray) -> None:
        """Takes the banned tokens out of a row (again is harmless)."""
        if self._banned.size:
            logits[self._banned] = -np.inf

    def took(self, token: int) -> None:
        """Records a token picked for it by sample_rows."""
        self.logprobs = None
        self._recent.append(token)

    def _pick(self, logits: np.ndarray) -> int:
        if self._chain is not None:
            return self._draw(logits)
        return self.avoiding(logits, int(logits.argmax()))

    def avoiding(self, logits: np.ndarray, token: int) -> int:
        """The row's argmax `token`, or where it is one to avoid, the argmax once it is out,
        and so on: what taking them all out first gives (the lowest id of the largest of the
        rest), without walking the vocabulary to find them all (a third of a second for
        Gemma's, which a first ignore_eos request waited for)."""
        avoid = self._avoid
        while avoid is not None and token in avoid and logits[token] > -np.inf:
            logits[token] = -np.inf
            token = int(logits.argmax())
        return token

    def _pick_allowed(self, logits: np.ndarray, constraint: TokenConstraint) -> int:
        """The token the sampler would have picked from the row with every token the
        constraint rejects masked out, found without a pass over the row. The greedy choice,
        or the top-k to draw among, come from the allowed tokens themselves where the mask
        allows few (JSON's punctuation), else from the allowed ones among the most likely
        (where it allows most, those hold enough). A top-p or min-p without top-k weighs the
        whole row: that row is masked."""
        if not constraint.compute_mask():
            raise NoTokenAllowed(
                f"the output constraint failed: {constraint.error or 'it admits no token here'}"
            )
        need = 1 if self._chain is None else self._sampling.top_k
        if not need or self._truncate:
            constraint.apply(logits)
            return self._pick(logits)
        ids = constraint.allowed_ids(at_most=SPARSE_WORDS)
        if ids is None:
            pool = self._pool if self._pool is not None else threshold_pool(logits, CANDIDATES)
            ids = pool[constraint.allowed(pool)]
            if len(ids) < need:  # the likeliest tokens are not allowed: mask the row
                constraint.apply(logits)
                return self._pick(logits)
        if self._chain is None:
            return int(ids[logits[ids].argmax()])
        return self._draw(logits, ids)

    def _penalize(self, logits: np.ndarray) -> None:
        # llama.cpp's repetition penalty: shrink the logit of every recently seen token.
        seen = np.fromiter(set(self._recent), dtype=np.int64)
        values = logits[seen]
        penalty = self._sampling.repetition_penalty
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)

    def _draw(self, logits: np.ndarray, among: np.ndarray | None = None) -> int:
        """A seeded draw through llama.cpp's chain; `among`: the only tokens that may be
        drawn (at least top_k of them), or a set that holds the row's top_k."""
        in_order = False
        if among is not None:
            ids = largest(logits, among, min(self._sampling.top_k, len(among)))
        elif self._truncate:
            ids, in_order = self._survivors(logits)
        else:
            k = len(self._candidates)
            if k < self._n_vocab:
                # Kept: a constrained draw looks again among it (_pick_allowed).
                self._pool = threshold_pool(logits, k)
                ids = largest(logits, self._pool, k)
            else:
                ids = np.arange(k)
        return self._apply_chain(ids, logits[ids], in_order)

    def _apply_chain(self, ids: np.ndarray, logits: np.ndarray, in_order: bool = False) -> int:
        """llama.cpp's chain over these candidates (their logits; `in_order`: sorted, most
        likely first): the drawn token. Its top-k sorts them when they are not, so where
        they came from does not change the draw."""
        assert self._chain is not None
        k = len(ids)
        candidates = self._candidates[:k]
        candidates["id"] = ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = self._array
        array.data = self._data  # type: ignore[assignment]
        array.size, array.selected, array.sorted = k, -1, in_order
        llama_cpp.llama_sampler_apply(self._chain, self._array_ref)
        # The samplers may point `data` elsewhere inside the array; read through it.
        return int(array.data[array.selected].id)

    def _survivors(self, logits: np.ndarray) -> tuple[np.ndarray, bool]:
        """What llama.cpp's top-p, then min-p (min_keep 1) keep of the whole vocabulary, in
        the order they leave them: by descending logit after top-p, by id after min-p alone;
        and whether that order is sorted."""
        top_p, min_p = self._sampling.top_p, self._sampling.min_p
        top = float(logits.max())
        floor = top + math.log(min_p) if min_p > 0.0 else -math.inf
        if top_p >= 1.0:
            return np.flatnonzero(logits >= floor), False
        shifted = logits - top
        total = float(np.exp(shifted).sum(dtype=np.float64))  # exp in float32: SIMD
        # The nucleus lies among the tokens above a threshold once their mass reaches top_p:
        # sorted by probability, the running sum gets there before it passes below it.
        for drop in NUCLEUS_THRESHOLDS:
            ids = np.flatnonzero(shifted >= max(drop, floor - top))
            if np.exp(shifted[ids], dtype=np.float64).sum() >= top_p * total or drop == -math.inf:
                break
        ids = ids[np.argsort(-shifted[ids], kind="stable")]
        running = np.cumsum(np.exp(shifted[ids], dtype=np.float64)) / total
        kept = min(int(np.searchsorted(running, top_p)) + 1, len(ids))
        ids = ids[:kept]
        # min-p on what top-p kept: a prefix, its first token always.
        return ids[: max(int(np.count_nonzero(logits[ids] >= floor)), 1)], True


def sample_rows(samplers: list[TokenSampler], rows: np.ndarray) -> list[int | NoTokenAllowed]:
    """Each sampler's next token from its row of `rows` (one row a sampler, in order; rows
    may be overwritten), or the NoTokenAllowed its constraint raised. The vocabulary-wide
    work of the common cases is done for all rows at once: a greedy batch is one argmax, and
    plain draws find their top-k candidates in one pass over their rows (top_k_rows); the
    rest sample row by row."""
    if all(sampler.plain_greedy for sampler in samplers):
        for sampler, row in zip(samplers, rows, strict=True):
            sampler.ban(row)
        picked = in_parts(lambda part: part.argmax(axis=1).tolist(), rows)
        for i, (sampler, token) in enumerate(zip(samplers, picked, strict=True)):
            picked[i] = token = sampler.avoiding(rows[i], token)
            sampler.took(token)
        return picked
    tokens: list[int | NoTokenAllowed | None] = [None] * len(samplers)
    drawn = [i for i, sampler in enumerate(samplers) if sampler.plain_draw]
    if drawn:
        for i in drawn:
            samplers[i].ban(rows[i])
        k = max(samplers[i]._sampling.top_k for i in drawn)
        among = top_k_rows(rows if len(drawn) == len(samplers) else rows[drawn], k)
        for i, ids in zip(drawn, among, strict=True):
            tokens[i] = samplers[i].draw_among(rows[i], ids)
    for i, sampler in enumerate(samplers):
        if tokens[i] is None:
            try:
                tokens[i] = sampler.sample(rows[i])
            except NoTokenAllowed as exc:
                tokens[i] = exc
    return tokens  # type: ignore[return-value]


def top_k_rows(rows: np.ndarray, k: int) -> list[np.ndarray]:
    """For each row, ids that hold its k largest logits (a few more at most), reading each
    row once from memory where top_k reads it three times: the row, folded into columns of
    COLUMNS logits, is reduced to each column's maximum (an elementwise maximum of
    contiguous runs: as fast as one argmax). At least k logits reach the k-th largest column
    maximum, so the k largest all do, and they lie in the columns whose maximum reaches it:
    only those columns are read again, while the row is still in cache. Rows are shared
    among threads when they are many (in_parts)."""
    depth, offsets, tail = _fold(rows.shape[1])
    if depth < 2 or k > COLUMNS // 4:
        return [top_k(row, k) for row in rows]

    group = max(1, GROUP_LOGITS // rows.shape[1])

    def among(part: np.ndarray) -> list[np.ndarray]:
        found = []
        for start in range(0, len(part), group):
            block = part[start : start + group]
            if tail.size:  # the block's columns seen in place: a reshape would copy them
                strides = (block.strides[0], COLUMNS * block.strides[1], block.strides[1])
                folded = as_strided(block, (len(block), depth, COLUMNS), strides, writeable=False)
            else:
                folded = block.reshape(len(block), depth, COLUMNS)
            maxima = folded.max(axis=1)
            floors = np.partition(maxima, COLUMNS - k, axis=1)[:, COLUMNS - k]
            for row, row_maxima, floor in zip(block, maxima, floors, strict=True):
                ids = (np.flatnonzero(row_maxima >= floor) + offsets).ravel()
                if tail.size:
                    ids = np.concatenate((ids, tail))
                found.append(ids[row[ids] >= floor])
        return found

    return in_parts(among, rows)


@functools.cache
def _fold(n_vocab: int) -> tuple[int, np.ndarray, np.ndarray]:
    """How top_k_rows folds a row of n_vocab logits into whole columns: their depth, the id
    each of their rows starts at, and the ids past them (the last, partial column), which
    are read whole."""
    depth = n_vocab // COLUMNS
    width = depth * COLUMNS
    return depth, np.arange(0, width, COLUMNS)[:, None], np.arange(width, n_vocab)


def in_parts(work: Callable[[np.ndarray], list[T]], rows: np.ndarray) -> list[T]:
    """work(rows), the rows split into contiguous parts read by this thread and the scan
    helpers at once when they hold PARALLEL_LOGITS or more: rows that no longer sit in
    cache are read at the speed of memory, which one core does not reach. numpy lets go of
    the GIL while it reads them."""
    parts = min(len(rows), SCAN_THREADS) if rows.size >= PARALLEL_LOGITS else 1
    if parts < 2:
        return work(rows)
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    helped = [_scan_helpers().submit(work, rows[a:b]) for a, b in itertools.pairwise(bounds[1:])]
    try:
        done = work(rows[: bounds[1]])
    finally:  # llama.cpp may move the rows once this returns: no helper may be reading them
        concurrent.futures.wait(helped)
    for part in helped:
        done += part.result()
    return done


@functools.cache
def _scan_helpers() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(SCAN_THREADS - 1, thread_name_prefix="logit-scan")


def _llama_chain(sampling: Sampling, *, truncated: bool = False) -> ctypes.c_void_p:
    """top-k, top-p, min-p, temperature and a seeded draw, in llama.cpp's order; without the
    truncating samplers when numpy has applied them (`truncated`)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: ctypes.c_void_p) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if sampling.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0 and not truncated:
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0.0 and not truncated:
        add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
    # llama.cpp seeds are 32-bit, and 0xFFFFFFFF means "pick one at random".
    seed = random.getrandbits(32) if sampling.seed is None else sampling.seed
    add(llama_cpp.llama_sampler_init_dist(seed % llama_cpp.LLAMA_DEFAULT_SEED))
    return chain
