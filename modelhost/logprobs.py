"""Reading a row of logits: the k most likely tokens, and a sampled token's log probability
under the row's distribution (OpenAI's logprobs). numpy, shared by the engines."""

import math

import numpy as np

from modelhost.generation import StepLogprobs

# Logits below the top one, widening: the tokens above e^-8 of the top's probability nearly
# always hold the nucleus (and the top 40); flat distributions widen the search.
NUCLEUS_THRESHOLDS = (-8.0, -16.0, -32.0, -math.inf)


def step_logprobs(raw: np.ndarray, token: int, top: int) -> StepLogprobs:
    """The chosen token's log probability under the model's own distribution (the raw
    logits' softmax), and the `top` most likely tokens', most likely first."""
    peak = float(raw.max())
    log_total = peak + math.log(float(np.exp(raw - peak).sum(dtype=np.float64)))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        ids = top_k(raw, top)
        ids = ids[np.argsort(-raw[ids], kind="stable")]
        alternatives = tuple((int(i), float(raw[i]) - log_total) for i in ids)
    return StepLogprobs(float(raw[token]) - log_total, alternatives)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, in no order. A threshold under the top logit first
    narrows the vocabulary to a few hundred tokens (one vectorised comparison), and only those
    are partitioned: ~10x faster than partitioning all of Gemma's 262k."""
    return largest(logits, threshold_pool(logits, k), k)


def threshold_pool(logits: np.ndarray, k: int) -> np.ndarray:
    """Every id whose logit is above the first threshold under the top one that lets at
    least k through (NUCLEUS_THRESHOLDS): a set that holds the k largest, and every id left
    out is less likely than every id in it."""
    top = float(logits.max())
    for drop in NUCLEUS_THRESHOLDS:
        # The last, -inf: every token but those masked out (banned, or rejected by a
        # constraint), which no draw may pick.
        ids = np.flatnonzero(logits >= top + drop if drop > -np.inf else logits > -np.inf)
        if len(ids) >= k:
            break
    return ids


def largest(logits: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The k of `ids` with the largest logits, in no order."""
    return ids[np.argpartition(logits[ids], -k)[-k:]] if len(ids) > k else ids
