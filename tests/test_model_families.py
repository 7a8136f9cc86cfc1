"""Model families whose memory is not an attention-only KV cache, and llama.cpp's
back-pressure: prefix reuse stays correct for recurrent and hybrid models (a warm slot answers
as a cold one), and a step that finds no KV room for a prompt waits instead of failing
everything."""

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
import structlog.testing

from modelhost.config import ModelConfig
from tests.conftest import wait_until
from tests.hosts import READY, running_host, small
from tests.streaming import collect, host_request
from tests.tiny_models import tiny_lfm2, tiny_mamba

# Recurrent (Mamba: a state per sequence, no KV cells) and hybrid (LFM2: short-convolution
# layers with a rolling state, beside attention layers with KV cells).
FAMILIES = {"mamba": tiny_mamba, "lfm2": tiny_lfm2}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    name = request.param
    return FAMILIES[name](tmp_path_factory.mktemp("tiny") / f"{name}.gguf")


def family_config(path: Path) -> ModelConfig:
    return ModelConfig(
        name="tiny", path=path, context_length=256, slots=2, batch_tokens=64, preload=True
    )


PROMPTS = [
    "Once upon a time there was a little",
    "Once upon a time there was a little cat",  # the first one's prefix, then more
    "Once upon a time there was a little",  # the first again: its slot holds more than it
    "Once upon a time",  # a shorter prefix of every one before
]


def test_a_recurrent_or_hybrid_model_answers_from_a_warm_slot_as_from_a_cold_one(
    family: Path,
) -> None:
    """A partial llama_memory_seq_rm fails on a recurrent state: the engine used to ignore it,
    and the next decode failed for every sequence (llama_decode -1)."""
    warm: list[str] = []
    with running_host([family_config(family)]) as host:
        wait_until(lambda: host.states()["tiny"] == READY, 60)
        for prompt in PROMPTS:
            request = host_request(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0)
            reply = collect(host.stub.Generate(request, timeout=60))
            assert reply.finished.reason == 2, reply.finished.error_message  # LENGTH
            warm.append(reply.text)
    for prompt, text in zip(PROMPTS, warm, strict=True):
        with running_host([family_config(family)]) as cold:
            wait_until(lambda c=cold: c.states()["tiny"] == READY, 60)
            request = host_request(model="tiny", prompt=prompt, max_tokens=8, temperature=0.0)
            assert collect(cold.stub.Generate(request, timeout=60)).text == text


@pytest.fixture
def flaky_decode(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """llama_decode answering 1 (no KV slot) once, for the first step that holds a prompt
    chunk beside a generating token."""
    real = llama_cpp.llama_decode
    refused: list[int] = []
    armed = [False]

    def decode(ctx, batch):  # type: ignore[no-untyped-def]
        if armed[0] and not refused and batch.n_tokens > 1:
            refused.append(batch.n_tokens)
            return 1
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    yield armed  # type: ignore[misc]


def test_no_kv_room_for_a_prompt_is_back_pressure_not_a_failure(flaky_decode) -> None:  # type: ignore[no-untyped-def]
    with running_host([small("a", slots=2, preload=True)]) as host:
        wait_until(lambda: host.states()["a"] == READY, 60)
        long = host.stub.Generate(
            host_request(model="a", prompt="Once", max_tokens=60, ignore_eos=True), timeout=60
        )
        assert next(long).HasField("token")  # generating: its steps hold one token
        flaky_decode[0] = True
        with structlog.testing.capture_logs() as logs:
            second = collect(
                host.stub.Generate(
                    host_request(model="a", prompt="A second prompt", max_tokens=8),
                    timeout=60,
                )
            )
            rest = collect(long)
        assert second.finished.reason in (1, 2) and second.finished.usage.completion_tokens
        assert rest.finished.reason == 2 and rest.finished.usage.completion_tokens == 60
        assert any(e["event"] == "decode_backpressure" for e in logs)
        assert not any(e["event"] == "decode_failed" for e in logs)
