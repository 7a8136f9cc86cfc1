"""A modelhost in this process on an ephemeral port, with a blocking stub, and the embedded
model under other names and settings."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from airouter.v1 import generate_pb2, host_status_pb2, model_host_pb2
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from modelhost.config import HostConfig, ModelConfig, embedded_model_config
from modelhost.server import RunningHost, start_host
from tests.conftest import LoopThread
from tests.streaming import collect, host_request

READY = generate_pb2.MODEL_STATE_READY
NOT_LOADED = generate_pb2.MODEL_STATE_NOT_LOADED
LOADING = generate_pb2.MODEL_STATE_LOADING
UNLOADING = generate_pb2.MODEL_STATE_UNLOADING
ERROR = generate_pb2.MODEL_STATE_ERROR


def small(name: str, **settings: object) -> ModelConfig:
    """The embedded model as its own small model: one slot, a short context, loaded on use."""
    update = {
        "name": name,
        "aliases": [],
        "context_length": 256,
        "slots": 1,
        "batch_tokens": 64,
        "preload": False,
        **settings,
    }
    return embedded_model_config().model_copy(update=update)


@dataclass
class Host:
    loop: LoopThread
    server: RunningHost
    stub: ModelHostStub

    def generate(self, model: str, max_tokens: int = 2, **fields: object):  # type: ignore[no-untyped-def]
        request = host_request(model=model, prompt="Hello", max_tokens=max_tokens, **fields)
        return collect(self.stub.Generate(request, timeout=60))

    def status(self) -> host_status_pb2.HostStatus:
        return self.stub.GetStatus(model_host_pb2.GetStatusRequest(), timeout=10).status

    def states(self) -> dict[str, int]:
        return {m.name: m.state for m in self.status().models}

    def model(self, name: str) -> host_status_pb2.ModelStatus:
        return next(m for m in self.status().models if m.name == name)


@contextmanager
def running_host(models: list[ModelConfig], **host_settings: object) -> Iterator[Host]:
    loop = LoopThread()
    config = HostConfig(listen="127.0.0.1:0", device="cpu", models=models, **host_settings)
    server = loop.run(start_host(config, "cpu"))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Host(loop, server, ModelHostStub(channel))
    finally:
        channel.close()
        loop.run(server.stop(0))
        loop.close()
