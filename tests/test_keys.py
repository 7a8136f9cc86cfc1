"""API keys: the KeyRing's limits on a fake clock (rates, quotas, racing for the last tokens,
restarts), then end to end through a gateway with an admin token: the CLI, every door, the
cloud budget against the fake OpenRouter, and the secret in no log and no metric."""

import asyncio
import datetime
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import pytest

from airouter import cli
from airouter.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from airouter.v1 import gateway_pb2, gateway_pb2_grpc, keys_pb2
from gateway.database import open_database
from gateway.key_store import KeyLimits, KeyStore, UsageRow
from gateway.keys import Admission, KeyRing
from gateway.schema import migrate
from gateway.server import start_gateway
from modelhost.config import HostConfig, embedded_model_config
from modelhost.server import start_host
from tests.conftest import (
    CONTEXT,
    LoopThread,
    gateway_config,
    scrape_metrics,
    until,
    wait_for_health,
)
from tests.fake_openrouter import API_KEY, COST_USD, FakeOpenRouter
from tests.streaming import gateway_request

# A Wednesday, 18:00 UTC: six hours before the quota day turns.
NOON = datetime.datetime(2026, 12, 2, 18, 0, tzinfo=datetime.UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = NOON

    def __call__(self) -> float:
        return self.now


def with_rings(
    url: str,
    body: Callable[..., Awaitable[Any]],
    clock: Clock | None = None,
    gateways: int = 1,
) -> Any:
    """body(ring, ...) with a KeyRing per gateway on the store at url (one SQLite file
    serves one gateway; several share PostgreSQL)."""

    async def run() -> Any:
        databases = [await open_database(url) for _ in range(gateways)]
        await migrate(databases[0])
        rings = [await KeyRing.load(KeyStore(d), clock or Clock()) for d in databases]
        try:
            return await body(*rings)
        finally:
            for keys in rings:
                await keys.close()
            for database in databases:
                await database.close()

    return asyncio.run(run())


async def settle(
    keys: KeyRing, admission: Admission, prompt: int, completion: int, cost: float
) -> UsageRow:
    row, write = keys.settle(admission, prompt, completion, cost)
    await write()
    return row


def test_a_key_is_made_once_and_its_secret_is_never_stored(store_url: str) -> None:
    secrets: list[str] = []

    async def body(keys: KeyRing) -> None:
        record, secret = await keys.create("alice", KeyLimits())
        secrets.append(secret)
        assert secret.startswith("air-") and len(secret) > 40 and secret.startswith(record.hint)
        assert keys.identify(secret) == record
        assert keys.identify(secret + "x") is None and keys.identify("sk-other") is None
        for bad_name in ("", "a b", "-dash", "x" * 65):
            with pytest.raises(InvalidArgument):
                await keys.create(bad_name, KeyLimits())
        with pytest.raises(InvalidArgument, match="rpm"):
            await keys.create("bob", KeyLimits(rpm=0))
        rows = await keys.store.db.fetch("SELECT * FROM api_keys")
        assert secrets[0] not in repr([tuple(r) for r in rows])

    with_rings(store_url, body)

    async def again(keys: KeyRing) -> None:
        with pytest.raises(AlreadyExists):
            await keys.create("alice", KeyLimits())

    with_rings(store_url, again)
    if not store_url.startswith("postgresql"):
        assert secrets[0].encode() not in Path(store_url).read_bytes()


def test_models_outside_the_patterns_revoked_and_expired_keys_are_refused(
    store_url: str,
) -> None:
    clock = Clock()

    async def body(keys: KeyRing) -> None:
        record, _ = await keys.create("coder", KeyLimits(models=("qwen*", "gemma-3-270m")))
        await keys.admit(record, "qwen2.5-coder", 10)
        with pytest.raises(PermissionDenied, match=r"only the models qwen\*, gemma-3-270m"):
            await keys.admit(record, "openrouter/openai/gpt-4o", 10)
        later, secret = await keys.create("temp", KeyLimits(expires_at=clock.now + 60))
        await keys.admit(later, "m", 1)
        clock.now += 61
        with pytest.raises(Unauthenticated, match="expired"):
            await keys.admit(later, "m", 1)
        await keys.revoke("coder")
        revoked = keys.get("coder")
        assert revoked is not None
        with pytest.raises(Unauthenticated, match="revoked"):
            await keys.admit(revoked, "qwen2.5-coder", 1)
        with pytest.raises(Unauthenticated):
            keys.validate(secret)
        # A revoked name may be given to a new key; the old secret stays refused.
        fresh, _ = await keys.create("coder", KeyLimits())
        await keys.admit(fresh, "anything", 1)

    with_rings(store_url, body, clock)


def test_requests_a_minute_with_the_wait_until_the_window_frees(store_url: str) -> None:
    clock = Clock()

    async def body(keys: KeyRing) -> None:
        record, _ = await keys.create("r", KeyLimits(rpm=3))
        for _ in range(3):
            await settle(keys, await keys.admit(record, "m", 10), 5, 5, 0.0)
            clock.now += 10
        with pytest.raises(ResourceExhausted) as refused:
            await keys.admit(record, "m", 10)
        assert refused.value.retry_after_s == pytest.approx(30)
        clock.now += 30
        await keys.admit(record, "m", 10)

    with_rings(store_url, body, clock)


def test_tokens_a_minute_count_what_requests_in_flight_may_use(store_url: str) -> None:
    clock = Clock()

    async def body(keys: KeyRing) -> None:
        record, _ = await keys.create("t", KeyLimits(tpm=1000))
        first = await keys.admit(record, "m", 600)
        second = await keys.admit(record, "m", 600)  # 600 reserved < 1000: let in
        with pytest.raises(ResourceExhausted):
            await keys.admit(record, "m", 1)  # 1200 reserved
        await settle(keys, first, 100, 100, 0.0)
        await settle(keys, second, 100, 100, 0.0)
        await keys.admit(record, "m", 500)  # 400 used + 0 reserved
        clock.now += 61
        await keys.admit(record, "m", 500)

    with_rings(store_url, body, clock)


def test_racing_for_the_last_tokens_of_a_day_ends_at_most_one_request_over(
    store_url: str,
) -> None:
    """Twenty requests arrive together, each able to use 300 tokens, with 100 left: only one
    gets in, on one gateway or across three sharing PostgreSQL."""
    clock = Clock()
    gateways = 3 if store_url.startswith("postgresql") else 1

    async def body(*rings: KeyRing) -> None:
        record, _ = await rings[0].create("q", KeyLimits(tokens_per_day=1000))
        await settle(rings[0], await rings[0].admit(record, "m", 900), 400, 500, 0.0)
        tries = [rings[i % gateways].admit(record, "m", 300) for i in range(20)]
        outcomes = await asyncio.gather(*tries, return_exceptions=True)
        admitted = [o for o in outcomes if isinstance(o, Admission)]
        refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        assert len(admitted) == 1 and len(refused) == 19
        # The stream that crosses the quota finishes: 900 + 300 <= 1000 + one request.
        await settle(rings[0], admitted[0], 100, 200, 0.0)
        for keys in rings:
            with pytest.raises(ResourceExhausted, match="tokens for today") as after:
                await keys.admit(record, "m", 1)
            assert after.value.retry_after_s == pytest.approx(6 * 3600)
        clock.now += 6 * 3600  # midnight UTC: a new day
        await rings[-1].admit(record, "m", 1)

    with_rings(store_url, body, clock, gateways)


def test_usage_and_spend_survive_a_restart(store_url: str) -> None:
    clock = Clock()
    secrets: list[str] = []

    async def before(keys: KeyRing) -> None:
        record, secret = await keys.create(
            "p", KeyLimits(tokens_per_day=1000, cloud_budget_usd=0.5)
        )
        secrets.append(secret)
        await settle(keys, await keys.admit(record, "openrouter/x/y", 10), 600, 300, 0.75)

    async def after(keys: KeyRing) -> None:
        restored = keys.identify(secrets[0])
        assert restored is not None and keys.cloud_spent(restored)
        assert keys.spend("p") == pytest.approx(0.75)
        await keys.admit(restored, "m", 100)  # 900 used today < 1000
        with pytest.raises(ResourceExhausted):
            await keys.admit(restored, "m", 1)  # 900 used + 100 reserved
        [usage] = await keys.store.usage("p")
        assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (1, 600, 300)

    with_rings(store_url, before, clock)
    with_rings(store_url, after, clock)


def test_keys_made_or_revoked_on_one_gateway_hold_on_the_others_at_once(
    postgres_url: str,
) -> None:
    async def body(first: KeyRing, second: KeyRing) -> None:
        record, secret = await first.create("shared", KeyLimits(rpm=2))
        await until(lambda: second.identify(secret) is not None)  # told by NOTIFY
        seen = second.identify(secret)
        assert seen is not None
        await first.admit(record, "m", 1)
        await second.admit(seen, "m", 1)
        with pytest.raises(ResourceExhausted, match="2 requests in the last minute"):
            await first.admit(record, "m", 1)  # the rate holds across both
        await second.revoke("shared")
        await until(lambda: _revoked(first, "shared"))
        with pytest.raises(Unauthenticated, match="revoked"):
            first.validate(secret)

    with_rings(postgres_url, body, gateways=2)


def _revoked(keys: KeyRing, name: str) -> bool:
    record = keys.get(name)
    return record is not None and record.revoked_at is not None


# --- end to end ----------------------------------------------------------------------

ADMIN, CLIENT = "admin-token-3f9a", "client-token-77c1"
PROMPT = "Say hi"


@dataclass
class Served:
    loop: LoopThread
    grpc_address: str
    http: str  # base URL without /v1
    directory: Path
    gateway: Any

    def cli(self, *args: str, token: str = ADMIN) -> int:
        (self.directory / "cli-token").write_text(token)
        return cli.main(
            [
                "--gateway",
                self.grpc_address,
                "--token-file",
                str(self.directory / "cli-token"),
                *args,
            ]
        )

    def create(self, capsys: pytest.CaptureFixture[str], name: str, *limits: str) -> str:
        capsys.readouterr()
        assert self.cli("keys", "create", name, *limits) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]  # the secret, the last line

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.http + "/v1", api_key=key, max_retries=0)

    def stub(self, key: str) -> tuple[gateway_pb2_grpc.GatewayStub, tuple[tuple[str, str]]]:
        channel = grpc.insecure_channel(self.grpc_address)
        return gateway_pb2_grpc.GatewayStub(channel), (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("keys")
    (directory / "admin").write_text(ADMIN)
    (directory / "token").write_text(CLIENT)
    (directory / "openrouter").write_text(API_KEY)
    model = embedded_model_config().model_copy(
        update={"context_length": CONTEXT, "slots": 4, "batch_tokens": 256}
    )
    host_config = HostConfig(
        listen="127.0.0.1:0", device="cpu", cache_dir=Path.home() / ".cache" / "airouter",
        models=[model],
    )  # fmt: skip
    loop = LoopThread()
    upstream = FakeOpenRouter()
    loop.run(upstream.start())
    host = loop.run(start_host(host_config, "cpu"))
    wait_for_health(f"127.0.0.1:{host.port}")
    config = gateway_config(
        [f"127.0.0.1:{host.port}"],
        http_listen="127.0.0.1:0",
        token_file=directory / "token",
        admin_token_file=directory / "admin",
        openrouter_base_url=upstream.base_url,
        openrouter_api_key_file=directory / "openrouter",
        cloud_allowed_models=["openrouter/vendor/*"],
        batch_db=directory / "gateway.sqlite3",
    )
    gateway = loop.run(start_gateway(config))
    assert gateway.http is not None
    yield Served(
        loop,
        f"127.0.0.1:{gateway.port}",
        f"http://127.0.0.1:{gateway.http.port}",
        directory,
        gateway,
    )
    loop.run(gateway.stop(0))
    loop.run(host.stop(0))
    loop.run(upstream.stop())
    loop.close()


def _chat(client: openai.OpenAI, model: str = "gemma-3-270m", tokens: int = 4) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens
    )


def test_a_key_opens_every_serving_door_and_no_admin_one(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = served.create(capsys, "alice", "--models", "gemma*", "openrouter/vendor/*")
    assert _chat(served.openai(secret)).choices[0].message.content is not None
    messages = anthropic.Anthropic(base_url=served.http, api_key=secret, max_retries=0)
    answer = messages.messages.create(
        model="gemma-3-270m", max_tokens=4, messages=[{"role": "user", "content": PROMPT}]
    )
    assert answer.usage.output_tokens > 0
    stub, metadata = served.stub(secret)
    finished = list(stub.Generate(gateway_request(prompt=PROMPT, max_tokens=3), metadata=metadata))
    assert finished[-1].HasField("finished")
    with pytest.raises(grpc.RpcError) as refused:
        stub.ListKeys(keys_pb2.ListKeysRequest(), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request = urllib.request.Request(
        served.http + "/metrics", headers={"Authorization": f"Bearer {secret}"}
    )
    with pytest.raises(urllib.error.HTTPError) as metrics:
        urllib.request.urlopen(request, timeout=30)
    assert metrics.value.code == 403
    capsys.readouterr()
    assert served.cli("keys", "usage", "alice") == 0
    assert "gemma-3-270m" in capsys.readouterr().out
    rows = stub_usage(served, "alice")
    assert sum(r.requests for r in rows) == 3
    assert {r.model for r in rows} == {"gemma-3-270m"}
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in rows)


def stub_usage(served: Served, name: str) -> list[keys_pb2.KeyUsage]:
    stub, metadata = served.stub(ADMIN)
    return list(stub.GetKeyUsage(keys_pb2.GetKeyUsageRequest(name=name), metadata=metadata).usage)


def test_a_model_outside_the_keys_patterns_is_403_naming_them(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = served.create(capsys, "narrow", "--models", "qwen*")
    with pytest.raises(openai.PermissionDeniedError, match=r"only the models qwen\*"):
        _chat(served.openai(secret))
    stub, metadata = served.stub(secret)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(gateway_request(prompt=PROMPT, max_tokens=2), metadata=metadata))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_key_over_its_rate_gets_429_with_retry_after_on_both_protocols(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = served.create(capsys, "slow", "--rpm", "2")
    client = served.openai(secret)
    _chat(client)
    _chat(client)
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(client)
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert "2 requests in the last minute" in refused.value.message
    stub, metadata = served.stub(secret)
    with pytest.raises(grpc.RpcError) as also:
        list(stub.Generate(gateway_request(prompt=PROMPT, max_tokens=2), metadata=metadata))
    assert also.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(also.value.trailing_metadata() or ())
    assert 1 <= int(trailers["retry-after"]) <= 60


def test_revoked_and_unknown_keys_are_401(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = served.create(capsys, "leaver")
    _chat(served.openai(secret))
    assert served.cli("keys", "revoke", "leaver") == 0
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        _chat(served.openai(secret))
    stub, metadata = served.stub(secret)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(gateway_request(prompt=PROMPT, max_tokens=2), metadata=metadata))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (refused.value.details() or "")
    with pytest.raises(openai.AuthenticationError):
        _chat(served.openai("air-" + "x" * 43))
    capsys.readouterr()
    assert served.cli("keys", "list") == 0
    listing = capsys.readouterr().out
    assert "leaver" in listing and "revoked" in listing and secret not in listing


def test_concurrent_requests_racing_for_the_last_tokens_end_one_request_over_at_most(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    quota = 120
    secret = served.create(capsys, "racer", "--tokens-per-day", str(quota))
    client = served.openai(secret)
    outcomes: list[str] = []

    def ask() -> None:
        try:
            _chat(client, tokens=16)
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")

    for _ in range(3):  # waves of 8 at once, until the quota is gone
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    rows = stub_usage(served, "racer")
    used = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    worst = max((r.prompt_tokens + r.completion_tokens) / r.requests for r in rows)
    assert "429" in outcomes and "ok" in outcomes
    # One request's worth: its prompt bytes (an upper bound of its tokens) and max_tokens.
    one_request = len(PROMPT) + 64 + 16
    assert used <= quota + one_request, (used, worst, outcomes)


def test_a_spent_cloud_budget_keeps_the_key_on_local_models_and_says_so(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = COST_USD * 1.5
    secret = served.create(capsys, "cloudy", "--cloud-budget-usd", f"{budget:.6f}")
    client = served.openai(secret)
    for _ in range(2):  # the second starts below the budget and crosses it
        assert _chat(client, "openrouter/vendor/ok").choices[0].message.content == "Hello world"
    with pytest.raises(openai.RateLimitError, match="spent its cloud budget"):
        _chat(client, "openrouter/vendor/ok")
    _chat(client)  # local models still answer
    stub, metadata = served.stub(ADMIN)
    listed = stub.ListKeys(keys_pb2.ListKeysRequest(), metadata=metadata)
    cloudy = next(k for k in listed.keys if k.name == "cloudy")
    assert cloudy.cloud_spent_usd == pytest.approx(2 * COST_USD)
    rows = stub_usage(served, "cloudy")
    by_model = {r.model: r for r in rows}
    assert by_model["openrouter/vendor/ok"].cloud_cost_usd == pytest.approx(2 * COST_USD)


def test_metrics_name_keys_and_no_secret_reaches_a_log_or_a_metric(
    served: Served, capfd: pytest.CaptureFixture[str]
) -> None:
    stub, admin = served.stub(ADMIN)
    limits = keys_pb2.KeyLimits(rpm=1)
    secret = stub.CreateKey(
        keys_pb2.CreateKeyRequest(name="watched", limits=limits), metadata=admin
    ).secret
    capfd.readouterr()
    client = served.openai(secret)
    _chat(client)
    with pytest.raises(openai.RateLimitError):
        _chat(client)
    request = urllib.request.Request(
        served.http + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read().decode()
    values = scrape_metrics(request)
    assert values['airouter_gateway_key_requests_total{key="watched",model="gemma-3-270m"}'] == 1
    logged = capfd.readouterr()
    for where in (text, logged.out, logged.err):
        assert secret not in where and secret[len("air-") :] not in where


def test_keys_and_usage_survive_a_gateway_restart(served: Served, tmp_path: Path) -> None:
    hosts = [h.address for h in served.gateway.pool.hosts]
    (tmp_path / "admin").write_text(ADMIN)
    config = gateway_config(
        hosts,
        http_listen="127.0.0.1:0",
        admin_token_file=tmp_path / "admin",
        batch_db=tmp_path / "gateway.sqlite3",
    )
    first = served.loop.run(start_gateway(config))
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{first.port}"))
        admin = (("authorization", f"Bearer {ADMIN}"),)
        made = stub.CreateKey(
            keys_pb2.CreateKeyRequest(
                name="durable", limits=keys_pb2.KeyLimits(tokens_per_day=100_000)
            ),
            metadata=admin,
        )
        assert first.http is not None
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{first.http.port}/v1", api_key=made.secret, max_retries=0
        )
        _chat(client)
    finally:
        served.loop.run(first.stop(0))
    second = served.loop.run(start_gateway(config))
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{second.port}"))
        usage = stub.GetKeyUsage(keys_pb2.GetKeyUsageRequest(name="durable"), metadata=admin)
        assert [(u.key, u.requests) for u in usage.usage] == [("durable", 1)]
        assert usage.usage[0].prompt_tokens > 0
        assert second.http is not None
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{second.http.port}/v1", api_key=made.secret, max_retries=0
        )
        _chat(client)  # the key still opens the gateway
    finally:
        served.loop.run(second.stop(0))


def test_a_batch_runs_under_the_key_it_was_submitted_with(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = served.create(capsys, "batcher", "--models", "gemma*")
    stub, metadata = served.stub(secret)
    items = [
        gateway_pb2.BatchItem(
            custom_id=f"item-{i}", request=gateway_request(prompt=PROMPT, max_tokens=3)
        )
        for i in range(2)
    ]
    submitted = stub.SubmitBatch(gateway_pb2.SubmitBatchRequest(items=items), metadata=metadata)
    results = list(
        stub.StreamBatchResults(
            gateway_pb2.StreamBatchResultsRequest(batch_id=submitted.batch.id), metadata=metadata
        )
    )
    assert len(results) == 2
    rows = stub_usage(served, "batcher")
    assert sum(r.requests for r in rows) == 2
    outside = gateway_pb2.BatchItem(
        custom_id="x", request=gateway_request(model="openrouter/vendor/ok", prompt=PROMPT)
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitBatch(gateway_pb2.SubmitBatchRequest(items=[outside]), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_openai_batch_under_a_key_is_refused_for_models_outside_it(
    served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = served.create(capsys, "filer", "--models", "qwen*")
    client = served.openai(secret)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gemma-3-270m", "messages": [{"role": "user", "content": PROMPT}]},
    }
    path = tmp_path / "input.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with path.open("rb") as upload:
        uploaded = client.files.create(file=upload, purpose="batch")
    with pytest.raises(openai.PermissionDeniedError, match=r"only the models qwen\*"):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
