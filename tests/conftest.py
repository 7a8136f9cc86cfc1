"""Fixtures that start the real servers: modelhosts with the embedded model and a gateway,
on ephemeral loopback ports, in a background event loop."""

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airouter.v1 import gateway_pb2_grpc, model_host_pb2_grpc
from gateway.config import GatewayConfig
from gateway.server import RunningGateway, start_gateway
from modelhost.config import HostConfig, ModelConfig, embedded_model_config
from modelhost.server import RunningHost, start_host
from tests.scratch import scratch_dir

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

T = TypeVar("T")

# Small contexts keep the too-long-prompt tests cheap.
CONTEXT = 512


def gateway_config(modelhosts: list[str], **fields: Any) -> GatewayConfig:
    """An in-process gateway's config: any free port, no HTTP edge unless asked for, and a
    batches database of its own."""
    fields.setdefault("listen", "127.0.0.1:0")
    fields.setdefault("http_listen", None)
    if "store" not in fields:
        fields.setdefault("batch_db", scratch_dir() / "batches.sqlite3")
    return GatewayConfig(modelhosts=modelhosts, **fields)


class LoopThread:
    """An asyncio loop on its own thread, so servers run while tests use blocking stubs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


async def until(condition: "Callable[[], bool]") -> None:
    """Polls condition() on the event loop until it is true; fails after 10 seconds."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (another process's doing: no event to await)
            await asyncio.sleep(0.01)


def wait_until(condition, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Polls condition() until it is true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def scrape_metrics(request: "str | urllib.request.Request") -> dict[str, float]:
    """A Prometheus /metrics page as {'name{labels}': value}."""
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def wait_for_health(address: str, timeout: float = 30) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


class Stack:
    """What the tests talk to."""

    def __init__(self, loop: LoopThread, host: RunningHost, gateway: RunningGateway) -> None:
        self.loop = loop
        self.host = host
        self.gateway = gateway
        self.host_address = f"127.0.0.1:{host.port}"
        self.gateway_address = f"127.0.0.1:{gateway.port}"
        self._host_channel = grpc.insecure_channel(self.host_address)
        self._gateway_channel = grpc.insecure_channel(self.gateway_address)
        self.host_stub = model_host_pb2_grpc.ModelHostStub(self._host_channel)
        self.gateway_stub = gateway_pb2_grpc.GatewayStub(self._gateway_channel)

    def engine(self, model: str):  # type: ignore[no-untyped-def]
        engine = self.host.residency.resolve(model).engine
        assert engine is not None, f"{model} is not loaded"
        return engine

    def close(self) -> None:
        self._host_channel.close()
        self._gateway_channel.close()


def host_config() -> HostConfig:
    default = embedded_model_config()
    return HostConfig(
        listen="127.0.0.1:0",
        device="cpu",
        cache_dir=Path.home() / ".cache" / "airouter",
        models=[
            default.model_copy(update={"context_length": CONTEXT, "slots": 4, "batch_tokens": 256}),
            # One slot and a one-request queue: the admission-limit tests fill it on purpose.
            default.model_copy(
                update={
                    "name": "gemma-one-slot",
                    "aliases": [],
                    "context_length": CONTEXT,
                    "slots": 1,
                    "max_queue": 1,
                    "batch_tokens": 64,
                }
            ),
        ],
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    loop = LoopThread()
    host = loop.run(start_host(host_config(), "cpu"))
    gateway = loop.run(start_gateway(gateway_config([f"127.0.0.1:{host.port}"])))
    stack = Stack(loop, host, gateway)
    wait_for_health(stack.host_address)
    wait_for_health(stack.gateway_address)
    yield stack
    stack.close()
    loop.run(gateway.stop(0))
    loop.run(host.stop(0))
    loop.close()


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_config().model_path(Path.home() / ".cache" / "airouter")


@contextmanager
def http_stack(models: list[ModelConfig], **gateway_fields: Any) -> Iterator[str]:
    """An in-process modelhost serving `models` on the CPU and a gateway with its HTTP edge
    over it; yields the edge's base URL (http://127.0.0.1:PORT, without /v1)."""
    config = HostConfig(
        listen="127.0.0.1:0", device="cpu", cache_dir=Path.home() / ".cache" / "airouter",
        models=models,
    )  # fmt: skip
    loop = LoopThread()
    host = loop.run(start_host(config, "cpu"))
    try:
        wait_for_health(f"127.0.0.1:{host.port}")
        fields = {"http_listen": "127.0.0.1:0", **gateway_fields}
        gateway = loop.run(start_gateway(gateway_config([f"127.0.0.1:{host.port}"], **fields)))
        try:
            assert gateway.http is not None
            yield f"http://127.0.0.1:{gateway.http.port}"
        finally:
            loop.run(gateway.stop(0))
    finally:
        loop.run(host.stop(0))
        loop.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator["PostgresServer"]:
    """One PostgreSQL server for the session (each test takes a database of its own)."""
    from tests.postgres import PostgresServer, server_programs

    programs = server_programs()
    if programs is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    server = PostgresServer(programs)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: "PostgresServer") -> str:
    """A fresh, empty PostgreSQL database."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store on each backend: an SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "gateway.sqlite3")
    return str(request.getfixturevalue("postgres_url"))
