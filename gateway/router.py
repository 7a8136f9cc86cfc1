"""Which hosts may serve a request, best first. Pure logic over the pool's current view."""

import itertools

from airouter.errors import NotFound, Unavailable
from airouter.v1 import generate_pb2
from gateway.hosts import Host

_STATE_RANK = {
    generate_pb2.MODEL_STATE_READY: 0,
    generate_pb2.MODEL_STATE_LOADING: 1,
    generate_pb2.MODEL_STATE_NOT_LOADED: 2,
    generate_pb2.MODEL_STATE_UNLOADING: 2,  # a request loads it again
}
_rotation = itertools.count()


def candidates(hosts: list[Host], model: str) -> list[Host]:
    """Reachable hosts that serve `model` (by name or alias), resident ones first; hosts that
    rank alike take turns so load spreads. Raises NotFound or Unavailable when none can."""
    reachable = [h for h in hosts if h.reachable]
    if not reachable:
        tried = "; ".join(f"{h.address} ({h.last_error})" for h in hosts) or "none configured"
        raise Unavailable(f"no model host is reachable; tried: {tried}")

    def rank(host: Host) -> int:
        states = [m.state for m in host.models if model == m.name or model in m.aliases]
        return min((_STATE_RANK.get(s, 3) for s in states), default=3)

    listed = [h for h in reachable if h.serves(model)]
    serving = [h for h in listed if rank(h) < 3]
    if listed and not serving:
        why = "; ".join(
            f"{h.address}: {m.state_detail or 'error'}"
            for h in listed
            for m in h.models
            if model in (m.name, *m.aliases)
        )
        raise Unavailable(f"model {model!r} failed to load on every host that serves it: {why}")
    if not serving:
        known = sorted({m.name for h in reachable for m in h.models})
        raise NotFound(
            f"model {model!r} is not served by any reachable host; available: "
            f"{', '.join(known) or 'none'}"
        )
    turn = next(_rotation) % len(serving)
    rotated = serving[turn:] + serving[:turn]
    return sorted(rotated, key=rank)
