"""A model's sample_in_graph: plain requests take their tokens from the candidates llama.cpp
finds inside the decode, the others from their rows, and every request gets the tokens it
gets from its row alone; on the CPU's graph here (the real SmolLM2)."""

import threading
import time
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from modelhost.config import embedded_chat_model_config
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.generation import Delta, EngineRequest, Event, Finish, Sampling
from tests.conftest import wait_until

PROMPT = "<|im_start|>user\nTell me a story about {}.<|im_end|>\n<|im_start|>assistant\n"
# What each request asks for, and whether it can take its token from the graph's top 40.
REQUESTS: list[tuple[dict[str, Any], bool]] = [
    ({"sampling": Sampling(temperature=0.0)}, True),
    ({"sampling": Sampling(seed=1)}, True),  # llama.cpp's defaults: top-k 40, top-p 0.95
    ({"sampling": Sampling(top_k=5, top_p=1.0, min_p=0.0, seed=2)}, True),
    ({"sampling": Sampling(seed=3), "ignore_eos": True}, True),  # end tokens taken out
    ({"sampling": Sampling(temperature=0.0), "ignore_eos": True}, True),
    ({"sampling": Sampling(temperature=0.0), "top_logprobs": 2}, False),
    ({"sampling": Sampling(top_k=0, seed=4)}, False),  # the whole row's nucleus
    # 48 and the two end tokens taken out: more than the graph's candidates hold.
    ({"sampling": Sampling(top_k=48, seed=5), "ignore_eos": True}, False),
    ({"sampling": Sampling(temperature=0.0, repetition_penalty=1.3)}, False),
]


@pytest.fixture
def attached(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, bool]]]:
    """Every llama_set_sampler call: the sequence, and whether a chain was attached."""
    calls: list[tuple[int, bool]] = []
    real = llama_cpp.llama_set_sampler

    def spy(ctx: Any, seq_id: int, chain: Any) -> bool:
        calls.append((seq_id, chain is not None))
        return bool(real(ctx, seq_id, chain))

    monkeypatch.setattr(llama_cpp, "llama_set_sampler", spy)
    yield calls


def run(
    in_graph: bool,
    requests: list[dict[str, Any]],
    slots: int,
    together: bool = True,
    errors: list[str] | None = None,
) -> list[tuple[str, list[Any]]]:
    """Each request's text and log probabilities from a fresh engine on SmolLM2. Together:
    all admitted in one step (held behind a one-token request until then), else one after
    another."""
    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None
    settings = ContextSettings(slots=slots, context_per_slot=256, batch_tokens=256, threads=2)
    model = LlamaModel(chat.path, gpu_layers=0, settings=settings)
    engine = LlamaEngine(model, name="graph", slots=slots, max_queue=16, sample_in_graph=in_graph)
    received: list[list[Event]] = [[] for _ in requests]

    def finished(i: int) -> bool:
        return any(isinstance(e, Finish) for e in received[i])

    def hold(events: list[Event]) -> None:  # the engine thread, until the gate opens
        holding.set()
        gate.wait(30)

    try:
        gate, holding = threading.Event(), threading.Event()
        if together:
            engine.submit(
                EngineRequest(
                    id="gate",
                    prompt=[100, 101],  # shares no prefix: its slot stays out of it
                    sampling=Sampling(temperature=0.0),
                    max_tokens=1,
                    stop=[],
                    on_events=hold,
                    arrived=time.perf_counter(),
                )
            )
            # The others arrive while it holds, so every run's steps hold the same requests.
            assert holding.wait(30)
        for i, fields in enumerate(requests):
            engine.submit(
                EngineRequest(
                    id=f"r{i}",
                    prompt=model.tokenize(PROMPT.format(i)),
                    max_tokens=24,
                    stop=[],
                    on_events=received[i].extend,
                    arrived=time.perf_counter(),
                    **fields,
                )
            )
            if not together:
                wait_until(lambda i=i: finished(i), timeout=60)  # type: ignore[misc]
        gate.set()
        wait_until(lambda: all(finished(i) for i in range(len(requests))), timeout=120)
    finally:
        engine.close()
    results = []
    for events in received:
        finish = events[-1]
        assert isinstance(finish, Finish)
        if errors is not None and finish.error:
            errors.append(finish.error)
            continue
        assert not finish.error, finish
        deltas = [e for e in events if isinstance(e, Delta)]
        results.append(("".join(d.text for d in deltas), [d.logprobs for d in deltas]))
    return results


def test_every_request_gets_the_tokens_its_row_gives_beside_the_others(
    attached: list[tuple[int, bool]],
) -> None:
    """Plain requests (greedy, drawn with top_k up to 40) and requests that need their rows
    (log probabilities, banned end tokens, top_k = 0, a penalty) decoded in the same steps:
    each one's text, and log probabilities, are those of the run where every row comes back."""
    requests = [fields for fields, _ in REQUESTS]
    from_rows = run(False, requests, slots=len(requests) + 1)
    assert attached == []
    in_graph = run(True, requests, slots=len(requests) + 1)
    assert in_graph == from_rows
    assert all(text for text, _ in from_rows)
    # A chain on the sequence of each plain request (and of the one that held the others
    # back), on distinct sequences, none taken off: every step had both kinds.
    plain = 1 + sum(fits for _, fits in REQUESTS)
    assert len({seq for seq, attach in attached if attach}) == len(attached) == plain
    assert all(attach for _, attach in attached)


def test_a_slot_keeps_its_chain_for_plain_requests_and_gives_it_up_for_one_that_needs_its_row(
    attached: list[tuple[int, bool]],
) -> None:
    """One slot serving, in turn, plain, plain, row-needing, plain requests: the chain is
    attached once, taken off for the one that needs its row and attached again (each change
    costs a graph reserve), and the texts are those of rows alone."""
    plain, rows = REQUESTS[1][0], REQUESTS[5][0]
    requests = [REQUESTS[0][0], plain, rows, plain]
    from_rows = run(False, requests, slots=1, together=False)
    in_graph = run(True, requests, slots=1, together=False)
    assert in_graph == from_rows
    assert attached == [(0, True), (0, False), (0, True)]


def test_a_device_that_cannot_run_the_chain_samples_from_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llama.cpp refusing to run a chain in the graph (a device without the ops) leaves the
    engine sampling from rows, with the same tokens, after one try."""
    tries: list[int] = []

    def refuse(ctx: Any, seq_id: int, chain: Any) -> bool:
        tries.append(seq_id)
        return False

    monkeypatch.setattr(llama_cpp, "llama_set_sampler", refuse)
    requests = [fields for fields, fits in REQUESTS if fits]
    slots = len(requests) + 1
    assert run(True, requests, slots) == run(False, requests, slots)
    assert len(tries) == 1


def test_a_step_without_candidates_fails_its_requests_alone_and_turns_the_graph_off(
    monkeypatch: pytest.MonkeyPatch, attached: list[tuple[int, bool]]
) -> None:
    """llama.cpp handing back no candidates for a sequence it was to sample (a device's op
    that did not run): that request ends with an error saying so, the engine goes on, and
    the next request samples from its row, with its chain taken off."""
    monkeypatch.setattr(llama_cpp, "llama_get_sampled_candidates_count_ith", lambda ctx, i: 0)
    plain = REQUESTS[1][0]
    errors: list[str] = []
    served = run(True, [plain, plain], slots=1, together=False, errors=errors)
    assert len(errors) == 1 and "returned no candidates from its graph" in errors[0]
    assert "retry the request" in errors[0]
    assert served == run(False, [plain, plain], slots=1, together=False)[1:]
    assert attached == [(0, True), (0, False)]
