"""Prefix-aware routing with fake hosts and a fake clock: a prefix hit beats an idle host up to
the load threshold, load wins past it, a host that lost the prefix stops attracting it, and
the gateway's own record of what it sent bridges the time until the hosts report it. Then end
to end: two real hosts, a conversation's turns on the host that holds its start."""

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import structlog.testing

from airouter.openai_api import parse_request
from airouter.prefix import LINEAR_UNTIL, STEP, message_blocks, prefix_of, prompt_blocks
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2, host_status_pb2
from gateway import router
from gateway.generation import Finished, FinishReason, GenerateRequest, Routing, request_prefix
from gateway.hosts import Host, HostPool
from gateway.prefixes import STATUS_LAG_S, PrefixMemory, PrefixPolicy
from gateway.server import start_gateway
from gateway.service import CloudRouting, GatewayService
from gateway.upstream import OpenAIUpstream, UpstreamSettings
from modelhost.config import embedded_chat_model_config
from tests.conftest import LoopThread, gateway_config, wait_for_health, wait_until
from tests.processes import ServerProcess
from tests.streaming import collect, gateway_request
from tests.test_service import MODEL, Observer, fake_host, finish, plays, serve, token

DOC = "A long document. " * 400  # ~6.8 kB: ~1,700 tokens
CHAT = [("system", DOC), ("user", "What is it about?")]


def chat_request(messages: list[tuple[str, str]]) -> GenerateRequest:
    return GenerateRequest(MODEL, messages=tuple(messages))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def host(address: str, *, busy: int = 0, queued: int = 0, slots: int = 4) -> Host:
    made = fake_host(address, plays(token("x"), finish()))
    status = made.model_status(MODEL)
    assert status is not None
    status.slots, status.slots_busy, status.queue_depth = slots, busy, queued
    return made


def report(h: Host, held: dict[int, int], at: float) -> None:
    """A new status from `h`, received at `at`, holding these prefix blocks."""
    assert h.status is not None
    status = host_status_pb2.HostStatus()
    status.CopyFrom(h.status)
    del status.models[0].cached_prefixes[:]
    for block, tokens in held.items():
        status.models[0].cached_prefixes.add(hash=block, tokens=tokens)
    h.status, h.status_received_at = status, at


def rank(hosts: list[Host], memory: PrefixMemory, blocks: list, **policy: int) -> list:
    return router.candidates(
        hosts,
        MODEL,
        rng=random.Random(0),
        hit=lambda h, m: memory.expected_hit(h, m.name, blocks),
        policy=PrefixPolicy(**policy),  # type: ignore[arg-type]
    )


def holding(h: Host, blocks: list, tokens: int, clock: Clock) -> None:
    report(h, {blocks[0].hash: tokens}, clock.now)


def assert_load_alone(ranked: list, hosts: list[Host]) -> None:
    """The ranking is what load alone gives: no prefix moved anything."""
    alone = router.candidates(hosts, MODEL, rng=random.Random(0))
    assert [c.host for c in ranked] == [c.host for c in alone]
    assert ranked[0].prefix_tokens == 0 and "holds" not in ranked[0].reason


def test_conversations_sharing_messages_share_their_block_hashes() -> None:
    first = message_blocks(CHAT)
    turn_two = message_blocks([*CHAT, ("assistant", "Documents."), ("user", "Sure?")])
    other = message_blocks([("system", DOC + "!"), CHAT[1]])
    assert [b.hash for b in turn_two[:2]] == [b.hash for b in first]
    assert first[0].end == len(DOC.encode()) and turn_two[-1].end > first[-1].end
    assert other[0].hash != first[0].hash
    # A role is part of what is hashed: the same words from another speaker are another prefix.
    assert message_blocks([("user", DOC)])[0].hash != first[0].hash


def test_a_raw_prompt_s_blocks_end_every_step_then_at_doubling_sizes() -> None:
    blocks = prompt_blocks("x" * (100 * 1024))
    ends = [b.end for b in blocks]
    assert ends[:8] == [STEP * i for i in range(1, 9)]
    assert ends[8:] == [LINEAR_UNTIL * 2, LINEAR_UNTIL * 4, LINEAR_UNTIL * 8]
    assert prompt_blocks("short") == []
    # Same start, same hashes; the first differing byte changes every block from its own on.
    a, b = prompt_blocks("y" * 3500), prompt_blocks("y" * 2500 + "z" * 1000)
    assert a[:2] == b[:2] and a[2:] != b[2:]


def test_the_gateway_hashes_a_request_as_the_host_hashes_its_messages() -> None:
    request = chat_request(CHAT)
    assert request_prefix(request).blocks == message_blocks(CHAT)
    assert request_prefix(GenerateRequest(MODEL, prompt=DOC)).blocks == prompt_blocks(DOC)
    # And the same size, so both turn a block's end into tokens alike (serving.py's prefix_of).
    assert request_prefix(GenerateRequest(MODEL, prompt=DOC)) == prefix_of(DOC, None)
    assert request_prefix(request) == prefix_of(None, CHAT)


def test_a_prefix_hit_beats_an_idle_host_while_the_holder_has_a_slot_or_a_short_queue() -> None:
    clock, memory, blocks = Clock(), PrefixMemory(Clock()), message_blocks(CHAT)
    idle, holder = host("idle:1"), host("holder:1", busy=3)
    holding(holder, blocks, 1700, clock)
    ranked = rank([idle, holder], memory, blocks)
    assert ranked[0].host is holder and ranked[0].prefix_tokens == 1700
    assert "holds ~1700 prompt tokens" in ranked[0].reason
    # Full, nothing queued: the request would wait for the first slot to free; within the gap.
    holder.status.models[0].slots_busy = 4  # type: ignore[union-attr]
    assert rank([idle, holder], memory, blocks)[0].host is holder
    # The gap is the operator's: 0 sends it to the idle host instead.
    assert rank([idle, holder], memory, blocks, max_queue_gap=0)[0].host is idle


def test_load_wins_when_the_holder_s_queue_is_much_longer() -> None:
    clock, memory, blocks = Clock(), PrefixMemory(Clock()), message_blocks(CHAT)
    idle, holder = host("idle:1"), host("holder:1", busy=4, queued=2)
    holding(holder, blocks, 1700, clock)
    ranked = rank([idle, holder], memory, blocks)
    assert ranked[0].host is idle and ranked[0].prefix_tokens == 0
    assert "load wins over holder:1" in ranked[0].reason
    assert [c.host for c in ranked] == [idle, holder]  # still the fallback


def test_hits_below_the_minimum_do_not_count() -> None:
    clock, memory, blocks = Clock(), PrefixMemory(Clock()), message_blocks(CHAT)
    idle, holder = host("idle:1"), host("holder:1", busy=4)
    holding(holder, blocks, 40, clock)
    assert rank([idle, holder], memory, blocks, min_tokens=64)[0].host is idle
    assert rank([idle, holder], memory, blocks, min_tokens=32)[0].host is holder


def test_between_hosts_that_both_hold_it_the_less_loaded_one_is_chosen() -> None:
    clock, memory, blocks = Clock(), PrefixMemory(Clock()), message_blocks(CHAT)
    busy, quiet = host("busy:1", busy=3), host("quiet:1", busy=0)
    holding(busy, blocks, 1700, clock)
    holding(quiet, blocks, 1650, clock)  # near-equal
    for _ in range(5):
        assert rank([busy, quiet], memory, blocks)[0].host is quiet


def test_the_deepest_shared_block_is_the_hit() -> None:
    clock, memory = Clock(), PrefixMemory(Clock())
    turn_two = [*CHAT, ("assistant", "Documents."), ("user", "Sure?")]
    blocks = message_blocks(turn_two)
    shallow, deep = host("shallow:1"), host("deep:1")
    report(shallow, {blocks[0].hash: 1690}, clock.now)
    report(deep, {blocks[0].hash: 1690, blocks[1].hash: 1700, blocks[2].hash: 1705}, clock.now)
    ranked = rank([shallow, deep], memory, blocks, min_tokens=1)
    assert ranked[0].host is deep and ranked[0].prefix_tokens == 1705


def test_a_host_that_lost_the_prefix_stops_attracting_it() -> None:
    clock, memory, blocks = Clock(), PrefixMemory(Clock()), message_blocks(CHAT)
    a, b = host("a:1"), host("b:1")
    b.status.models[0].slots_busy = 1  # type: ignore[union-attr]
    holding(b, blocks, 1700, clock)
    assert rank([a, b], memory, blocks)[0].host is b
    report(b, {}, clock.now + 1)  # its slots went to other prompts
    assert_load_alone(rank([a, b], memory, blocks), [a, b])


def test_what_the_gateway_sent_counts_until_the_host_reports_after_it_finished() -> None:
    clock = Clock()
    memory, prefix = PrefixMemory(clock), prefix_of(None, CHAT)
    blocks = prefix.blocks
    a, b = host("a:1"), host("b:1")
    report(a, {}, clock.now)
    report(b, {}, clock.now)
    sent = memory.sent(a, MODEL, prefix)
    assert sent is not None
    # In flight: a burst sharing the document follows it before any report shows it.
    ranked = rank([a, b], memory, blocks)
    assert ranked[0].host is a and ranked[0].prefix_tokens == blocks[-1].end // 4
    clock.now += 2.0
    memory.finished(sent, prefix, prompt_tokens=1800)
    report(a, {}, clock.now)  # a report that may predate the finish: still counted
    assert rank([a, b], memory, blocks)[0].prefix_tokens == 1800  # the host's own count now
    clock.now += STATUS_LAG_S
    report(a, {}, clock.now)  # taken after it: the host's word stands, and a holds nothing
    assert_load_alone(rank([a, b], memory, blocks), [a, b])


def test_an_unrelated_prompt_is_routed_by_load_alone() -> None:
    clock, memory = Clock(), PrefixMemory(Clock())
    a, b = host("a:1", busy=4), host("b:1")
    holding(a, message_blocks(CHAT), 1700, clock)
    other = message_blocks([("user", "Something else entirely, and short.")])
    assert rank([a, b], memory, other)[0].host is b


@pytest.mark.parametrize("conversation", ["c1", ""])
def test_one_service_keeps_a_conversation_on_its_host(conversation: str) -> None:
    a = fake_host("a:1", plays(token("x"), finish()))
    b = fake_host("b:1", plays(token("x"), finish()))

    async def run() -> list[str]:
        pool = HostPool([])
        pool.hosts = [a, b]
        upstream = OpenAIUpstream(UpstreamSettings(api_key=None))
        service = GatewayService(pool, CloudRouting(upstream), Observer(), 5.0)
        served = []
        for _ in range(12):
            request = GenerateRequest(
                MODEL, prompt="Hi", routing=Routing(conversation_id=conversation)
            )
            async for event in service.generate(request, 10.0):
                if isinstance(event, Finished):
                    served.append(event.host)
        return served

    served = asyncio.run(run())
    if conversation:
        assert len(set(served[1:])) == 1 and served[1] == served[0]
    else:
        assert set(served) == {"a:1", "b:1"}  # load alone spreads them


def test_an_overlong_conversation_id_is_refused() -> None:
    a = fake_host("a:1", plays(token("x"), finish()))
    request = GenerateRequest(MODEL, prompt="Hi", routing=Routing(conversation_id="c" * 300))
    _, error, _ = serve([a], request)
    assert error is not None and error.code == "INVALID_ARGUMENT"
    assert "conversation_id" in str(error) and not a.calls  # type: ignore[attr-defined]


def test_route_chosen_says_what_the_host_holds() -> None:
    a = fake_host("a:1", plays(token("x"), finish()))
    b = fake_host("b:1", plays(token("x"), finish()))
    blocks = message_blocks(CHAT)
    report(b, {blocks[0].hash: 1700}, 0.0)
    request = chat_request(CHAT)
    with structlog.testing.capture_logs() as logs:
        out, error, _ = serve([a, b], request)
    assert error is None and out[-1].host == "b:1"
    route = next(e for e in logs if e["event"] == "route_chosen")
    assert route["host"] == "b:1" and route["prefix_tokens"] == 1700
    assert "holds ~1700 prompt tokens" in route["reason"]
    assert out[-1].reason is FinishReason.STOP


# --- end to end: two real hosts behind one gateway --------------------------------------


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Any]]:
    config = embedded_chat_model_config()
    assert config is not None and config.path is not None
    toml = tmp_path_factory.mktemp("hosts") / "models.toml"
    toml.write_text(
        f'[[models]]\nname = "chat"\npath = "{config.path}"\ncontext_length = 1024\n'
        "slots = 2\nbatch_tokens = 256\npreload = true\n"
    )
    hosts = [ServerProcess("modelhost", "serve", "--device", "cpu", "--config", str(toml))]
    hosts.append(ServerProcess("modelhost", "serve", "--device", "cpu", "--config", str(toml)))
    loop = LoopThread()
    gateway = loop.run(start_gateway(gateway_config([h.address for h in hosts])))
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        for host in hosts:
            wait_for_health(host.address)
        # Both hosts up with the model resident before the first route.
        wait_until(
            lambda: (
                all(
                    m.state == generate_pb2.MODEL_STATE_READY
                    for h in stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
                    for m in h.status.models
                )
                and len(stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts) == 2
            ),
            60,
        )
        yield [h.address for h in hosts], stub
    finally:
        channel.close()
        loop.run(gateway.stop(0))
        loop.close()
        for host in hosts:
            host.stop()


def chat(stub: Any, messages: list[tuple[str, str]]) -> Any:
    request = gateway_request(
        model="chat", messages=messages, max_tokens=8, temperature=0.0, ignore_eos=True
    )
    return collect(stub.Generate(request, timeout=60))


def reported_at(stub: Any, address: str) -> float:
    """When the host's status that the gateway holds was taken (the host's clock)."""
    listed = stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
    status = next(h.status for h in listed if h.address == address)
    return status.observed_at.ToNanoseconds() / 1e9


@pytest.mark.parametrize("after_reports", [False, True])
def test_a_conversation_s_next_turn_lands_where_its_start_is_cached(
    two_hosts: tuple[list[str], Any], after_reports: bool
) -> None:
    """Turn 2 goes to the host that served turn 1, and its usage shows the reuse: right after
    turn 1 (the gateway's record of what it sent) and after the hosts' reports took over."""
    _, stub = two_hosts
    for n in range(4):
        document = f"Report {n} ({after_reports}). " + " ".join(
            f"item {n}-{i};" for i in range(120)
        )
        turn = [("system", document), ("user", "What is the first item?")]
        first = chat(stub, turn)
        assert first.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        if after_reports:  # the gateway has a report taken well after turn 1 ended
            lag = time.time() + STATUS_LAG_S + 0.5
            host = first.finished.host
            wait_until(lambda host=host, lag=lag: reported_at(stub, host) > lag)
        second = chat(stub, [*turn, ("assistant", first.text), ("user", "And the last?")])
        assert second.finished.host == first.finished.host, n
        # The whole first prompt (the document) came from the cache.
        assert second.finished.usage.cached_prompt_tokens >= first.finished.usage.prompt_tokens


def test_openai_s_user_field_is_the_conversation_hint() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "user": "alice"}
    assert parse_request(body, chat=True).user == "alice"


def test_routing_looks_at_a_bounded_number_of_blocks_whatever_the_prompt() -> None:
    """Scoring a chat of 20,000 messages against a host's sent prompts costs what scoring one
    of 40 does: routing keeps the last blocks (where a next turn parts) and a sample of the
    start, at the same positions in every prompt."""
    messages = tuple(("user" if i % 2 else "assistant", f"m{i}") for i in range(20_000))
    prefix = request_prefix(GenerateRequest(MODEL, messages=messages))
    whole = message_blocks(list(messages))
    assert len(prefix.blocks) <= 64
    assert prefix.blocks[-32:] == whole[-32:] and prefix.blocks[:4] == whole[:4]
    memory, a = PrefixMemory(Clock()), host("a:1")
    sent = memory.sent(a, MODEL, prefix)
    assert sent is not None and len(sent.tokens) <= 64
    # The conversation's next turn is found where its start went.
    next_turn = GenerateRequest(MODEL, messages=(*messages, ("assistant", "ok"), ("user", "?")))
    assert memory.expected_hit(a, MODEL, request_prefix(next_turn).blocks) > 0
