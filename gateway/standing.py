"""A host's standing with the gateway: up, down, cooling down or draining, as a pure state
machine. Every method takes the time (`now`, seconds on a monotonic clock) from its caller,
so the rules are tested with a fake clock; the link (gateway.hosts) feeds it events.

- A status update makes a host up (or draining, when the host says it is shutting down).
- A lost link (the stream broke, or its watchdog saw no update in time) makes it down.
- COOLDOWN_FAILURES request failures within COOLDOWN_WINDOW_S, or a link lost while up (a
  flapping host), send it to cool down: no requests until the period has passed and a probe
  generation succeeds. Each failed probe doubles the period, up to its cap.
"""

import enum
from collections import deque
from dataclasses import dataclass, field

COOLDOWN_FAILURES = 3
COOLDOWN_WINDOW_S = 30.0
COOLDOWN_S = (5.0, 300.0)  # first period, cap


class HostState(enum.Enum):
    UP = "up"
    DOWN = "down"
    COOLING_DOWN = "cooling_down"
    DRAINING = "draining"


@dataclass
class Standing:
    state: HostState = HostState.DOWN
    detail: str = "not contacted yet"
    since: float = 0.0  # when the state was entered
    contacted: bool = False  # the gateway has tried to reach the host at least once
    ever_up: bool = False  # the host has been up at least once since the gateway started
    # The last time the link broke, the host answered (it refused us: a wrong token, TLS):
    # it is listening, so it is not one still starting up.
    answered: bool = False
    failures: deque[float] = field(default_factory=deque)
    cooldown_s: float = COOLDOWN_S[0]
    cooldown_until: float = 0.0

    @property
    def routable(self) -> bool:
        return self.state is HostState.UP

    def _enter(self, state: HostState, detail: str, now: float) -> bool:
        changed = state is not self.state
        if changed:
            self.since = now
        self.state, self.detail = state, detail
        return changed

    def updated(self, now: float, *, draining: bool) -> bool:
        """A status update arrived. Returns whether the state changed."""
        self.contacted = True
        if self.state is HostState.COOLING_DOWN:
            return False  # only a probe ends a cool-down
        if draining:
            return self._enter(HostState.DRAINING, "the host is shutting down", now)
        self.ever_up = True
        if self.state is HostState.UP:
            return False
        return self._enter(HostState.UP, "its status stream is live", now)

    def lost(self, now: float, why: str, *, answered: bool = False) -> bool:
        """The link to the host broke (`answered`: the host itself refused the link). Returns
        whether the state changed."""
        self.contacted = True
        self.answered = answered
        if self.state is HostState.UP and self.failed(now, why):
            return True
        if self.state is HostState.COOLING_DOWN:
            return False
        return self._enter(HostState.DOWN, why, now)

    def failed(self, now: float, why: str) -> bool:
        """A request failed for a reason of the host's. Returns whether the host started to
        cool down."""
        self.failures.append(now)
        while self.failures and now - self.failures[0] > COOLDOWN_WINDOW_S:
            self.failures.popleft()
        if len(self.failures) < COOLDOWN_FAILURES or self.state is HostState.COOLING_DOWN:
            return False
        self.failures.clear()
        self.cooldown_until = now + self.cooldown_s
        return self._enter(
            HostState.COOLING_DOWN,
            f"{COOLDOWN_FAILURES} failures within {COOLDOWN_WINDOW_S:.0f} s, the last: {why}; "
            f"probing again in {self.cooldown_s:.0f} s",
            now,
        )

    def probe_in(self, now: float) -> float:
        """Seconds until the cool-down's next probe is due (0: now)."""
        return max(self.cooldown_until - now, 0.0)

    def probed(self, now: float, *, succeeded: bool) -> bool:
        """A probe generation ended. Returns whether the host is up again."""
        if self.state is not HostState.COOLING_DOWN:
            return False
        if succeeded:
            self.cooldown_s = COOLDOWN_S[0]
            return self._enter(HostState.UP, "a probe generation succeeded", now)
        self.cooldown_s = min(self.cooldown_s * 2, COOLDOWN_S[1])
        self.cooldown_until = now + self.cooldown_s
        self.detail = f"the probe generation failed; probing again in {self.cooldown_s:.0f} s"
        return False
