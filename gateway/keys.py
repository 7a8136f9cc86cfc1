"""API keys: one per person or program sharing the gateway, each limited to some models, a
request rate, a token rate, a daily token quota and a cloud budget, with its usage recorded.

The KeyRing holds every key in memory (looked up by the SHA-256 of the presented secret); the
KeyStore keeps keys and usage in the gateway's store. Admission reserves what a request can at
most use (its prompt's bytes, an upper bound of its tokens, plus its max_tokens) and a request
is let in only while a limit's used and reserved tokens are below it: however many race for
the last tokens of a quota, the total ends at most one request's worth over, and a stream that
crosses a quota finishes. One gateway on its own SQLite file counts in memory; gateways
sharing PostgreSQL count in it (gateway.key_store), so the limits hold across all of them,
and hear of keys created or revoked on the others at once (with a poll behind it).
"""

import asyncio
import datetime
import fnmatch
import hashlib
import math
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from airouter.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from gateway.database import StoreUnavailable
from gateway.key_store import KeyLimits, KeyRecord, KeyStore, UsageRow, Window

_log = structlog.get_logger()

# Secrets look like this, so a leaked one is recognisable (and scanners can be taught it).
SECRET_PREFIX = "air-"
WINDOW_S = 60.0
# Tokens a request without max_tokens is counted for until it ends.
DEFAULT_RESERVE = 4096
# How long a shared reservation outlives its request's deadline (or a request without one's
# start): the tokens a gateway that died held come back after it.
RESERVATION_S = 3600.0
# How often gateways sharing a store reload the keys and their spend, should a notification be
# missed.
KEYS_REFRESH_S = 10.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def utc_day(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d")


def _seconds_to_midnight(at: float) -> float:
    now = datetime.datetime.fromtimestamp(at, datetime.UTC)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


@dataclass
class _Counts:
    """What one key's limits are checked against, live."""

    starts: deque[float] = field(default_factory=deque)  # request starts in the last minute
    minute: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens)
    minute_tokens: int = 0
    day: str = ""
    day_tokens: int = 0
    reserved: int = 0  # tokens held by requests in flight
    spend_usd: float = 0.0  # all time

    def window(self) -> Window:
        return Window(
            starts=len(self.starts),
            oldest_start=self.starts[0] if self.starts else None,
            minute_tokens=self.minute_tokens,
            oldest_tokens=self.minute[0][0] if self.minute else None,
            day_tokens=self.day_tokens,
            reserved=self.reserved,
            spend_usd=self.spend_usd,
        )


@dataclass(frozen=True)
class Admission:
    """A request let in under a key; settle it when it ends."""

    key: str
    model: str
    reserved: int
    reservation: str = ""  # its row in the store, where the limits are counted there


class KeyRing:
    def __init__(
        self, store: KeyStore, clock: Callable[[], float] = time.time, shared: bool = False
    ) -> None:
        self._store = store
        self._clock = clock
        self.shared = shared  # limits counted in the store, for several gateways
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._counts: dict[str, _Counts] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    @classmethod
    async def load(cls, store: KeyStore, clock: Callable[[], float] = time.time) -> "KeyRing":
        """The keys in the store, with today's tokens and each key's spend."""
        ring = cls(store, clock, shared=store.db.dialect == "postgresql")
        for record in await store.keys():
            ring._remember(record)
        today = utc_day(clock())
        for row in await store.usage():
            counts = ring._counts.setdefault(row.name, _Counts(day=today))
            counts.spend_usd += row.cloud_cost_usd
            if row.day == today:
                counts.day_tokens += row.prompt_tokens + row.completion_tokens
        store.db.on_notify(ring._heard)
        if ring.shared:
            ring._refreshing = asyncio.create_task(ring._refresh_forever())
        return ring

    @property
    def store(self) -> KeyStore:
        return self._store

    async def close(self) -> None:
        tasks = [*self._reloads, *([self._refreshing] if self._refreshing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _heard(self, payload: str) -> None:
        if payload in ("keys", "") and self.shared:
            task = asyncio.ensure_future(self.refresh())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(KEYS_REFRESH_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Reloads the keys (created or revoked on another gateway) and their spend."""
        try:
            records = await self._store.keys()
            spend = await self._store.spend()
        except StoreUnavailable:
            return  # the keys known stay in force until the store is back
        for record in records:
            self._remember(record)
        for name, usd in spend.items():
            self._counts.setdefault(name, _Counts()).spend_usd = usd

    def _remember(self, record: KeyRecord) -> None:
        old = self._by_name.get(record.name)
        if old is not None:
            self._by_hash.pop(old.secret_sha256, None)
        self._by_hash[record.secret_sha256] = record
        self._by_name[record.name] = record

    # --- administration ------------------------------------------------------------

    async def create(self, name: str, limits: KeyLimits) -> tuple[KeyRecord, str]:
        """A new key and its secret, which is shown once and never stored."""
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"the key name {name!r} is not usable: 1-64 letters, digits and . _ @ -, "
                "starting with a letter or digit"
            )
        _check_limits(limits)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            name, secret_hash(secret), secret[: len(SECRET_PREFIX) + 4], limits, self._clock()
        )
        await self._store.add(record)
        self._remember(record)
        return record, secret

    async def revoke(self, name: str) -> KeyRecord:
        record = self._by_name.get(name)
        if record is None or record.revoked_at is not None:
            raise NotFound(f"no key named {name!r} is active; `airouter keys list` shows them")
        at = self._clock()
        await self._store.revoke(name, at)
        revoked = KeyRecord(
            record.name, record.secret_sha256, record.hint, record.limits, record.created_at, at
        )
        self._remember(revoked)
        return revoked

    def keys(self) -> list[KeyRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    def spend(self, name: str) -> float:
        counts = self._counts.get(name)
        return counts.spend_usd if counts else 0.0

    # --- the request path (in memory, on the event loop) -------------------------------

    def identify(self, secret: str) -> KeyRecord | None:
        """The key whose secret this is (revoked and expired ones too, so the door can say
        so); None for any other string."""
        if not secret.startswith(SECRET_PREFIX):
            return None
        return self._by_hash.get(secret_hash(secret))

    def validate(self, presented: str) -> bool:
        """True for a valid key's secret, False for any string that is no key; raises
        Unauthenticated for a revoked or expired key (airouter.security.KeyValidator)."""
        record = self.identify(presented)
        if record is None:
            return False
        self.check_valid(record)
        return True

    def get(self, name: str) -> KeyRecord | None:
        return self._by_name.get(name)

    def allows(self, record: KeyRecord, model: str) -> None:
        """Raises unless the key is valid and may use `model` (for requests that use no
        tokens, such as counting them)."""
        self.check_valid(record)
        self._check_model(record, model)

    def _check_model(self, record: KeyRecord, model: str) -> None:
        patterns = record.limits.models
        if patterns and not any(fnmatch.fnmatchcase(model, p) for p in patterns):
            raise PermissionDenied(
                f"the key {record.name!r} may use only the models {', '.join(patterns)}; "
                f"{model!r} is not one of them"
            )

    def check_valid(self, record: KeyRecord) -> None:
        if record.revoked_at is not None:
            raise Unauthenticated(f"the key {record.name!r} was revoked; ask for a new one")
        expires = record.limits.expires_at
        if expires is not None and self._clock() >= expires:
            when = datetime.datetime.fromtimestamp(expires, datetime.UTC).isoformat()
            raise Unauthenticated(f"the key {record.name!r} expired at {when}; ask for a new one")

    def cloud_spent(self, record: KeyRecord) -> bool:
        """Whether the key's cloud budget is used up (it then runs on local hosts only)."""
        budget = record.limits.cloud_budget_usd
        return budget is not None and self.spend(record.name) >= budget

    async def admit(
        self, record: KeyRecord, model: str, most_tokens: int, time_left_s: float | None = None
    ) -> Admission:
        """Lets a request for `model` in under the key, reserving `most_tokens`; raises
        Unauthenticated, PermissionDenied or ResourceExhausted (with a retry-after) when the
        key cannot make it now."""
        self.allows(record, model)
        now = self._clock()
        counts = self._current(record.name, now)
        if self.shared:
            reservation = uuid.uuid4().hex
            window = await self._store.admit(
                record.name,
                now,
                counts.day,
                reservation,
                most_tokens,
                now + (time_left_s or 0.0) + RESERVATION_S,
                lambda window: _check(record, window, now),
            )
            counts.spend_usd = window.spend_usd
            return Admission(record.name, model, most_tokens, reservation)
        _check(record, counts.window(), now)
        counts.starts.append(now)
        counts.reserved += most_tokens
        return Admission(record.name, model, most_tokens)

    def settle(
        self, admission: Admission, prompt_tokens: int, completion_tokens: int, cost_usd: float
    ) -> tuple[UsageRow, Callable[[], Awaitable[None]]]:
        """Ends an admitted request: its reservation becomes what it used. Returns its usage
        and the write that records it in the store (the caller runs the writes in order)."""
        now = self._clock()
        counts = self._current(admission.key, now)
        counts.spend_usd += cost_usd
        row = UsageRow(
            admission.key,
            counts.day,
            admission.model,
            1,
            prompt_tokens,
            completion_tokens,
            cost_usd,
        )
        if self.shared:
            return row, lambda: self._store.settle(admission.reservation, row, now)
        counts.reserved -= admission.reserved
        used = prompt_tokens + completion_tokens
        if used:
            counts.minute.append((now, used))
            counts.minute_tokens += used
            counts.day_tokens += used
        return row, lambda: self._store.record(row)

    def _current(self, name: str, now: float) -> _Counts:
        """The key's counts with the minute's window moved to now and the day turned over."""
        counts = self._counts.setdefault(name, _Counts())
        while counts.starts and counts.starts[0] <= now - WINDOW_S:
            counts.starts.popleft()
        while counts.minute and counts.minute[0][0] <= now - WINDOW_S:
            counts.minute_tokens -= counts.minute.popleft()[1]
        today = utc_day(now)
        if counts.day != today:
            counts.day, counts.day_tokens = today, 0
        return counts


def _check(record: KeyRecord, window: Window, now: float) -> None:
    """Raises ResourceExhausted, with when to retry, where the key has reached a limit."""
    limits = record.limits
    if limits.rpm is not None and window.starts >= limits.rpm:
        wait = (window.oldest_start or now) + WINDOW_S - now
        raise ResourceExhausted(
            f"the key {record.name!r} made {limits.rpm} requests in the last minute, its "
            f"limit; retry in {math.ceil(wait)} s",
            retry_after_s=wait,
        )
    if limits.tpm is not None and window.minute_tokens + window.reserved >= limits.tpm:
        wait = window.oldest_tokens + WINDOW_S - now if window.oldest_tokens else 1.0
        raise ResourceExhausted(
            f"the key {record.name!r} used its {limits.tpm} tokens a minute (requests in "
            f"flight count what they may use); retry in {math.ceil(wait)} s",
            retry_after_s=wait,
        )
    quota = limits.tokens_per_day
    if quota is not None and window.day_tokens + window.reserved >= quota:
        wait = _seconds_to_midnight(now)
        raise ResourceExhausted(
            f"the key {record.name!r} used its {quota} tokens for today (UTC; requests in "
            f"flight count what they may use); retry in {math.ceil(wait)} s, after midnight",
            retry_after_s=wait,
        )


def _check_limits(limits: KeyLimits) -> None:
    for name in ("rpm", "tpm", "tokens_per_day"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            raise InvalidArgument(f"{name} is {value}; use a positive number, or leave it unset")
    budget = limits.cloud_budget_usd
    if budget is not None and (not math.isfinite(budget) or budget < 0):
        raise InvalidArgument(f"cloud_budget_usd is {budget}; use dollars >= 0")
    for pattern in limits.models:
        if not pattern or len(pattern) > 200:
            raise InvalidArgument(f"the model pattern {pattern!r} is empty or too long")
