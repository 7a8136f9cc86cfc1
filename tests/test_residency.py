"""Residency over real gRPC: the embedded model registered under several names, each a model
of its own to the host, under memory budgets that fit only some of them."""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from airouter.cli import format_status
from airouter.v1 import model_host_pb2
from modelhost.config import embedded_model_config
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.generation import EngineRequest, Sampling
from modelhost.gguf_header import GGUFError, read_gguf_header
from modelhost.memory import estimate_footprint
from tests.conftest import scrape_metrics, wait_until
from tests.hosts import ERROR, LOADING, NOT_LOADED, READY, UNLOADING, running_host, small
from tests.streaming import collect, host_request


@pytest.fixture(scope="module")
def footprint() -> int:
    """Bytes one small model takes once loaded, as the host measures it."""
    with running_host([small("probe")]) as host:
        # The host sizes configured models from their files in the background at start.
        wait_until(lambda: host.model("probe").footprint_bytes > 0, timeout=10)
        estimated = host.model("probe").footprint_bytes
        assert not host.model("probe").footprint_measured
        host.stub.LoadModel(model_host_pb2.LoadModelRequest(model="probe"), timeout=60)
        measured = host.model("probe")
        assert measured.footprint_measured
        # The estimate from the GGUF header is close to what llama.cpp allocates.
        assert 0.8 < estimated / measured.footprint_bytes < 1.25
        return int(measured.footprint_bytes)


def budget_for(models: float, footprint: int) -> str:
    return str(int(footprint * models))


def test_least_recently_used_idle_model_is_evicted(footprint: int) -> None:
    models = [small("a"), small("b"), small("c")]
    with running_host(models, memory_budget=budget_for(2.5, footprint)) as host:
        host.generate("a")
        host.generate("b")
        host.generate("a")  # a is now more recent than b
        host.generate("c")
        assert host.states() == {"a": READY, "b": NOT_LOADED, "c": READY}
        cache = host.status().cache
        assert (cache.hits, cache.misses, cache.evictions, cache.loads) == (1, 3, 1, 3)
        host.generate("a")  # resident: no load
        assert host.status().cache.loads == 3


def test_pinned_model_is_never_evicted(footprint: int) -> None:
    models = [small("a", pinned=True), small("b"), small("c")]
    with running_host(models, memory_budget=budget_for(2.5, footprint)) as host:
        host.generate("a")
        host.generate("b")
        host.generate("c")  # a is the oldest but pinned: b goes
        assert host.states() == {"a": READY, "b": NOT_LOADED, "c": READY}


def test_model_with_a_live_stream_is_never_evicted(footprint: int) -> None:
    models = [small("a"), small("b")]
    with running_host(models, memory_budget=budget_for(1.5, footprint)) as host:
        host.generate("a")
        stream = host.stub.Generate(
            host_request(model="a", prompt="Count:", max_tokens=200, ignore_eos=True), timeout=60
        )
        next(stream)  # a is decoding
        with pytest.raises(grpc.RpcError) as info:
            host.generate("b")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = info.value.details()
        assert "'b' needs" in message and "a (" in message and "1 requests" in message
        assert host.states() == {"a": READY, "b": NOT_LOADED}
        collect(stream)
        host.generate("b")  # a is idle now and makes room
        assert host.states() == {"a": NOT_LOADED, "b": READY}


def test_model_that_can_never_fit_says_what_is_needed(footprint: int) -> None:
    with running_host([small("a")], memory_budget=budget_for(0.5, footprint)) as host:
        with pytest.raises(grpc.RpcError) as info:
            host.generate("a")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "raise memory_budget" in info.value.details()
        assert host.states() == {"a": NOT_LOADED}


def test_keep_alive_unloads_idle_models(footprint: int) -> None:
    # "soon" keeps 5 s: loading "never" after it and the host's once-a-second sweep that
    # unloads "now" can take more than a second on a busy machine (a 1 s keep-alive made the
    # check that "soon" outlives "now" flaky).
    models = [small("now", keep_alive=0), small("soon", keep_alive=5), small("never")]
    with running_host(models) as host:
        for name in ("now", "soon", "never"):
            host.generate(name)
        wait_until(lambda: host.states()["now"] == NOT_LOADED, timeout=5)
        assert host.states()["soon"] == READY
        wait_until(lambda: host.states()["soon"] == NOT_LOADED, timeout=15)
        assert host.states()["never"] == READY  # past the others' keep-alive, still loaded
        host.generate("now")  # loads again on use
        assert host.status().cache.loads == 4


def test_ten_requests_for_a_cold_model_cause_one_load() -> None:
    with running_host([small("cold")]) as host:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: host.generate("cold"), range(10)))
        assert all(r.finished.usage.completion_tokens == 2 for r in results)
        cache = host.status().cache
        assert cache.loads == 1
        assert cache.misses + cache.hits == 10 and cache.misses >= 1


def test_health_and_other_models_answer_while_a_model_loads() -> None:
    with running_host([small("a", preload=True), small("b")]) as host:
        wait_until(lambda: host.states()["a"] == READY)
        load = host.stub.LoadModel.future(model_host_pb2.LoadModelRequest(model="b"), timeout=60)
        wait_until(lambda: host.states()["b"] == LOADING, timeout=10)
        assert host.generate("a").finished.usage.completion_tokens == 2
        load.result()
        assert host.states()["b"] == READY


def test_corrupt_gguf_gives_an_error_state_and_the_host_keeps_serving(
    tmp_path: Path, model_path: Path
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as source, truncated.open("wb") as target:
        target.write(source.read(model_path.stat().st_size // 2))
    models = [small("garbage", path=garbage), small("truncated", path=truncated), small("good")]
    with running_host(models) as host:
        for name, reason in [("garbage", "not a GGUF file"), ("truncated", "could not load")]:
            with pytest.raises(grpc.RpcError) as info:
                host.generate(name)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason in info.value.details()
            status = host.model(name)
            assert status.state == ERROR and reason in status.state_detail
            # Within the backoff the next request fails at once, saying when the retry is.
            with pytest.raises(grpc.RpcError) as info:
                host.generate(name)
            assert "retries in" in info.value.details()
        assert host.generate("good").finished.usage.completion_tokens == 2
        assert host.status().cache.load_failures == 2
        # A fixed file loads on the next explicit load.
        shutil.copyfile(model_path, garbage)
        host.stub.LoadModel(model_host_pb2.LoadModelRequest(model="garbage"), timeout=60)
        assert host.model("garbage").state == READY


def test_watch_status_shows_each_state_transition() -> None:
    with running_host([small("a")]) as host:
        seen: list[int] = []
        watch = host.stub.WatchStatus(model_host_pb2.WatchStatusRequest(interval_ms=5000))

        def follow() -> None:
            try:
                for update in watch:
                    state = update.status.models[0].state
                    if not seen or seen[-1] != state:
                        seen.append(state)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED  # by the test, at its end

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        wait_until(lambda: seen == [NOT_LOADED])
        loaded = host.stub.LoadModel(model_host_pb2.LoadModelRequest(model="a"), timeout=60)
        assert loaded.model.state == READY and loaded.model.footprint_measured
        unloaded = host.stub.UnloadModel(model_host_pb2.UnloadModelRequest(model="a"), timeout=60)
        assert unloaded.model.state == NOT_LOADED
        wait_until(lambda: len(seen) == 5, timeout=5)
        watch.cancel()
        assert seen == [NOT_LOADED, LOADING, READY, UNLOADING, NOT_LOADED]


def test_load_and_unload_errors() -> None:
    with running_host([small("a")]) as host:
        for call, request in [
            (host.stub.LoadModel, model_host_pb2.LoadModelRequest(model="/etc/passwd")),
            (host.stub.UnloadModel, model_host_pb2.UnloadModelRequest(model="nope")),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "it serves: a" in info.value.details()
        stream = host.stub.Generate(
            host_request(model="a", prompt="Count:", max_tokens=200, ignore_eos=True), timeout=60
        )
        next(stream)
        with pytest.raises(grpc.RpcError) as info:
            host.stub.UnloadModel(model_host_pb2.UnloadModelRequest(model="a"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serving 1 requests" in info.value.details()
        stream.cancel()


def test_status_reports_memory_load_and_recent_rates() -> None:
    with running_host([small("a", slots=2, keep_alive=60)], memory_budget="3GiB") as host:
        host.stub.LoadModel(model_host_pb2.LoadModelRequest(model="a"), timeout=60)
        # The host samples token counts once a second: one sample before, one after.
        samples = host.server.residency.resolve("a").rate_samples
        wait_until(lambda: len(samples) >= 1)
        for _ in range(2):
            host.generate("a", max_tokens=16, ignore_eos=True)
        wait_until(lambda: host.status().models[0].recent_tokens_per_second > 0)
        status = host.status()
        assert status.device == "cpu" and status.host_name
        memory = status.memory
        assert memory.budget_bytes == 3 << 30
        assert 0 < memory.used_bytes < memory.total_bytes
        model = status.models[0]
        assert memory.models_bytes == model.footprint_bytes > 0
        assert (model.slots, model.slots_busy, model.queue_depth) == (2, 0, 0)
        assert model.tokens_generated == 32
        assert model.recent_tokens_per_second > 0
        assert model.recent_time_to_first_token_ms > 0
        assert model.keep_alive_seconds == 60 and not model.pinned
        assert model.load_seconds > 0 and model.HasField("last_used")
        assert abs(model.last_used.ToSeconds() - time.time()) < 5


def test_metrics_endpoint_reports_the_status_figures(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model")
    models = [small("a"), small("broken", path=garbage)]
    with running_host(models, metrics_listen="127.0.0.1:0") as host:
        assert host.server.metrics is not None
        url = f"http://127.0.0.1:{host.server.metrics.port}/metrics"

        before = scrape_metrics(url)
        assert before['airouter_modelhost_model_state{model="a",state="not_loaded"}'] == 1
        assert before["airouter_modelhost_loads_total"] == 0
        host.generate("a", max_tokens=8, ignore_eos=True)
        after = scrape_metrics(url)
        assert after['airouter_modelhost_model_state{model="a",state="ready"}'] == 1
        assert after["airouter_modelhost_loads_total"] == 1
        assert after["airouter_modelhost_cache_misses_total"] == 1
        assert after['airouter_modelhost_model_tokens_generated_total{model="a"}'] == 8
        assert after["airouter_modelhost_memory_models_bytes"] > 0
        assert after['airouter_modelhost_requests_total{model="a",outcome="length"}'] == 1
        assert after['airouter_modelhost_tokens_total{kind="completion",model="a"}'] == 8
        assert after['airouter_modelhost_time_to_first_token_seconds_count{model="a"}'] == 1
        assert after['airouter_modelhost_request_seconds_count{model="a"}'] == 1
        with pytest.raises(grpc.RpcError):
            host.generate("broken")
        refused = scrape_metrics(url)
        assert (
            refused['airouter_modelhost_requests_total{model="broken",outcome="unavailable"}'] == 1
        )


def test_gguf_header_reads_the_model_metadata(model_path: Path) -> None:
    header = read_gguf_header(model_path)
    assert header.architecture == "gemma3"
    assert header.arch_int("block_count") == 18
    assert header.array_lengths["tokenizer.ggml.tokens"] == 262144
    assert header.file_bytes == model_path.stat().st_size


@pytest.mark.parametrize("kept", [0, 3, 30, 1 << 20])  # empty, magic, first key, vocabulary
def test_gguf_header_of_a_truncated_file_says_so(
    model_path: Path, tmp_path: Path, kept: int
) -> None:
    truncated = tmp_path / "cut.gguf"
    with model_path.open("rb") as source:
        truncated.write_bytes(source.read(kept))
    with pytest.raises(GGUFError, match=r"truncated|not a GGUF file"):
        read_gguf_header(truncated)


def test_status_table_is_readable() -> None:
    with running_host([small("a", pinned=True), small("b", keep_alive=30)]) as host:
        host.generate("a")
        table = format_status(host.status())
    lines = table.splitlines()
    assert lines[0].startswith("host ") and "device cpu" in lines[0]
    assert "1 misses" in lines[1] and "1 loads" in lines[1]
    row_a = next(line for line in lines if line.startswith("a "))
    row_b = next(line for line in lines if line.startswith("b "))
    assert "ready" in row_a and "pinned" in row_a and "s ago" in row_a
    assert "not_loaded" in row_b and "30 s" in row_b and "never" in row_b


def test_a_model_whose_engine_failed_is_reloaded_by_the_next_request() -> None:
    with running_host([small("a")]) as host:
        host.generate("a")
        engine = host.server.residency.resolve("a").engine
        assert engine is not None
        # A fault inside the decode loop (a token that is not an integer) stops the engine.
        engine.submit(
            EngineRequest(
                id="fault",
                prompt=[2, "not a token"],  # type: ignore[list-item]
                sampling=Sampling(),
                max_tokens=2,
                stop=[],
                on_events=lambda events: None,
                arrived=time.perf_counter(),
            )
        )
        wait_until(lambda: host.model("a").state == ERROR, timeout=10)
        assert "decoding stopped after an error" in host.model("a").state_detail
        assert host.generate("a").finished.usage.completion_tokens == 2
        assert host.model("a").state == READY and host.status().cache.loads == 2


def test_watch_status_sends_at_most_ten_updates_a_second() -> None:
    """A client asking for an update every millisecond gets one every 100 ms."""
    with running_host([small("a")]) as host:
        watch = host.stub.WatchStatus(model_host_pb2.WatchStatusRequest(interval_ms=1))
        started, updates = time.monotonic(), 0
        for _ in watch:
            updates += 1
            if time.monotonic() - started >= 1.0:
                break
        watch.cancel()
        assert updates <= 12


def test_max_queue_zero_means_no_waiting_not_no_requests() -> None:
    """Two slots and max_queue = 0: two requests run at once, a third is refused."""
    with running_host([small("a", slots=2, max_queue=0, preload=True)]) as host:
        wait_until(lambda: host.states()["a"] == READY, 60)
        first = host.stub.Generate(host_request(model="a", prompt="A", max_tokens=200))
        second = host.stub.Generate(host_request(model="a", prompt="B", max_tokens=200))
        assert next(first).HasField("token") and next(second).HasField("token")
        with pytest.raises(grpc.RpcError) as info:
            host.generate("a")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
        second.cancel()
        wait_until(lambda: host.status().models[0].slots_busy == 0, 10)
        assert host.generate("a").finished.usage.completion_tokens == 2


@pytest.mark.parametrize("full", [False, True])
def test_sliding_window_layers_keep_only_their_window_unless_asked(full: bool) -> None:
    """Gemma 3 has 15 sliding-window layers of 18: by default they keep each sequence's last
    512 cells, as llama-server does; full_swa_cache keeps the whole context. The estimate
    from the GGUF header follows both within 3%."""
    path = embedded_model_config().model_path(Path.home() / ".cache" / "airouter")
    header = read_gguf_header(path)
    estimate = estimate_footprint(
        header,
        on_device_share=1.0,
        context_tokens=4 * 2048,
        batch_tokens=256,
        cache_type_k="f16",
        cache_type_v="f16",
        slots=4,
        full_swa_cache=full,
    )
    model = LlamaModel(
        path, gpu_layers=0, settings=ContextSettings(4, 2048, 256, 1, full_swa_cache=full)
    )
    try:
        measured = sum(model.buffers.values())
    finally:
        model.close()
    assert abs(estimate / measured - 1) < 0.03
    kv_full = 18 * 4 * 2048 * 1024  # layers x tokens x bytes per layer and token
    kv_lean = (3 * 4 * 2048 + 15 * 2304) * 1024  # 15 layers hold 4 x 512 + 256, padded
    other = measured - (kv_full if full else kv_lean)
    assert 0 < other < 700 << 20  # the weights and compute buffers, the same both ways
