"""Hosts joining and leaving at run time: names that resolve to several addresses (a
Kubernetes headless service) and config reloads on SIGHUP, which never drop a stream."""

import asyncio
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airouter.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from gateway.hosts import HostPool
from modelhost.config import HostConfig, embedded_model_config
from modelhost.server import RunningHost, start_host
from tests.conftest import LoopThread, wait_for_health, wait_until
from tests.processes import ServerProcess
from tests.streaming import collect, gateway_request


def host_on(loop: LoopThread, listen: str) -> RunningHost:
    model = embedded_model_config().model_copy(
        update={"context_length": 256, "slots": 2, "batch_tokens": 64}
    )
    config = HostConfig(listen=listen, device="cpu", models=[model])
    return loop.run(start_host(config, "cpu"))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def test_a_name_with_several_addresses_is_one_host_per_address(loop: LoopThread) -> None:
    # A headless service: the same port on several addresses (127.0.0.0/8 is all loopback).
    first = host_on(loop, "127.0.0.1:0")
    second = host_on(loop, f"127.0.0.2:{first.port}")
    answers = {"modelhosts.test": ["127.0.0.1", "127.0.0.2"]}
    failures: list[str] = []

    async def resolver(name: str, port: str) -> list[tuple[object, ...]]:
        if name not in answers:
            failures.append(name)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))) for ip in answers[name]
        ]

    entry = f"modelhosts.test:{first.port}"
    pool = HostPool([entry], dns_refresh_s=0.2, resolver=resolver)
    try:
        loop.run(pool.start())
        both = {f"127.0.0.1:{first.port}", f"127.0.0.2:{first.port}"}
        wait_until(lambda: {h.address for h in pool.routable()} == both, timeout=20)
        # The service scales down to one address: the other host is retired.
        answers["modelhosts.test"] = ["127.0.0.2"]
        wait_until(
            lambda: [h.address for h in pool.hosts] == [f"127.0.0.2:{first.port}"], timeout=20
        )
        # A resolver failure keeps the last answer rather than dropping every host.
        del answers["modelhosts.test"]
        wait_until(lambda: len(failures) >= 2)  # two refreshes failed; the first is done
        assert [h.address for h in pool.hosts] == [f"127.0.0.2:{first.port}"]
    finally:
        loop.run(pool.close())
        for host in (first, second):
            loop.run(host.stop(0))


def test_sighup_reloads_the_hosts_without_dropping_a_stream(
    loop: LoopThread, tmp_path: Path
) -> None:
    old, new = host_on(loop, "127.0.0.1:0"), host_on(loop, "127.0.0.1:0")
    old_address, new_address = f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}"
    config = tmp_path / "gateway.toml"
    config.write_text(f'modelhosts = ["{old_address}"]\n')
    gateway = ServerProcess("gateway", "serve", "--config", str(config))
    wait_for_health(gateway.address)
    channel = grpc.insecure_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def listed() -> list[str]:
        hosts = stub.ListHosts(gateway_pb2.ListHostsRequest(), timeout=10).hosts
        return [h.address for h in hosts]

    try:
        stream = stub.Generate(
            gateway_request(prompt="Count:", max_tokens=150, ignore_eos=True), timeout=60
        )
        next(stream)
        config.write_text(f'modelhosts = ["{new_address}"]\n')
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: listed() == [new_address], timeout=20)
        result = collect(stream)
        assert result.finished.host == old_address
        assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert result.finished.usage.completion_tokens == 150
        wait_until(
            lambda: bool(stub.ListModels(gateway_pb2.GatewayListModelsRequest()).models), timeout=20
        )
        again = collect(stub.Generate(gateway_request(prompt="Hi", max_tokens=2), timeout=60))
        assert again.finished.host == new_address
        # A config that no longer parses is refused and the hosts stay as they were.
        config.write_text("modelhosts = [\n")
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: any(r["event"] == "reload_failed" for r in list(gateway.log)))
        assert listed() == [new_address]
    finally:
        channel.close()
        assert gateway.stop() == 0
        for host in (old, new):
            loop.run(host.stop(0))


def test_a_reload_during_a_slow_dns_refresh_is_not_reverted() -> None:
    """A DNS refresh still resolving the old entries when a SIGHUP reload applies new ones
    must not put the old host list back when it finishes."""

    async def scenario() -> list[str]:
        slow = asyncio.Event()

        entered = asyncio.Event()

        async def resolver(name: str, port: str) -> list[tuple[object, ...]]:
            if name == "old.test":
                entered.set()
                await slow.wait()  # the refresh is stuck in DNS
            ip = "127.0.0.3" if name == "old.test" else "127.0.0.4"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))]

        pool = HostPool(["127.0.0.5:1"], resolver=resolver)
        pool.entries = ["old.test:1"]
        refresh = asyncio.create_task(pool.reconcile())  # the periodic refresh, old entries
        await entered.wait()
        reload = asyncio.create_task(pool.reconcile(["new.test:1"]))  # SIGHUP
        await asyncio.sleep(0)  # one turn of the loop: the reload now waits for the refresh
        slow.set()
        await asyncio.gather(refresh, reload)
        addresses = [h.address for h in pool.hosts]
        await pool.close()
        return addresses

    assert asyncio.run(scenario()) == ["new.test:1"]
