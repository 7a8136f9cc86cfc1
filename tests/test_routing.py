"""Routing across three modelhost processes: residency, load shedding, failover, rejoining,
cool-down, resolution by capability and context. Each host serves the embedded model under
names of its own; the gateway runs in-process and is asked only over gRPC."""

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog.testing

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2, model_host_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from gateway.server import RunningGateway, start_gateway
from tests.conftest import LoopThread, gateway_config, wait_for_health, wait_until
from tests.processes import ServerProcess, free_port_address
from tests.streaming import collect, gateway_request

UP = gateway_pb2.HOST_STATE_UP
DOWN = gateway_pb2.HOST_STATE_DOWN
COOLING_DOWN = gateway_pb2.HOST_STATE_COOLING_DOWN
DRAINING = gateway_pb2.HOST_STATE_DRAINING


def queued(host: ModelHostStub, model: str) -> int:
    status = host.GetStatus(model_host_pb2.GetStatusRequest(), timeout=10).status
    return next(m.queue_depth for m in status.models if m.name == model)


def model_toml(
    name: str, *, slots: int = 1, preload: bool = False, context: int = 256, **extra: object
) -> str:
    lines = [
        "[[models]]",
        f'name = "{name}"',
        'chat_template = "gemma"',
        f"context_length = {context}",
        f"slots = {slots}",
        "batch_tokens = 64",
        f"preload = {'true' if preload else 'false'}",
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


# Three hosts: "shared" is configured on all of them but resident only on B; A alone has a
# code model with a long context; "failover" is resident on B and can be loaded on C; "pair"
# is resident on A and C.
PAIR = model_toml("pair", slots=2, preload=True)
HOSTS = {
    "A": model_toml("shared") + model_toml("coder", capabilities=["code"], context=1024) + PAIR,
    "B": model_toml("shared", preload=True) + model_toml("failover", preload=True),
    "C": model_toml("shared", slots=2) + model_toml("failover") + PAIR,
}


class Host:
    """A modelhost process on a fixed address, so it can die and come back there."""

    def __init__(self, name: str, config: Path) -> None:
        self.name, self.config = name, config
        self.address = free_port_address()
        self.process: ServerProcess | None = None
        self.start()

    def start(self) -> None:
        self.process = ServerProcess(
            "modelhost", "serve", "--device", "cpu", "--config", str(self.config),
            listen=self.address,
        )  # fmt: skip
        wait_for_health(self.address)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            self.process.stop()


@dataclass
class Cluster:
    hosts: dict[str, Host]
    loop: LoopThread
    gateway: RunningGateway
    stub: gateway_pb2_grpc.GatewayStub

    def generate(self, model: str, **fields: object):  # type: ignore[no-untyped-def]
        fields.setdefault("max_tokens", 2)
        request = gateway_request(model=model, prompt="Hello", **fields)
        return collect(self.stub.Generate(request, timeout=60))

    def host_states(self) -> dict[str, int]:
        listed = self.stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
        by_address = {h.address: h.state for h in listed}
        return {name: by_address[h.address] for name, h in self.hosts.items()}

    def model_state_on(self, host: str, model: str) -> int:
        listed = self.stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
        info = next(h for h in listed if h.address == self.hosts[host].address)
        return next(m.state for m in info.status.models if m.name == model)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("hosts")
    hosts = {}
    for name, text in HOSTS.items():
        config = directory / f"{name}.toml"
        # One decoding thread each: three hosts that spin-wait two threads apiece on a
        # two-core machine can stall one another for seconds a step.
        config.write_text("threads = 1\n" + text)
        hosts[name] = Host(name, config)
    loop = LoopThread()
    gateway = loop.run(start_gateway(gateway_config([h.address for h in hosts.values()])))
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    cluster = Cluster(hosts, loop, gateway, gateway_pb2_grpc.GatewayStub(channel))
    wait_until(lambda: cluster.model_state_on("B", "shared") == generate_pb2.MODEL_STATE_READY)
    yield cluster
    channel.close()
    loop.run(gateway.stop(0))
    loop.close()
    for host in hosts.values():
        host.stop()


def test_requests_land_where_the_model_is_resident(cluster: Cluster) -> None:
    for _ in range(4):
        assert cluster.generate("shared").finished.host == cluster.hosts["B"].address
    models = cluster.stub.ListModels(gateway_pb2.GatewayListModelsRequest(), timeout=10).models
    shared = next(m for m in models if m.name == "shared")
    assert len(shared.hosts) == 3 and list(shared.resident_hosts) == [cluster.hosts["B"].address]


def test_a_burst_spreads_over_the_hosts_where_the_model_is_resident(cluster: Cluster) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cluster.generate("pair", max_tokens=16), range(8)))
    hosts = {r.finished.host for r in results}
    assert hosts == {cluster.hosts["A"].address, cluster.hosts["C"].address}


def test_capability_and_context_pick_the_model(cluster: Cluster) -> None:
    result = cluster.generate("capability:code")
    assert result.finished.model == "coder" and result.finished.host == cluster.hosts["A"].address
    wide = cluster.generate("capability:code", min_context_length=1000)
    assert wide.finished.model == "coder"
    with pytest.raises(grpc.RpcError) as info:
        cluster.generate("shared", min_context_length=1000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_context_length 1000 exceeds" in info.value.details()
    assert "the largest has 256" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        cluster.generate("capability:vision")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "capabilities (ask for capability:<tag>): chat, code" in info.value.details()


def test_a_saturated_host_sheds_load_to_another(cluster: Cluster) -> None:
    long = {"max_tokens": 120, "ignore_eos": True}
    streams = [cluster.stub.Generate(gateway_request(model="shared", prompt="Count:", **long))]
    next(streams[0])  # B decodes it in its one slot
    streams.append(cluster.stub.Generate(gateway_request(model="shared", prompt="More:", **long)))
    # B now has a request decoding and one queued: a whole wave. The next goes elsewhere and
    # loads the model there rather than wait behind them.
    shed = cluster.generate("shared")
    assert shed.finished.host in (cluster.hosts["A"].address, cluster.hosts["C"].address)
    for stream in streams:
        assert collect(stream).finished.host == cluster.hosts["B"].address


def test_killing_a_host_fails_over_before_the_first_token_and_errors_after_it(
    cluster: Cluster,
) -> None:
    b, c = cluster.hosts["B"], cluster.hosts["C"]
    long = {"max_tokens": 200, "ignore_eos": True}
    running = cluster.stub.Generate(gateway_request(model="failover", prompt="Count:", **long))
    next(running)
    # B is busy but has no queue: the next request still prefers B, where the model is
    # resident, over loading it on C, and waits there for B's one slot when B dies.
    results: list[object] = []
    waiting = threading.Thread(target=lambda: results.append(cluster.generate("failover")))
    with structlog.testing.capture_logs() as logs:
        waiting.start()
        with grpc.insecure_channel(b.address) as channel:
            host = ModelHostStub(channel)
            wait_until(lambda: queued(host, "failover") == 1)  # it waits for B's one slot
        b.kill()
        ended = collect(running)
        waiting.join(timeout=60)
    assert ended.finished.reason == generate_pb2.FINISH_REASON_ERROR
    assert b.address in ended.finished.error_message
    assert results, "the request that had no token yet must be served elsewhere"
    assert results[0].finished.host == c.address  # type: ignore[attr-defined]
    failovers = [e for e in logs if e["event"] == "host_failover"]
    assert [e["host"] for e in failovers] == [b.address]
    wait_until(lambda: cluster.host_states()["B"] in (DOWN, COOLING_DOWN), timeout=5)
    # B comes back on its address and rejoins (after a probe generation if it cooled down).
    b.start()
    wait_until(lambda: cluster.host_states()["B"] == UP, timeout=60)
    assert cluster.generate("failover").finished.host in (b.address, c.address)


def test_a_flapping_host_cools_down_and_rejoins_after_a_probe(cluster: Cluster) -> None:
    c = cluster.hosts["C"]
    for _ in range(3):
        wait_until(lambda: cluster.host_states()["C"] in (UP, COOLING_DOWN), timeout=30)
        if cluster.host_states()["C"] == COOLING_DOWN:
            break
        c.kill()
        wait_until(lambda: cluster.host_states()["C"] != UP, timeout=10)
        c.start()
    wait_until(lambda: cluster.host_states()["C"] == COOLING_DOWN, timeout=30)
    listed = cluster.stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
    info = next(h for h in listed if h.address == c.address)
    assert "failures within" in info.state_detail
    # While it cools down nothing is routed to it, though it is up again.
    assert cluster.generate("shared").finished.host != c.address
    wait_until(lambda: cluster.host_states()["C"] == UP, timeout=60)


def test_a_draining_host_finishes_its_streams_and_gets_no_new_ones(cluster: Cluster) -> None:
    a = cluster.hosts["A"]
    stream = cluster.stub.Generate(
        gateway_request(model="coder", prompt="Count:", max_tokens=60, ignore_eos=True)
    )
    next(stream)
    assert a.process is not None
    a.process.process.send_signal(signal.SIGTERM)
    wait_until(lambda: cluster.host_states()["A"] == DRAINING, timeout=10)
    assert cluster.generate("shared").finished.host != a.address
    finished = collect(stream).finished
    assert finished.reason == generate_pb2.FINISH_REASON_LENGTH and finished.host == a.address
    assert a.process.process.wait(timeout=60) == 0
    wait_until(lambda: cluster.host_states()["A"] == DOWN, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        cluster.generate("capability:code")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "served only by hosts that are not available" in info.value.details()
    a.start()
    wait_until(lambda: cluster.host_states()["A"] == UP, timeout=30)
