"""Which (host, model) pairs may serve a request, and in which order to try them.

Pure logic over the pool's live view. A request names a model, an alias, or
"capability:<tag>", and may ask for a minimum context length. Candidates are ranked in tiers:
resident with a free slot, resident and busy, loading or loadable, resident but saturated (a
whole wave of requests queued); within a tier by free slots against queued requests, then
recent TTFT; between equals the first choice is drawn at random. Load counts the requests
this gateway sent since a host's last status update, so a burst spreads evenly at once.

Then the prefix: among resident, unsaturated candidates, the one expected to hold the most of
the prompt (at least PrefixPolicy.min_tokens; between near-equal holders the least loaded)
goes first, unless the request would wait there for a slot behind more than
PrefixPolicy.max_queue_gap requests beyond what it would wait behind on the least loaded one:
then load wins.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from airouter.errors import InvalidArgument, NotFound, Unavailable, shown
from airouter.v1 import generate_pb2
from gateway.hosts import Host
from gateway.prefixes import DEFAULT_PREFIX_POLICY, PrefixPolicy

CAPABILITY_PREFIX = "capability:"
_READY = generate_pb2.MODEL_STATE_READY
_LOADING = generate_pb2.MODEL_STATE_LOADING
_ERROR = generate_pb2.MODEL_STATE_ERROR
# Holders whose expected hit is within this fraction of the best one's count as equal.
NEAR_EQUAL_HIT = 0.9
# Prompt tokens a host holds for the request (PrefixMemory.expected_hit).
HitEstimate = Callable[[Host, generate_pb2.ModelInfo], int]


@dataclass(frozen=True)
class Candidate:
    host: Host
    model: generate_pb2.ModelInfo
    tier: int  # lower is better
    weight: float  # higher is better, within a tier
    ttft_ms: float
    reason: str
    waiting: int = 0  # requests the new one would wait behind for a slot
    prefix_tokens: int = 0  # prompt tokens the host is expected to hold for it

    def describe(self) -> str:
        return f"{self.host.address}/{self.model.name} (tier {self.tier}: {self.reason})"


def matches(model: generate_pb2.ModelInfo, requested: str) -> bool:
    if requested.startswith(CAPABILITY_PREFIX):
        return requested.removeprefix(CAPABILITY_PREFIX) in model.capabilities
    return requested == model.name or requested in model.aliases


def candidates(
    hosts: list[Host],
    requested: str,
    min_context: int = 0,
    rng: random.Random | None = None,
    hit: HitEstimate | None = None,
    policy: PrefixPolicy = DEFAULT_PREFIX_POLICY,
) -> list[Candidate]:
    """The pairs that can serve the request, the chosen one first; raises NotFound,
    InvalidArgument or Unavailable, saying why, when there are none. `hit` says how many of
    the prompt's tokens a host holds."""
    routable = [h for h in hosts if h.routable]
    if not routable:
        states = "; ".join(f"{h.address}: {h.state.value} ({h.detail})" for h in hosts)
        raise Unavailable(f"no model host is available; {states or 'none is configured'}")
    pairs = [(h, m) for h in routable for m in h.models if matches(m, requested)]
    if not pairs:
        elsewhere = [
            h for h in hosts if not h.routable and any(matches(m, requested) for m in h.models)
        ]
        if elsewhere:
            raise Unavailable(
                f"{shown(requested)} is served only by hosts that are not available: "
                + "; ".join(f"{h.address}: {h.state.value} ({h.detail})" for h in elsewhere)
            )
        names = sorted({m.name for h in routable for m in h.models})
        tags = sorted({t for h in routable for m in h.models for t in m.capabilities})
        raise NotFound(
            f"no available host serves {shown(requested)}; models: {', '.join(names) or 'none'}; "
            f"capabilities (ask for capability:<tag>): {', '.join(tags) or 'none'}"
        )
    if min_context:
        wide = [(h, m) for h, m in pairs if m.context_length >= min_context]
        if not wide:
            largest = max(m.context_length for _, m in pairs)
            raise InvalidArgument(
                f"min_context_length {min_context} exceeds the context of every model that "
                f"matches {shown(requested)} (the largest has {largest}); ask for less or "
                "configure a model with more context"
            )
        pairs = wide
    ranked = [c for c in (_rank(h, m) for h, m in pairs) if c is not None]
    if not ranked:
        why = "; ".join(
            f"{h.address}/{m.name}: {_status_detail(h, m.name) or 'error'}" for h, m in pairs
        )
        raise Unavailable(f"{shown(requested)} failed to load on every host that serves it: {why}")
    ranked.sort(key=lambda c: (c.tier, -c.weight, c.ttft_ms))
    equals = [c for c in ranked if (c.tier, c.weight) == (ranked[0].tier, ranked[0].weight)]
    if len(equals) > 1:
        first = (rng or random).choice(equals)
        ranked = [first, *(c for c in ranked if c is not first)]
    if hit is not None and policy.enabled:
        ranked = _prefer_prefix(ranked, hit, policy)
    return ranked


def _prefer_prefix(
    ranked: list[Candidate], hit: HitEstimate, policy: PrefixPolicy
) -> list[Candidate]:
    """`ranked` with the candidate holding the most of the prompt first, unless load wins."""
    resident = [c for c in ranked if c.tier <= 1]
    if not resident:
        return ranked
    hits = {id(c): hit(c.host, c.model) for c in resident}
    best_hit = max(hits.values())
    if best_hit < policy.min_tokens:
        return ranked
    holders = [c for c in resident if hits[id(c)] >= best_hit * NEAR_EQUAL_HIT]
    choice = min(holders, key=lambda c: (c.waiting, -c.weight, -hits[id(c)]))
    tokens = hits[id(choice)]
    least = min(c.waiting for c in resident)
    if choice.waiting - least > policy.max_queue_gap:
        note = (
            f"; load wins over {choice.host.address}, which holds ~{tokens} prompt tokens but "
            f"would queue it behind {choice.waiting}"
        )
        first = replace(ranked[0], reason=ranked[0].reason + note)
        return [first, *ranked[1:]]
    chosen = replace(
        choice, prefix_tokens=tokens, reason=f"{choice.reason}, holds ~{tokens} prompt tokens"
    )
    return [chosen, *(c for c in ranked if c is not choice)]


def _status_detail(host: Host, name: str) -> str:
    status = host.model_status(name)
    return status.state_detail if status else ""


def _rank(host: Host, model: generate_pb2.ModelInfo) -> Candidate | None:
    """Places one pair in its tier, or None when the model is in error on that host."""
    status = host.model_status(model.name)
    if status is None:
        return Candidate(host, model, 2, 1.0, 0.0, "no status yet")
    if status.state == _ERROR:
        return None
    slots = max(status.slots, 1)
    # Requests this gateway sent since the host's last update count too.
    busy = max(status.slots_busy + status.queue_depth, host.in_flight.get(model.name, 0))
    free, queued = max(slots - busy, 0), max(busy - slots, 0)
    weight = (1 + free) / (1 + queued)
    load = f"{free}/{slots} slots free, {queued} queued"
    ttft = status.recent_time_to_first_token_ms
    waiting = 0 if free else queued + 1
    if status.state == _READY:
        if free:
            return Candidate(host, model, 0, weight, ttft, f"resident, {load}", waiting)
        if queued < slots:
            return Candidate(host, model, 1, weight, ttft, f"resident and busy, {load}", waiting)
        return Candidate(host, model, 3, weight, ttft, f"resident but saturated, {load}", waiting)
    if status.state == _LOADING:
        return Candidate(host, model, 2, weight, ttft, "loading")
    memory = host.status.memory if host.status else None
    fits = (
        memory is not None and memory.budget_bytes - memory.models_bytes >= status.footprint_bytes
    )
    why = "not loaded, fits in free memory" if fits else "not loaded, must evict to fit"
    return Candidate(host, model, 2 if fits else 3, weight, ttft, why)
