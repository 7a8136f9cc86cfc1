"""Continuous batching in the modelhost: many streams at once, each with its own text, slots
handed over at once, bounded queues, deadlines and prefix reuse; real gRPC, real model."""

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from airouter.errors import DeadlineExceeded, Unavailable
from airouter.output import Constraint, ConstraintKind, grammar_of
from airouter.v1 import generate_pb2
from modelhost.config import embedded_chat_model_config
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    FinishReason,
    Rejected,
    Sampling,
)
from tests.conftest import Stack, wait_until
from tests.streaming import collect, host_request

GREEDY = {"temperature": 0.0}
# Words the model keeps repeating once a prompt has repeated them: each stream's text shows
# whose prompt it came from.
MARKERS = [
    "apple", "river", "candle", "zebra", "violin", "pepper", "rocket", "garden",
    "silver", "tiger", "window", "coffee", "planet", "mirror", "button", "forest",
]  # fmt: skip


def generate(stack: Stack, **fields):  # type: ignore[no-untyped-def]
    return collect(stack.host_stub.Generate(host_request(**fields), timeout=120))


def test_sixteen_concurrent_streams_each_get_their_own_text(stack: Stack) -> None:
    def run(word: str):  # type: ignore[no-untyped-def]
        prompt = " ".join([word] * 12)
        return generate(stack, prompt=prompt, max_tokens=8, ignore_eos=True, **GREEDY)

    with ThreadPoolExecutor(len(MARKERS)) as pool:
        results = list(pool.map(run, MARKERS))
    for word, result in zip(MARKERS, results, strict=True):
        assert result.finished.usage.completion_tokens == 8
        assert result.text.split() == [word] * len(result.text.split()), (word, result.text)
        assert result.text.split()
    # 16 streams on 4 slots: most of them waited for a slot, and none was refused.
    assert sum(r.finished.timings.queue_ms > 0 for r in results) >= 12


def test_a_host_answers_every_one_of_64_concurrent_clients(stack: Stack) -> None:
    def run(i: int):  # type: ignore[no-untyped-def]
        return generate(stack, prompt=f"Client {i} says", max_tokens=3, ignore_eos=True)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    assert [r.finished.usage.completion_tokens for r in results] == [3] * 64
    assert all(r.finished.reason == generate_pb2.FINISH_REASON_LENGTH for r in results)


def test_ignore_eos_runs_to_max_tokens(stack: Stack) -> None:
    result = generate(stack, prompt="The End.", max_tokens=30, ignore_eos=True, **GREEDY)
    assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
    assert result.finished.usage.completion_tokens == 30


def test_cancelled_streams_slot_serves_the_next_request_at_once(stack: Stack) -> None:
    stub = stack.host_stub
    running = stub.Generate(host_request(model="gemma-one-slot", prompt="A", max_tokens=400))
    next(running)  # holds the only slot
    engine = stack.engine("gemma-one-slot")  # loaded by now, whatever ran before
    waiting = stub.Generate(host_request(model="gemma-one-slot", prompt="B", max_tokens=4))
    wait_until(lambda: engine.load().queued == 1, timeout=10)
    time.sleep(0.3)
    cancelled_at = time.perf_counter()
    running.cancel()
    first = next(waiting)
    handed_over_s = time.perf_counter() - cancelled_at
    rest = collect(waiting)
    assert first.HasField("token")
    assert rest.finished.usage.completion_tokens == 4
    assert rest.finished.timings.queue_ms >= 300
    # The slot went to the waiting request within a few decode steps, not after 400 tokens.
    assert handed_over_s < 2.0


def test_queue_full_error_names_the_queue_length(stack: Stack) -> None:
    stub = stack.host_stub
    engine = stack.engine("gemma-one-slot")
    running = stub.Generate(host_request(model="gemma-one-slot", prompt="A", max_tokens=300))
    next(running)
    waiting = stub.Generate(host_request(model="gemma-one-slot", prompt="B", max_tokens=2))
    wait_until(lambda: engine.load().queued == 1, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Generate(host_request(model="gemma-one-slot", prompt="C")))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is full: 1 requests wait for its 1 slots" in info.value.details()
    running.cancel()
    assert collect(waiting).finished.usage.completion_tokens == 2


def test_deadline_passing_in_the_queue_is_deadline_exceeded(stack: Stack) -> None:
    stub = stack.host_stub
    engine = stack.engine("gemma-one-slot")
    running = stub.Generate(host_request(model="gemma-one-slot", prompt="A", max_tokens=400))
    next(running)
    with pytest.raises(grpc.RpcError) as info:
        collect(stub.Generate(host_request(model="gemma-one-slot", prompt="B"), timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its place in the queue is given up at once, not when the slot frees.
    wait_until(lambda: engine.load().queued == 0, timeout=2)
    assert engine.load().slots_busy == 1
    running.cancel()


def test_engine_drops_a_queued_request_when_its_deadline_passes(stack: Stack) -> None:
    stub = stack.host_stub
    engine = stack.engine("gemma-one-slot")
    running = stub.Generate(host_request(model="gemma-one-slot", prompt="A", max_tokens=400))
    next(running)
    received: list[Event] = []
    done = threading.Event()

    def on_events(events: list[Event]) -> None:
        received.extend(events)
        done.set()

    now = time.perf_counter()
    engine.submit(
        EngineRequest(
            id="expires",
            prompt=[2, 1596],
            sampling=Sampling(),
            max_tokens=4,
            stop=[],
            on_events=on_events,
            arrived=now,
            deadline=now + 0.3,
        )
    )
    assert done.wait(5)
    dropped_after = time.perf_counter() - now
    running.cancel()
    [event] = received
    assert isinstance(event, Rejected) and isinstance(event.error, DeadlineExceeded)
    assert "slots" in str(event.error)
    assert 0.3 <= dropped_after < 1.5
    assert engine.load().queued == 0


def test_stop_string_spanning_tokens_is_cut_and_not_leaked(stack: Stack) -> None:
    fields = {"prompt": "Once upon a time", "max_tokens": 24, **GREEDY}
    free = generate(stack, **fields)
    # A stop string made of the end of one token's text and the start of the next one's.
    k = next(i for i in range(2, len(free.deltas)) if len(free.deltas[i]) >= 3)
    stop = free.deltas[k - 1][-2:] + free.deltas[k][:2]
    stopped = generate(stack, stop=[stop], **fields)
    assert stopped.finished.reason == generate_pb2.FINISH_REASON_STOP
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stop not in stopped.text


SYSTEM = (
    "You are a terse assistant for a hardware shop. Answer in one short sentence, name the "
    "aisle where the item is found, and never recommend a competitor."
)


def test_a_shared_system_prompt_is_reused_and_counted(stack: Stack) -> None:
    engine = stack.engine("gemma-3-270m")
    first = generate(
        stack, messages=[("system", SYSTEM), ("user", "Where are the hammers?")], max_tokens=4
    )
    before = engine.load().prompt_tokens_reused
    second = generate(
        stack, messages=[("system", SYSTEM), ("user", "Do you sell paint?")], max_tokens=4
    )
    reused = second.finished.usage.cached_prompt_tokens
    # Gemma folds the system prompt into the first user turn, so the shared part is the
    # system text and a little of the template around it.
    assert reused >= 30
    assert reused < second.finished.usage.prompt_tokens
    assert engine.load().prompt_tokens_reused - before == reused
    assert first.finished.usage.prompt_tokens > 30


def test_a_continued_chat_reuses_the_previous_turn(stack: Stack) -> None:
    turn = [("user", "Name a colour.")]
    first = generate(stack, messages=turn, max_tokens=6, **GREEDY)
    follow_up = [*turn, ("assistant", first.text), ("user", "And another one?")]
    second = generate(stack, messages=follow_up, max_tokens=6, **GREEDY)
    # Everything up to the first turn's prompt was still in the cache.
    assert second.finished.usage.cached_prompt_tokens >= first.finished.usage.prompt_tokens


def test_a_prefix_is_shared_with_a_sequence_still_running(stack: Stack) -> None:
    prompt = "The following is a list of every river in Europe, longest first: "
    running = stack.host_stub.Generate(host_request(prompt=prompt, max_tokens=300))
    next(running)
    second = generate(stack, prompt=prompt + "the Volga, the", max_tokens=2)
    running.cancel()
    assert second.finished.usage.cached_prompt_tokens >= 14


@pytest.fixture
def fragile_engine(model_path):  # type: ignore[no-untyped-def]
    """An engine of its own, for tests that break it."""
    model = LlamaModel(
        model_path,
        gpu_layers=0,
        settings=ContextSettings(slots=1, context_per_slot=128, batch_tokens=32, threads=2),
    )
    engine = LlamaEngine(model, name="fragile", slots=1, max_queue=4)
    yield engine
    engine.close()


def engine_request(received: list[Event], prompt: list, **sampling) -> EngineRequest:  # type: ignore[no-untyped-def, type-arg]
    return EngineRequest(
        id=f"r{len(received)}",
        prompt=prompt,
        sampling=Sampling(**sampling),
        max_tokens=4,
        stop=[],
        on_events=received.extend,
        arrived=time.perf_counter(),
    )


def test_a_request_the_sampler_cannot_take_fails_alone(fragile_engine: LlamaEngine) -> None:
    received: list[Event] = []
    # Values the service refuses before they reach the engine; the engine copes anyway.
    fragile_engine.submit(engine_request(received, [2, 1596], top_k=-5))
    fragile_engine.submit(engine_request(received, [2, 1596], temperature=0.0))
    wait_until(lambda: len([e for e in received if isinstance(e, Finish)]) == 2, timeout=10)
    first, *_, last = received
    assert isinstance(first, Finish) and first.reason is FinishReason.ERROR
    assert "cannot sample with these settings" in first.error
    assert isinstance(last, Finish) and last.reason is FinishReason.LENGTH
    assert fragile_engine.failure is None


def test_an_engine_that_failed_refuses_new_requests_instead_of_hanging(
    fragile_engine: LlamaEngine,
) -> None:
    received: list[Event] = []
    # A token that is not an integer cannot enter a llama_batch: a fault inside the decode
    # loop, which stops the engine thread.
    fragile_engine.submit(engine_request(received, [2, "not a token"]))
    wait_until(lambda: fragile_engine.failure is not None, timeout=10)
    wait_until(lambda: bool(received), timeout=10)
    [finish] = received
    assert isinstance(finish, Finish) and finish.reason is FinishReason.ERROR
    with pytest.raises(Unavailable) as info:
        fragile_engine.submit(engine_request(received, [2, 1596]))
    assert "'fragile' stopped decoding after an error" in str(info.value)


def test_the_host_reports_the_prefixes_its_slots_hold_and_keeps_them_where_they_are(
    model_path,  # type: ignore[no-untyped-def]
) -> None:
    """A continuation is decoded in the slot that holds its start, so other prompts' cells stay
    (the least recently used slot would have been overwritten); what each slot holds is
    reported as prefix blocks, whose hashes the engine takes as given."""
    model = LlamaModel(
        model_path,
        gpu_layers=0,
        settings=ContextSettings(slots=2, context_per_slot=128, batch_tokens=64, threads=2),
    )
    engine = LlamaEngine(model, name="prefixes", slots=2, max_queue=4)
    document = [2, *range(1000, 1030)]

    def run(prompt: list[int], blocks: tuple[tuple[int, int], ...]) -> Finish:
        received: list[Event] = []
        request = engine_request(received, prompt, temperature=0.0)
        request.blocks = blocks
        engine.submit(request)
        wait_until(lambda: any(isinstance(e, Finish) for e in received), timeout=30)
        finish = received[-1]
        assert isinstance(finish, Finish) and finish.reason is FinishReason.LENGTH
        return finish

    try:
        run([2, *range(2000, 2020)], ((11, 21),))  # another prompt, in the first slot
        run([*document, 5, 6, 7, 8], ((21, 31), (22, 35)))  # the document, in the second
        assert engine.load().cached_prefixes == {11: 21, 21: 31, 22: 35}
        # The next question on the document: in place, in the second slot, not the first.
        second = run([*document, 9, 10, 11, 12], ((21, 31), (23, 35)))
        assert second.cached_prompt_tokens == 31
        assert engine.load().cached_prefixes == {11: 21, 21: 31, 23: 35}
    finally:
        engine.close()


def test_a_prompt_that_shares_a_long_prefix_with_one_being_computed_waits_for_its_cells() -> None:
    """Two requests on one document at once: the second is admitted once the first has
    computed the shared part, and takes those cells instead of computing them beside it.
    (SmolLM2: no sliding window, so cells can be lent midway.)"""
    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None
    model = LlamaModel(
        chat.path,
        gpu_layers=0,
        settings=ContextSettings(slots=2, context_per_slot=512, batch_tokens=64, threads=2),
    )
    engine = LlamaEngine(model, name="shared", slots=2, max_queue=4)
    document = [1, *range(1000, 1300)]
    received: list[list[Event]] = [[], []]
    try:
        for n, question in enumerate(([5, 6, 7], [8, 9, 10])):
            engine.submit(engine_request(received[n], [*document, *question], temperature=0.0))
        wait_until(lambda: all(r and isinstance(r[-1], Finish) for r in received), timeout=60)
        first, second = (r[-1] for r in received)
        assert isinstance(first, Finish) and isinstance(second, Finish)
        assert first.cached_prompt_tokens == 0
        assert second.cached_prompt_tokens == len(document)
        assert second.reason is FinishReason.LENGTH
    finally:
        engine.close()


def test_a_short_prompt_is_not_held_behind_a_long_prompts_prefill(model_path) -> None:  # type: ignore[no-untyped-def]
    """Prompt chunks go least-left-first: a short prompt submitted with (or just after) a long
    one gets its first token while the long one is still being computed, instead of after its
    whole prefill (head-of-line blocking: a chat turn behind a document)."""
    model = LlamaModel(
        model_path,
        gpu_layers=0,
        settings=ContextSettings(slots=2, context_per_slot=512, batch_tokens=64, threads=2),
    )
    engine = LlamaEngine(model, name="fair", slots=2, max_queue=4)
    order: list[str] = []

    def submit(name: str, prompt: list[int]) -> list[Event]:
        received: list[Event] = []
        request = engine_request(received, prompt, temperature=0.0)
        request.max_tokens = 2

        def on_events(events: list[Event]) -> None:
            if any(isinstance(e, Delta) for e in events) and name not in order:
                order.append(name)
            received.extend(events)

        request.on_events = on_events
        engine.submit(request)
        return received

    try:
        long = submit("long", [2, *range(1000, 1300)])  # five 64-token steps of prefill
        short = submit("short", [2, *range(2000, 2010)])
        for received in (long, short):
            wait_until(lambda r=received: any(isinstance(e, Finish) for e in r), timeout=60)
        assert order == ["short", "long"]
    finally:
        engine.close()


def test_constrained_sequences_leave_the_free_ones_in_their_batch_unchanged() -> None:
    """A free greedy sequence decoded beside three constrained ones (their tokens checked and
    their rows masked every step) gets the text it gets beside three free ones: the
    constraint touches only its own sequence. Each run has a fresh engine, all four are
    admitted in one step and the others outlive it, so the batch has the same shape."""
    chat = embedded_chat_model_config()
    assert chat is not None and chat.path is not None
    regex = grammar_of(Constraint(ConstraintKind.REGEX, "[a-z ]{0,600}"), "regex")

    def run(constrained: bool) -> tuple[str, int]:
        assert chat is not None and chat.path is not None
        settings = ContextSettings(slots=5, context_per_slot=256, batch_tokens=256, threads=2)
        model = LlamaModel(chat.path, gpu_layers=0, settings=settings)
        engine = LlamaEngine(model, name="mixed", slots=5, max_queue=8)
        try:
            gate, holding = threading.Event(), threading.Event()
            blocker = engine_request([], [2, 1596], temperature=0.0)
            blocker.max_tokens = 1

            def hold(events: list[Event]) -> None:  # the engine thread, until the gate opens
                holding.set()
                gate.wait(30)

            blocker.on_events = hold
            engine.submit(blocker)
            assert holding.wait(30)  # the four below arrive while it holds
            received: list[Event] = []
            chat_prompt = (
                "<|im_start|>user\nTell me about the moon.<|im_end|>\n<|im_start|>assistant\n"
            )
            free = engine_request(received, model.tokenize(chat_prompt), temperature=0.0)
            free.max_tokens = 40
            engine.submit(free)
            masks = []
            for n in (12, 345, 6789):
                request = engine_request(
                    [], model.tokenize(f"Write {n} in words:"), temperature=0.0
                )
                request.max_tokens, request.ignore_eos = 60, True
                if constrained:
                    request.constraint = engine.constraints().constraint(regex, "regex")
                    masks.append(request.constraint)
                engine.submit(request)
            gate.set()  # all four wait in the inbox: admitted together
            wait_until(lambda: any(isinstance(e, Finish) for e in received), timeout=60)
            text = "".join(e.text for e in received if isinstance(e, Delta))
            return text, sum(m.masks_computed for m in masks)
        finally:
            engine.close()

    beside_free, _ = run(constrained=False)
    beside_constrained, masked = run(constrained=True)
    assert masked > 0  # the constrained ones really were masked
    assert beside_constrained == beside_free and len(beside_free) > 40


def test_a_steps_events_reach_their_event_loop_in_one_hand_off(model_path) -> None:  # type: ignore[no-untyped-def]
    """Requests received on an event loop get their events there, a step's events for all
    of them in one call_soon_threadsafe (one wake-up of the loop a step, not one a request)."""
    model = LlamaModel(
        model_path,
        gpu_layers=0,
        settings=ContextSettings(slots=4, context_per_slot=64, batch_tokens=32, threads=2),
    )
    engine = LlamaEngine(model, name="hand-off", slots=4, max_queue=4)
    loop = asyncio.new_event_loop()
    hand_offs = 0
    threadsafe = loop.call_soon_threadsafe

    def counted(*args):  # type: ignore[no-untyped-def]
        nonlocal hand_offs
        hand_offs += 1
        return threadsafe(*args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    received: dict[int, list[Event]] = {i: [] for i in range(4)}
    threads: set[threading.Thread] = set()

    async def run() -> None:
        done = loop.create_future()

        def on_events(i: int, events: list[Event]) -> None:
            threads.add(threading.current_thread())
            received[i].extend(events)
            if all(any(isinstance(e, Finish) for e in got) for got in received.values()):
                if not done.done():
                    done.set_result(None)

        for i in range(4):
            engine.submit(
                EngineRequest(
                    id=f"r{i}",
                    prompt=[2, 1596 + i],
                    sampling=Sampling(temperature=0.0),
                    max_tokens=8,
                    stop=[],
                    on_events=functools.partial(on_events, i),
                    arrived=time.perf_counter(),
                    ignore_eos=True,
                    loop=loop,
                )
            )
        await asyncio.wait_for(done, 60)

    try:
        loop.run_until_complete(run())
    finally:
        engine.close()
        loop.close()
    assert threads == {threading.main_thread()}
    for events in received.values():
        assert sum(e.token_count for e in events if isinstance(e, Delta)) == 8
    # 8 steps once all four run (a few more if they were admitted apart): one hand-off each,
    # where one a request made 32 or more.
    assert hand_offs <= 14, hand_offs
