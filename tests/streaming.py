"""Building requests and reading streams, the same way against the host and the gateway."""

from dataclasses import dataclass
from typing import Any

from airouter.v1 import gateway_pb2, generate_pb2, model_host_pb2


@dataclass
class Result:
    deltas: list[str]
    finished: generate_pb2.Finished

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def host_request(**fields: Any) -> model_host_pb2.GenerateRequest:
    return _fill(model_host_pb2.GenerateRequest(), fields)


def gateway_request(**fields: Any) -> gateway_pb2.GatewayGenerateRequest:
    return _fill(gateway_pb2.GatewayGenerateRequest(), fields)


def _fill(request: Any, fields: dict[str, Any]) -> Any:
    """Fields: model, prompt, messages=[(role, content)], max_tokens, stop, ignore_eos, and any
    sampling parameter by name."""
    request.model = fields.pop("model", "gemma-3-270m")
    if "prompt" in fields:
        request.prompt = fields.pop("prompt")
    for role, content in fields.pop("messages", []):
        request.chat.messages.add(role=role, content=content)
    if "max_tokens" in fields:
        request.stopping.max_tokens = fields.pop("max_tokens")
    request.stopping.stop.extend(fields.pop("stop", []))
    request.stopping.ignore_eos = fields.pop("ignore_eos", False)
    if "request_id" in fields:
        request.request_id = fields.pop("request_id")
    if "min_context_length" in fields:
        request.min_context_length = fields.pop("min_context_length")
    for name, value in fields.items():
        setattr(request.sampling, name, value)
    return request


def collect(stream: Any) -> Result:
    deltas: list[str] = []
    finished = None
    for response in stream:
        assert finished is None, "a message arrived after the final one"
        if response.HasField("token"):
            assert response.token.text, "empty deltas are never sent"
            deltas.append(response.token.text)
        else:
            finished = response.finished
    assert finished is not None, "the stream ended without a final message"
    return Result(deltas, finished)
