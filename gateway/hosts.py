"""The links to the modelhosts the gateway knows, each with a live view kept by one
WatchStatus stream; the host's standing (up, down, cooling down, draining) is gateway.standing's.

On (re)connecting, a host's catalog (names, aliases, capabilities, context) comes from
ListModels; from then on its WatchStatus stream says which models are resident and how busy
they are. A broken stream, or one that sends nothing for WATCHDOG_INTERVALS of its interval (a
host that vanished without a TCP reset: a closed lid, a paused VM, a pulled cable), marks the
host down at once, and it reconnects with jittered exponential backoff. gRPC keepalive on every
channel notices a dead peer under an idle or a busy stream alike. A host that keeps failing
requests cools down and rejoins only after a real one-token generation succeeds on it.

The link speaks gRPC through the generated stub: it builds the host's own GenerateRequest
from the gateway's request, field by field, sending only what a host needs (never how the
gateway routes: a conversation id is often an e-mail address); what leaves it are the
gateway's events (gateway.generation) and the domain errors of airouter.errors.
"""

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from airouter import tracing
from airouter.errors import AirouterError, Unavailable
from airouter.grpc_server import error_from_rpc
from airouter.output_wire import tool_call_from_pb
from airouter.security import bearer
from airouter.v1 import (
    embed_pb2,
    generate_pb2,
    host_status_pb2,
    model_host_pb2,
    model_host_pb2_grpc,
)
from gateway.embeddings import Embeddings, EmbedRequest
from gateway.generation import (
    Event,
    Finished,
    FinishReason,
    GenerateRequest,
    Sampling,
    Stopping,
    Token,
)
from gateway.offload import heavy, off_loop
from gateway.standing import HostState, Standing
from gateway.wire import fill_generation, finished_from_pb, token_from_pb

_log = structlog.get_logger()

# How long a host gets to answer ListModels when the gateway connects.
LIST_TIMEOUT_S = 2.0
# The most time between two status updates a host sends.
WATCH_INTERVAL_MS = 1000
# A status stream silent for this many intervals is a host that vanished.
WATCHDOG_INTERVALS = 3
# Reconnecting to a host that is down: first wait, cap (seconds), jittered +-50%. The first
# waits are short so a host started just after the gateway (`airouter up`) joins at once.
RECONNECT_BACKOFF_S = (0.1, 15.0)
# For this long after the gateway starts, a request that no host can serve yet waits (within
# its deadline, at most the first-message budget) while a host has not been up once, and such a
# host is retried at least every STARTING_RETRY_S.
STARTING_S = 30.0
STARTING_RETRY_S = 0.5
# Passing a message on that takes this long means the client is behind (merged_responses).
SLOW_WRITE_S = 0.005
# After a stream's last message, how long its call gets to end by itself before it is cancelled.
FINISH_WAIT_S = 1.0
# A retired host's streams get this long to finish before its channel closes.
RETIRE_GRACE_S = 3600.0
# HTTP/2 pings on every gateway->host channel: one after 10 s without traffic, and the link is
# dead when its answer takes over 5 s. The hosts accept a ping every 5 s (grpc_server).
# A channel whose host is not listening yet (the gateway started first) tries again after
# 0.1 s, then backs off to 2 s: gRPC's default (1 s, up to 120 s) made the first request of a
# launch wait a second after the model was ready.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass
class Host:
    """One modelhost: its channel, catalog, last status and standing with the gateway."""

    address: str
    channel: grpc.aio.Channel
    models: list[generate_pb2.ModelInfo] = field(default_factory=list)
    status: host_status_pb2.HostStatus | None = None
    standing: Standing = field(default_factory=lambda: Standing(since=time.monotonic()))
    in_flight: dict[str, int] = field(default_factory=dict)  # relayed requests per model
    # Sent with every call: the bearer token, so never in a repr.
    metadata: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # The Generate calls in flight, each with why it was dropped ("" while it runs).
    calls: dict[grpc.aio.UnaryStreamCall, str] = field(default_factory=dict, repr=False)
    status_received_at: float = 0.0  # time.monotonic() when `status` came
    # cached_prefixes of `status` by model, made on first use.
    _held: dict[str, dict[int, int]] = field(default_factory=dict, repr=False)
    _held_of: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.stub = model_host_pb2_grpc.ModelHostStub(self.channel)

    @property
    def state(self) -> HostState:
        return self.standing.state

    @property
    def detail(self) -> str:
        return self.standing.detail

    @property
    def routable(self) -> bool:
        return self.standing.routable

    @property
    def contacted(self) -> bool:
        return self.standing.contacted

    @property
    def state_since(self) -> float:
        """When the host entered its state, as wall-clock seconds."""
        return time.time() - (time.monotonic() - self.standing.since)

    async def stream(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> AsyncGenerator[Event, None]:
        """The host's Generate stream for the request (its model named as the host knows
        it), token deltas that pile up merged; a failure is raised as the domain error of its
        status. Closing the generator cancels the call, which stops the host's decoding."""
        pb = await off_loop(host_request, request) if heavy(request) else host_request(request)
        call = self.stub.Generate(
            pb, timeout=time_left_s, metadata=tracing.inject_metadata(self.metadata)
        )
        self.calls[call] = ""
        finished = False
        try:
            async with contextlib.aclosing(merged_responses(call)) as responses:
                async for response in responses:
                    if response.HasField("token"):
                        delta = response.token
                        if delta.choice_index or delta.logprobs:
                            yield token_from_pb(delta)
                        else:
                            yield Token(delta.text, delta.token_count)
                    elif response.HasField("tool_call"):
                        yield tool_call_from_pb(response.tool_call)
                    else:
                        finished = True
                        yield finished_from_pb(response.finished)
        except grpc.aio.AioRpcError as exc:
            if not self.calls.get(call):
                raise error_from_rpc(exc) from None
        finally:
            dropped = self.calls.pop(call, "")
            if finished:
                # The last message is in: let the call end with its status rather than cancel
                # it, which the host would see (and count) as a client that left.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(FINISH_WAIT_S):  # no task, as wait_for makes
                        await call.code()
            call.cancel()  # no-op once the call has ended
        if dropped:
            raise Unavailable(f"host {self.address} stopped answering: {dropped}")

    async def count_tokens(
        self, request: GenerateRequest, time_left_s: float | None
    ) -> tuple[int, str]:
        """The host's count of the request's prompt tokens, and its name for the model."""
        pb = await off_loop(host_request, request) if heavy(request) else host_request(request)
        try:
            counted = await self.stub.CountTokens(
                model_host_pb2.CountTokensRequest(request=pb),
                timeout=time_left_s,
                metadata=tracing.inject_metadata(self.metadata),
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return counted.input_tokens, counted.model

    async def embed(self, request: EmbedRequest, time_left_s: float | None) -> Embeddings:
        """The host's embeddings of the request's inputs."""
        pb = embed_pb2.EmbedRequest(
            request_id=request.request_id,
            model=request.model,
            inputs=[
                embed_pb2.EmbedInput(text=item)
                if isinstance(item, str)
                else embed_pb2.EmbedInput(tokens=embed_pb2.TokenIds(ids=item))
                for item in request.inputs
            ],
            dimensions=request.dimensions,
        )
        try:
            answer = await self.stub.Embed(
                pb, timeout=time_left_s, metadata=tracing.inject_metadata(self.metadata)
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        vectors = np.array([e.values for e in answer.embeddings], dtype=np.float32)
        return Embeddings(vectors, answer.prompt_tokens, answer.model, self.address)

    def drop_calls(self, why: str) -> None:
        """Ends the calls in flight: the host is gone, though its TCP connection may linger
        (nothing reset it), so they would otherwise wait for their deadline."""
        for call in list(self.calls):
            self.calls[call] = why
            call.cancel()

    def model_status(self, name: str) -> host_status_pb2.ModelStatus | None:
        if self.status is None:
            return None
        return next((m for m in self.status.models if m.name == name), None)

    def held_prefixes(self, name: str) -> dict[int, int]:
        """The prefix blocks the host last reported holding for a model: hash -> tokens."""
        if self._held_of is not self.status:
            self._held, self._held_of = {}, self.status
        held = self._held.get(name)
        if held is None:
            status = self.model_status(name)
            held = {p.hash: p.tokens for p in status.cached_prefixes} if status else {}
            self._held[name] = held
        return held

    def state_of(self, name: str) -> generate_pb2.ModelState:
        """A model's live state on this host (MODEL_STATE_*)."""
        status = self.model_status(name)
        return status.state if status else generate_pb2.MODEL_STATE_UNSPECIFIED


# getaddrinfo's signature, for a resolver other than the system's.
Resolver = Callable[[str, str], Awaitable[list[tuple[Any, ...]]]]


class HostPool:
    """Every known host, each watched by its own task.

    Hosts are configured as HOST:PORT entries; an entry whose name resolves to several
    addresses (a Kubernetes headless service) stands for one host per address, re-resolved
    every dns_refresh_s. `reconcile` adds and retires hosts at run time; a retired host's
    streams finish before its channel closes.
    """

    def __init__(
        self,
        entries: list[str],
        *,
        channel: Callable[[str, str | None], grpc.aio.Channel] | None = None,
        dns_refresh_s: float = 30.0,
        token: str | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.entries = list(dict.fromkeys(entries))
        self.hosts: list[Host] = []
        # (address, the DNS name it was found under) -> channel
        self._channel = channel or (
            lambda address, _name: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._metadata = bearer(token)
        self._resolver = resolver
        self._dns_refresh_s = dns_refresh_s
        self._resolved: dict[str, list[str]] = {}  # entry -> its addresses, last resolution
        self._expanded: set[str] = set()  # entries that stand for one host per address
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._started = time.monotonic()
        # A SIGHUP reload and a DNS refresh reconcile one at a time, so neither reverts the
        # other's host list.
        self._reconciling = asyncio.Lock()
        self._retire_hooks: list[Callable[[str], None]] = []

    def on_retire(self, hook: Callable[[str], None]) -> None:
        """Calls hook(address) when a host leaves the pool, to drop what is kept of it."""
        self._retire_hooks.append(hook)

    async def start(self) -> None:
        await self.reconcile()
        self._spawn(self._refresh_dns())

    async def close(self) -> None:
        for task in [*self._watchers.values(), *self._background]:
            task.cancel()
        await asyncio.gather(*self._watchers.values(), *self._background, return_exceptions=True)
        await asyncio.gather(*(h.channel.close() for h in self.hosts))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reconcile(self, entries: list[str] | None = None) -> None:
        """Makes the pool match the entries (the configured ones when None): new addresses
        get a host, addresses no entry stands for any more are retired."""
        async with self._reconciling:
            await self._reconcile(entries)

    async def _reconcile(self, entries: list[str] | None) -> None:
        if entries is not None:
            self.entries = list(dict.fromkeys(entries))
        wanted: dict[str, str | None] = {}  # address -> the name it stands for, if expanded
        for entry in self.entries:
            addresses = await self._resolve(entry)
            for address in addresses:
                wanted.setdefault(address, None if address == entry else _name_of(entry))
        known = {h.address for h in self.hosts}
        for address, name in wanted.items():
            if address not in known:
                host = Host(address, self._channel(address, name), metadata=self._metadata)
                self.hosts.append(host)
                self._watchers[address] = asyncio.create_task(self._watch(host))
                _log.info("host_added", host=address)
        for host in [h for h in self.hosts if h.address not in wanted]:
            self._retire(host)
        self._notify()

    async def _resolve(self, entry: str) -> list[str]:
        """The addresses an entry stands for: itself for an IP or a name with one address,
        one per address for a name with several (IPv4 preferred). When resolution fails or
        finds nothing, the last answer stands."""
        name, port = _name_of(entry), entry.rpartition(":")[2]
        try:
            ipaddress.ip_address(name)
            return [entry]
        except ValueError:
            pass
        try:
            if self._resolver is not None:
                infos = await self._resolver(name, port)
            else:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    name, port, type=socket.SOCK_STREAM
                )
        except (socket.gaierror, UnicodeError) as exc:
            _log.warning("host_name_unresolved", entry=entry, error=str(exc))
            return self._resolved.get(entry, [entry])
        v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
        v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})
        # A name that has stood for several hosts stays expanded when it scales down to one,
        # so that host keeps its place (and its streams) in the pool.
        if len(v4 or v6) > 1:
            self._expanded.add(entry)
        if entry in self._expanded:
            addresses = [f"{ip}:{port}" for ip in v4] or [f"[{ip}]:{port}" for ip in v6]
        else:
            addresses = [entry]
        if not addresses:
            return self._resolved.get(entry, [entry])
        self._resolved[entry] = addresses
        return addresses

    async def _refresh_dns(self) -> None:
        while True:
            await asyncio.sleep(self._dns_refresh_s)
            await self.reconcile()

    def _retire(self, host: Host) -> None:
        """Stops routing to a host; its channel closes once its streams have finished."""
        self.hosts.remove(host)
        self._watchers.pop(host.address).cancel()
        _log.info("host_removed", host=host.address, streams=sum(host.in_flight.values()))
        for hook in self._retire_hooks:
            hook(host.address)

        self._spawn(host.channel.close(grace=RETIRE_GRACE_S))

    def routable(self) -> list[Host]:
        return [h for h in self.hosts if h.routable]

    def starting(self) -> bool:
        """Whether some host may still be starting: it has not been tried yet, or, early in
        the gateway's life, it has not been up once and did not answer (a host started at the
        same time is not listening yet; one that refused the gateway's token is)."""
        if not all(h.contacted for h in self.hosts):
            return True
        return self._early() and not all(
            h.standing.ever_up or h.standing.answered for h in self.hosts
        )

    def _early(self) -> bool:
        return time.monotonic() - self._started < STARTING_S

    async def wait_for_change(self, timeout_s: float) -> None:
        """Returns at the next change of any host's view, or after timeout_s."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def first_contact(self, timeout_s: float) -> None:
        """Waits until every host has been tried once (the gateway has just started), for at
        most timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not all(h.contacted for h in self.hosts) and time.monotonic() < deadline:
            await self.wait_for_change(deadline - time.monotonic())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _changed_standing(self, host: Host, before: HostState) -> None:
        """Logs a change of the host's state and tells the waiters."""
        if host.state is not before:
            bad = host.state in (HostState.DOWN, HostState.COOLING_DOWN)
            log = _log.warning if bad else _log.info
            log("host_" + host.state.value, host=host.address, detail=host.detail)
        self._notify()

    # --- failures and cool-down ------------------------------------------------------

    def record_failure(self, host: Host, why: str) -> None:
        """A request failed on the host for a reason of the host's; enough of them within
        the window and the host cools down."""
        before = host.state
        if host.standing.failed(time.monotonic(), why):
            self._changed_standing(host, before)

    async def _probe(self, host: Host) -> bool:
        """A real one-token generation on the host's first ready model (or first model)."""
        ready = [m.name for m in host.models if host.state_of(m.name) == _READY]
        names = ready or [m.name for m in host.models]
        if not names:
            return False
        request = GenerateRequest(
            names[0], prompt="Hello", sampling=Sampling(temperature=0.0), stopping=Stopping(1)
        )
        try:
            async for event in host.stream(request, 30.0):
                if isinstance(event, Finished):
                    return event.reason is not FinishReason.ERROR
        except AirouterError as exc:
            _log.info("host_probe_failed", host=host.address, error=str(exc))
        return False

    async def _end_cooldown(self, host: Host) -> None:
        """Waits out the cool-down, then probes until a generation succeeds."""
        while host.state is HostState.COOLING_DOWN:
            await asyncio.sleep(host.standing.probe_in(time.monotonic()))
            succeeded = await self._probe(host)
            if host.standing.probed(time.monotonic(), succeeded=succeeded):
                self._changed_standing(host, HostState.COOLING_DOWN)
                return

    # --- the watch loop --------------------------------------------------------------

    async def _watch(self, host: Host) -> None:
        cooldown: list[asyncio.Task[None]] = []
        try:
            await self._follow(host, cooldown)
        finally:
            for task in cooldown:
                task.cancel()

    async def _follow(self, host: Host, cooldown: list[asyncio.Task[None]]) -> None:
        """Keeps the host's view current for as long as it is in the pool."""
        backoff = RECONNECT_BACKOFF_S[0]
        silence_s = WATCHDOG_INTERVALS * WATCH_INTERVAL_MS / 1000
        while True:
            answered = False
            try:
                catalog = await host.stub.ListModels(
                    model_host_pb2.ListModelsRequest(),
                    timeout=LIST_TIMEOUT_S,
                    metadata=host.metadata,
                )
                host.models = list(catalog.models)
                stream = host.stub.WatchStatus(
                    model_host_pb2.WatchStatusRequest(interval_ms=WATCH_INTERVAL_MS),
                    metadata=host.metadata,
                )
                try:
                    while True:
                        # The watchdog: a host sends an update at least every interval.
                        async with asyncio.timeout(silence_s):
                            update = await stream.read()
                        if update is grpc.aio.EOF:
                            break
                        host.status = update.status
                        host.status_received_at = time.monotonic()
                        backoff = RECONNECT_BACKOFF_S[0]
                        before = host.state
                        host.standing.updated(time.monotonic(), draining=update.status.draining)
                        if host.state is HostState.COOLING_DOWN and (
                            not cooldown or cooldown[-1].done()
                        ):
                            cooldown.append(asyncio.create_task(self._end_cooldown(host)))
                        self._changed_standing(host, before)
                except TimeoutError:
                    why = f"no status update for {silence_s:.0f} s"
                    host.drop_calls(why)
                else:
                    if host.state is HostState.DRAINING:
                        # Its last update said so; it is down once it stops answering.
                        await asyncio.sleep(backoff)
                        continue
                    why = "the host ended its status stream"
                finally:
                    stream.cancel()
            except grpc.aio.AioRpcError as exc:
                why = f"{exc.code().name}: {exc.details()}"
                answered = exc.code() not in _NOT_LISTENING
            host.status = None
            before = host.state
            host.standing.lost(time.monotonic(), why, answered=answered)
            self._changed_standing(host, before)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            starting = self._early() and not host.standing.ever_up
            backoff = min(backoff * 2, STARTING_RETRY_S if starting else RECONNECT_BACKOFF_S[1])


def host_request(request: GenerateRequest) -> model_host_pb2.GenerateRequest:
    """The host's request: what to generate, and nothing of how the gateway routes it."""
    pb = model_host_pb2.GenerateRequest()
    fill_generation(pb, request)
    return pb


async def merged_responses(
    call: grpc.aio.UnaryStreamCall,
) -> AsyncGenerator[model_host_pb2.GenerateResponse, None]:
    """The call's messages. While the client keeps up they are read and passed on one by one,
    one wake-up each. Once passing one on took SLOW_WRITE_S (the client is behind), a task of
    their own reads them from then on, and token deltas that arrive while earlier ones are
    still being written go out as one message: a host that streams faster than its client
    costs fewer writes. Raises the call's error after the messages that came before it."""
    while True:
        try:
            response = await call.read()
        except asyncio.CancelledError:
            # The call was cancelled under us (Host.drop_calls: the host vanished), not this
            # task: the stream just ends, and Host.stream says why.
            task = asyncio.current_task()
            if call.cancelled() and not (task and task.cancelling()):
                return
            raise
        if response is grpc.aio.EOF:
            return
        started = time.monotonic()  # not loop.time(): uvloop's is in ms, as of the last poll
        yield response
        if time.monotonic() - started >= SLOW_WRITE_S:
            break
    pending: deque[model_host_pb2.GenerateResponse] = deque()
    arrived = asyncio.Event()
    failure: list[grpc.aio.AioRpcError] = []
    done = False

    async def read() -> None:
        nonlocal done
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                pending.append(message)
                arrived.set()
        except grpc.aio.AioRpcError as exc:
            failure.append(exc)
        finally:
            done = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            while pending:
                response = pending.popleft()
                if response.HasField("token") and _same_choice(response, pending):
                    merged = response.token
                    texts, count = [merged.text], merged.token_count
                    while _same_choice(response, pending):
                        token = pending.popleft().token
                        texts.append(token.text)
                        count += token.token_count
                        merged.logprobs.extend(token.logprobs)
                    merged.text, merged.token_count = "".join(texts), count
                yield response
            if done and not pending:
                if failure:
                    raise failure[0]
                return
    finally:
        reader.cancel()


def _same_choice(
    response: model_host_pb2.GenerateResponse, pending: deque[model_host_pb2.GenerateResponse]
) -> bool:
    """Whether the next pending message is a token delta of the response's choice."""
    return bool(
        pending
        and pending[0].HasField("token")
        and pending[0].token.choice_index == response.token.choice_index
    )


def _name_of(entry: str) -> str:
    return entry.rpartition(":")[0].strip("[]")


_READY = generate_pb2.MODEL_STATE_READY
# How a host that is not listening (yet) fails: connection refused, or no answer in time.
_NOT_LISTENING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
