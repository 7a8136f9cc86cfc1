"""The MLX engine on this machine's CPU (mlx[cpu]), with the embedded Gemma 3 270M converted
from its GGUF into an mlx-lm directory once per machine (float32: on a CPU mlx's float32
matmuls use the BLAS, its quantized ones do not)."""

import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import structlog.testing

import modelhost.engines.mlxlm  # noqa: F401  (first: it puts OpenBLAS under mlx)

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from airouter.errors import DeadlineExceeded, ResourceExhausted
from airouter.v1 import generate_pb2
from airouter.v1.gateway_pb2_grpc import GatewayStub
from airouter.v1.model_host_pb2_grpc import ModelHostStub
from modelhost.config import ModelConfig, embedded_chat_model_config
from modelhost.engines import HostSettings, model_files
from modelhost.engines.llamacpp.engine import LlamaEngine
from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel
from modelhost.engines.mlxlm.engine import MlxEngine
from modelhost.generation import (
    Delta,
    EngineRequest,
    Event,
    Finish,
    FinishReason,
    Rejected,
    Sampling,
)
from tests.conftest import scrape_metrics, wait_until
from tests.hosts import ERROR, READY, running_host, small
from tests.processes import ServerProcess
from tests.streaming import collect, gateway_request, host_request
from tests.tiny_models import tiny_mlx_llama

CACHE = Path.home() / ".cache" / "airouter"
GREEDY = Sampling(temperature=0.0)
# Greedy continuations the float32 conversion and llama.cpp's Q4_K_M agree on token for token
# (elsewhere the two differ at near-ties, as two llama.cpp builds can).
PROMPT = "def fibonacci(n):"


def mlx_config(name: str = "gemma-mlx", **settings: object) -> ModelConfig:
    return small(name, engine="mlx", **settings)


@contextmanager
def running_engine(
    path: Path,
    name: str,
    *,
    slots: int = 1,
    context: int = 512,
    batch_tokens: int = 64,
    device: str = "cpu",
) -> Iterator[MlxEngine]:
    """An MLX engine on the model directory, as many may wait as there are slots; closed
    after the block."""
    engine = MlxEngine(
        path,
        name=name,
        slots=slots,
        max_queue=slots,
        context_per_slot=context,
        batch_tokens=batch_tokens,
        device=device,
    )
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def mlx_dir() -> Path:
    """The embedded GGUF converted for the CPU, as a host with engine = "mlx" finds it."""
    return model_files(mlx_config(), HostSettings(device="cpu", threads=2, cache_dir=CACHE))


@pytest.fixture(scope="module")
def engine(mlx_dir: Path) -> Iterator[MlxEngine]:
    with running_engine(mlx_dir, "mlx", slots=8, batch_tokens=128) as engine:
        yield engine


class Collector:
    """An EngineRequest's events, gathered on the engine thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.first_delta = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)
        if any(isinstance(e, Delta) for e in events):
            self.first_delta.set()
        if any(isinstance(e, Finish | Rejected) for e in events):
            self.done.set()

    @property
    def text(self) -> str:
        assert self.done.wait(120), "no Finish within 120 s"
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def finish(self) -> Finish:
        assert self.done.wait(120), "no Finish within 120 s"
        finish = self.events[-1]
        assert isinstance(finish, Finish)
        return finish


def submit(
    engine: MlxEngine | LlamaEngine,
    prompt: str,
    max_tokens: int,
    sampling: Sampling = GREEDY,
    **fields: object,
) -> tuple[EngineRequest, Collector]:
    received = Collector()
    request = EngineRequest(
        id=prompt[:16],
        prompt=engine.tokenize(prompt),
        sampling=sampling,
        max_tokens=max_tokens,
        stop=list(fields.pop("stop", [])),  # type: ignore[call-overload]
        on_events=received,
        arrived=time.perf_counter(),
        **fields,  # type: ignore[arg-type]
    )
    engine.submit(request)
    return request, received


def test_greedy_text_and_tokens_equal_llama_cpp_on_the_gguf(
    engine: MlxEngine, model_path: Path
) -> None:
    model = LlamaModel(model_path, gpu_layers=0, settings=ContextSettings(1, 512, 128, 2))
    llama = LlamaEngine(model, name="gguf", slots=1, max_queue=1)
    try:
        awkward = [
            "  two spaces\tand a tab\n\n\nthree newlines",
            "emoji 😀🤖, ünïcödé, 中文字符 and \U0001d518\U0001d52b\U0001d526 (fraktur)",
            "<start_of_turn>user\nhi<end_of_turn>\n</footer> <b>html</b>",
            "def f(x):\n    return x**2  # code\n",
            "\u200b zero width, \x00 nul, http://example.com/a?b=c&d=e 3.14159",
            Path(__file__).read_text()[:4000],
        ]
        for text in awkward:
            assert engine.tokenize(text) == llama.tokenize(text), text[:40]
        _, ours = submit(engine, PROMPT, 32)
        _, theirs = submit(llama, PROMPT, 32)
        assert ours.finish.completion_tokens == theirs.finish.completion_tokens == 32
        assert ours.text == theirs.text
        assert ours.finish.engine == "mlx" and theirs.finish.engine == "llama.cpp"
    finally:
        llama.close()


def test_eight_concurrent_requests_share_decode_steps(engine: MlxEngine) -> None:
    before = engine.load()
    pending = [submit(engine, f"Story {i}: once upon a time", 6) for i in range(8)]
    for _, received in pending:
        assert received.finish.reason is FinishReason.LENGTH
        assert received.finish.completion_tokens == 6
    after = engine.load()
    tokens = after.tokens_generated - before.tokens_generated
    steps = after.decode_steps - before.decode_steps
    assert tokens == 48
    assert steps <= 24, f"{tokens} tokens took {steps} steps: the requests were not batched"
    assert after.slots_busy == 0 and after.queued == 0


def test_cancel_mid_stream_frees_the_request(engine: MlxEngine) -> None:
    request, received = submit(engine, "A long story begins", 200)
    assert received.first_delta.wait(60)
    engine.cancel(request)
    assert received.finish.reason is FinishReason.CANCELLED
    assert received.finish.completion_tokens < 200
    wait_until(lambda: engine.load().slots_busy == 0, 10)
    generator = engine._generator
    assert not generator._generation_batch.uids and not generator._prompt_batch.uids
    assert generator.prompt_cache_nbytes == 0  # its cache went with it, not to the kept ones
    assert all(kept.tokens[: len(request.prompt)] != request.prompt for kept in engine._kept)


def test_stop_strings_end_the_text_before_them(engine: MlxEngine) -> None:
    _, whole = submit(engine, PROMPT, 12)
    stop = whole.text.strip().split()[2]  # a word greedy decoding is sure to write
    _, stopped = submit(engine, PROMPT, 12, stop=[stop])
    assert stopped.finish.reason is FinishReason.STOP
    assert stop not in stopped.text
    assert whole.text.startswith(stopped.text)


def test_seeds_reproduce_and_differ(engine: MlxEngine) -> None:
    warm = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    texts = [submit(engine, "Once", 8, warm)[1] for _ in range(2)]
    other = submit(
        engine, "Once", 8, Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=12)
    )[1]
    assert texts[0].text == texts[1].text
    assert other.text != texts[0].text


def test_ignore_eos_generates_to_max_tokens_and_prefixes_are_reused(engine: MlxEngine) -> None:
    _, first = submit(engine, "The capital of France is", 4, ignore_eos=True)
    assert first.finish.completion_tokens == 4
    prompt = "The capital of France is" + first.text
    _, second = submit(engine, prompt, 2)
    # The first request's cache held its prompt and what it generated: all but the last token
    # of the new prompt (the one whose logits pick the next token) came from it.
    assert second.finish.cached_prompt_tokens == len(engine.tokenize(prompt)) - 1


def test_chat_template_renders_gemma_turns_like_llama_cpp(engine: MlxEngine) -> None:
    messages = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hey."), ("user", "Why?")]
    rendered = engine.apply_chat_template(messages)
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHey."
        "<end_of_turn>\n<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert engine.tokenize(rendered).count(2) == 1  # the template's BOS, and no second one


def test_mlx_and_gguf_models_share_one_budget_with_lru_eviction(mlx_dir: Path) -> None:
    gguf = small("gguf")
    mlx = mlx_config()
    with running_host([gguf, mlx]) as probe:
        for name in ("gguf", "gemma-mlx"):
            wait_until(lambda name=name: probe.model(name).footprint_bytes > 0, 60)
        sizes = {name: probe.model(name).footprint_bytes for name in ("gguf", "gemma-mlx")}
    budget = str(max(sizes.values()) + min(sizes.values()) // 2)  # either model, not both
    with running_host([gguf, mlx], memory_budget=budget) as host:
        assert host.generate("gguf").finished.reason == generate_pb2.FINISH_REASON_LENGTH
        result = host.generate("gemma-mlx", max_tokens=3)
        assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert host.states() == {"gguf": generate_pb2.MODEL_STATE_NOT_LOADED, "gemma-mlx": READY}
        status = host.model("gemma-mlx")
        assert status.engine == "mlx" and status.footprint_measured
        assert host.model("gguf").engine == "llama.cpp"
        assert host.generate("gguf").finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert host.states() == {"gguf": READY, "gemma-mlx": generate_pb2.MODEL_STATE_NOT_LOADED}
        assert host.status().cache.evictions == 2


def test_a_byte_level_bpe_llama_from_outside_runs_and_chats(tmp_path: Path) -> None:
    """Not a converted GGUF: a tiny random Llama with a GPT-2-style byte-level tokenizer and a
    ChatML template in tokenizer_config.json, as the mlx-community publishes models."""
    directory = tiny_mlx_llama(tmp_path / "tiny-llama")
    with running_host(
        [ModelConfig(name="tiny", path=directory, slots=2, context_length=128)]
    ) as host:
        request = host_request(
            model="tiny", messages=[("user", "héllo 😀")], max_tokens=12, ignore_eos=True
        )
        results = [collect(host.stub.Generate(request, timeout=60)) for _ in range(2)]
        assert host.model("tiny").engine == "mlx"
        # What the kept cache holds, for prefix-aware routing, as a llama.cpp slot reports it.
        assert host.model("tiny").cached_prefixes
    for result in results:
        assert result.finished.usage.completion_tokens == 12
        # <|im_start|> user \n héllo 😀 <|im_end|> \n <|im_start|> assistant \n, byte-level
        assert result.finished.usage.prompt_tokens > 8
    assert (
        results[1].finished.usage.cached_prompt_tokens
        == results[1].finished.usage.prompt_tokens - 1
    )
    with running_engine(directory, "tiny", context=128) as engine:
        text = "héllo wörld, 中文 and emoji 😀, then unseen ß and ∑"
        pieces = b"".join(engine._token_bytes(t) for t in engine.tokenize(text))
        assert pieces.decode() == text  # multi-byte characters split across tokens included
        assert engine._is_end_of_generation(engine._tokenizer.token_to_id("<|im_end|>"))
        assert engine.apply_chat_template([("user", "hi")]) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )


def test_a_chat_template_that_refuses_the_messages_is_an_invalid_argument(tmp_path: Path) -> None:
    directory = tiny_mlx_llama(tmp_path / "tiny-llama")
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + settings["chat_template"]
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    with running_host(
        [ModelConfig(name="tiny", path=directory, slots=1, context_length=128)]
    ) as host:
        request = host_request(model="tiny", messages=[("system", "Be brief."), ("user", "hi")])
        with pytest.raises(grpc.RpcError) as refused:
            collect(host.stub.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "System role not supported" in refused.value.details()
        request = host_request(
            model="tiny", messages=[("user", "hi")], max_tokens=2, ignore_eos=True
        )
        assert (
            collect(host.stub.Generate(request, timeout=60)).finished.usage.completion_tokens == 2
        )


def test_the_queue_bound_and_deadlines_hold_as_on_llama_cpp(tmp_path: Path) -> None:
    directory = tiny_mlx_llama(tmp_path / "tiny-llama")
    with running_engine(directory, "tiny") as engine:
        running, first = submit(engine, "Once upon a time", 400, ignore_eos=True)
        assert first.first_delta.wait(30)
        _, late = submit(engine, "Once", 4, deadline=time.perf_counter() + 0.2)
        with pytest.raises(ResourceExhausted, match="queue of model 'tiny' is full"):
            submit(engine, "Once", 4)
        assert late.done.wait(30)
        rejected = late.events[-1]
        assert isinstance(rejected, Rejected) and isinstance(rejected.error, DeadlineExceeded)
        engine.cancel(running)
        assert first.finish.reason is FinishReason.CANCELLED


def malformed(base: Path, tmp: Path, kind: str) -> Path:
    broken = tmp / kind
    shutil.copytree(base, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in base.glob("*.safetensors"):
        (broken / weights.name).symlink_to(weights)
    config = json.loads((broken / "config.json").read_text())
    if kind == "no-config":
        (broken / "config.json").unlink()
    elif kind == "no-tokenizer":
        (broken / "tokenizer.json").unlink()
    elif kind == "unknown-architecture":
        config["model_type"] = "no_such_model"
    elif kind == "wrong-shapes":
        config["hidden_size"] = 512
    if kind != "no-config":
        (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("no-config", "has no config.json"),
        ("no-tokenizer", "has no tokenizer.json"),
        ("unknown-architecture", "no_such_model"),
        ("wrong-shapes", "shape"),
    ],
)
def test_malformed_mlx_directory_is_an_error_and_the_host_keeps_serving(
    mlx_dir: Path, tmp_path: Path, kind: str, reason: str
) -> None:
    broken = ModelConfig(name="broken", path=malformed(mlx_dir, tmp_path, kind), slots=1)
    with running_host([broken, small("gguf")]) as host:
        with pytest.raises(grpc.RpcError) as refused:
            host.generate("broken")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason in refused.value.details()
        assert host.model("broken").state == ERROR
        assert reason in host.model("broken").state_detail
        assert host.generate("gguf").finished.reason == generate_pb2.FINISH_REASON_LENGTH


def test_streams_through_the_gateway(mlx_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[[models]]\nname = "gemma-mlx"\npath = "{mlx_dir}"\nslots = 2\n'
        "context_length = 512\npreload = true\n"
    )
    host = ServerProcess("modelhost", "serve", "--device", "cpu", "--config", str(config))
    gateway = ServerProcess("gateway", "serve", "--modelhost", host.address)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            request = gateway_request(model="gemma-mlx", prompt=PROMPT, max_tokens=8, temperature=0)
            result = collect(GatewayStub(channel).Generate(request, timeout=120))
        assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert result.finished.usage.completion_tokens == 8
        assert result.finished.host == host.address
        assert len(result.deltas) >= 2 and result.text.startswith("\n")
    finally:
        gateway.stop()
        host.stop()
    loaded = next(line for line in host.log if line.get("event") == "model_loaded")
    assert loaded["engine"] == "mlx" and loaded["mlx_device"] == "cpu"


def test_convert_gguf_writes_an_8_bit_model_that_decodes_as_llama_cpp_does(
    engine: MlxEngine, model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gemma-q8"
    command = [sys.executable, "-m", "modelhost.cli", "convert-gguf", str(model_path), str(out)]
    converted = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert converted.returncode == 0, converted.stderr
    assert "236/236" in converted.stderr  # the progress bar, tensor by tensor
    assert f'path = "{out}"' in converted.stderr
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 8 and quantization["group_size"] == 32
    with running_engine(out, "q8", context=256) as q8:
        _, ours = submit(q8, PROMPT, 16)
        _, reference = submit(engine, PROMPT, 16)  # float32, equal to llama.cpp's (above)
        assert ours.text == reference.text


def test_convert_gguf_refuses_other_architectures_and_other_files(tmp_path: Path) -> None:
    smollm2 = embedded_chat_model_config()
    assert smollm2 is not None and smollm2.path is not None
    command = [sys.executable, "-m", "modelhost.cli", "convert-gguf"]
    refused = subprocess.run(
        [*command, str(smollm2.path), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "is a llama model; convert-gguf supports gemma3" in refused.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    refused = subprocess.run(
        [*command, str(junk), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "is not a readable GGUF file" in refused.stderr
    assert not (tmp_path / "out").exists()
    # An OUT that is not a model directory is never replaced: a file, or a directory of
    # other things (a mistyped path must not delete them); refused before any work.
    keep = tmp_path / "documents"
    keep.mkdir()
    (keep / "thesis.txt").write_text("years of work")
    for out, why in (
        (keep, "convert-gguf did not write"),
        (keep / "thesis.txt", "is not a directory"),
    ):
        refused = subprocess.run(
            [*command, str(smollm2.path), str(out)], capture_output=True, text=True
        )
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    assert (keep / "thesis.txt").read_text() == "years of work"


def test_loading_without_openblas_warns_naming_the_fix(
    mlx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelhost.engines.mlxlm as mlxlm

    monkeypatch.setattr(mlxlm, "BLAS", "bundled")
    host = HostSettings(device="cpu", threads=2, cache_dir=CACHE)
    with structlog.testing.capture_logs() as logs:
        engine = mlxlm.BACKEND.open(mlx_config(), mlx_dir, host)
    engine.close()
    (warning,) = [r for r in logs if r["event"] == "mlx_without_openblas"]
    assert warning["log_level"] == "warning" and "libopenblas0-pthread" in warning["detail"]


def test_convert_gguf_replaces_only_what_it_wrote(model_path: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "modelhost.cli", "convert-gguf", "--quantize", "none"]
    # A directory that looks like a model but is someone else's: nothing in it is touched.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    (theirs / "precious.txt").write_text("keep")
    refused = subprocess.run(
        [*command, str(model_path), str(theirs)], capture_output=True, text=True, timeout=600
    )
    assert refused.returncode == 2 and "convert-gguf did not write" in refused.stderr
    assert (theirs / "precious.txt").read_text() == "keep"
    assert (theirs / "config.json").read_text() == "{}"
    # Through a symlink and a path relative to the working directory: the directory it
    # points at is written, and the path printed for models.toml is absolute.
    (tmp_path / "models").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "models", target_is_directory=True)
    converted = subprocess.run(
        [*command, str(model_path), "link"], capture_output=True, text=True, cwd=tmp_path
    )
    assert converted.returncode == 0, converted.stderr
    assert f'path = "{tmp_path / "models"}"' in converted.stderr
    assert (tmp_path / "models" / "config.json").is_file() and (tmp_path / "link").is_symlink()
    # A file added to a converted directory makes it the user's: refused, and kept.
    (tmp_path / "models" / "notes.txt").write_text("mine")
    again = subprocess.run(
        [*command, str(model_path), str(tmp_path / "models")], capture_output=True, text=True
    )
    assert again.returncode == 2 and "notes.txt" in again.stderr
    assert (tmp_path / "models" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("cut", [30, 200, "half"])
def test_convert_gguf_says_a_truncated_file_is_truncated(
    model_path: Path, tmp_path: Path, cut: int | str
) -> None:
    data = model_path.read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: len(data) // 2 if cut == "half" else int(cut)])
    command = [sys.executable, "-m", "modelhost.cli", "convert-gguf", str(truncated)]
    refused = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "truncated or not a GGUF" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not (sys.platform == "darwin" and platform.machine() == "arm64"),
    reason="the Metal path needs Apple Silicon",
)
def test_metal_serves_the_mlx_model_on_the_gpu(tmp_path: Path) -> None:
    mlx_dir = model_files(mlx_config(), HostSettings(device="metal", threads=2, cache_dir=CACHE))
    with running_engine(mlx_dir, "metal", slots=2, batch_tokens=128, device="metal") as engine:
        assert engine.describe()["mlx_device"] == "gpu"
        _, received = submit(engine, PROMPT, 16)
        assert received.finish.completion_tokens == 16


def test_the_engine_is_named_in_status_and_metrics(mlx_dir: Path) -> None:
    with running_host([mlx_config(preload=True)], metrics_listen="127.0.0.1:0") as host:
        wait_until(lambda: host.model("gemma-mlx").state == READY, 60)
        request = host_request(model="gemma-mlx", prompt="Hi", max_tokens=2)
        assert collect(host.stub.Generate(request, timeout=60)).finished.usage.completion_tokens
        metrics = scrape_metrics(f"http://127.0.0.1:{host.server.metrics.port}/metrics")
        assert metrics['airouter_modelhost_model_engine{engine="mlx",model="gemma-mlx"}'] == 1.0


def test_a_host_without_llama_cpp_serves_mlx_models(tmp_path: Path) -> None:
    # A llama_cpp package ahead of the real one that fails to import, as on a Mac with only
    # the mlx extra.
    blocked = tmp_path / "blocked" / "llama_cpp"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("no llama_cpp here (the test)")\n')
    directory = tiny_mlx_llama(tmp_path / "tiny-llama")
    config = tmp_path / "models.toml"
    config.write_text(
        f'[[models]]\nname = "tiny"\npath = "{directory}"\nslots = 2\ncontext_length = 128\n'
    )
    host = ServerProcess(
        "modelhost", "serve", "--device", "cpu", "--config", str(config),
        env={"PYTHONPATH": str(blocked.parent)},
    )  # fmt: skip
    try:
        with grpc.insecure_channel(host.address) as channel:
            request = host_request(
                model="tiny", messages=[("user", "hi")], max_tokens=4, ignore_eos=True
            )
            result = collect(ModelHostStub(channel).Generate(request, timeout=120))
        assert result.finished.reason == generate_pb2.FINISH_REASON_LENGTH
        assert result.finished.usage.completion_tokens == 4
    finally:
        host.stop()
    builds = {r["engine"]: r for r in host.log if r.get("event") == "engine_build"}
    assert builds["llama.cpp"]["installed"] is False and builds["mlx"]["installed"] is True


def test_structured_output_tools_and_logprobs_through_the_sdk(mlx_dir: Path) -> None:
    """The constraint, tool and logprob paths on the MLX engine (through its logits
    processors), asked through the gateway's HTTP edge with the `openai` SDK: twenty seeded
    answers that follow a nested schema, a required call whose arguments validate, and
    log probabilities."""
    import jsonschema
    import openai

    from gateway.server import start_gateway
    from tests.conftest import gateway_config
    from tests.test_structured_output import WEATHER, schema_format

    # test_structured_output's nested person, shorter and on one line: MLX on this CPU
    # decodes Gemma at some 10-15 tokens a second.
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "height": {"type": "number"},
            "role": {"enum": ["admin", "user"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            "home": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6}},
                "required": ["city"],
            },
        },
        "required": ["name", "age", "role", "home"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    model = mlx_config(slots=10, context_length=256, path=mlx_dir, preload=True)
    EXAMPLE = {"name": "Ann", "age": 41, "role": "user", "home": {"city": "Oslo"}}
    with running_host([model], cache_dir=CACHE) as host:
        config = gateway_config([f"127.0.0.1:{host.server.port}"], http_listen="127.0.0.1:0")
        gateway = host.loop.run(start_gateway(config))
        try:
            assert gateway.http is not None
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{gateway.http.port}/v1", api_key="none", timeout=120
            )
            texts = []
            for seed in range(2):
                response = client.completions.create(
                    model="gemma-mlx",
                    prompt=f"Person: {json.dumps(EXAMPLE)}\nPerson:",
                    max_tokens=80,
                    temperature=0.8,
                    seed=seed,
                    n=10,
                    extra_body={"response_format": schema_format(person)},
                )
                assert {c.finish_reason for c in response.choices} == {"stop"}
                texts += [c.text for c in response.choices]
            for text in texts:
                jsonschema.validate(json.loads(text), person)
            assert len(set(texts)) > 1
            called = client.chat.completions.create(
                model="gemma-mlx",
                messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                tools=[WEATHER],
                tool_choice="required",
                parallel_tool_calls=False,
                max_tokens=60,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            choice = called.choices[0]
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls or []
            assert call.function.name == "get_weather"
            jsonschema.validate(
                json.loads(call.function.arguments), WEATHER["function"]["parameters"]
            )
            plain = client.chat.completions.create(
                model="gemma-mlx",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
            )
            content = plain.choices[0].logprobs.content  # type: ignore[union-attr]
            assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
        finally:
            host.loop.run(gateway.stop(0))


def test_metal_memory_limits_are_the_hosts_not_each_generators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mlx-lm's BatchGenerator sets the wired limit and restores the old one when it closes;
    two models closing out of order would leave the wrong one. The host sets the limits from
    its budget (once for the cache), and no generator restores anything."""
    from modelhost.engines.mlxlm import engine

    class FakeMx:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def device_info(self) -> dict[str, int]:
            return {"max_recommended_working_set_size": 12 << 30}

        def set_wired_limit(self, value: int) -> int:
            self.calls.append(("wired", value))
            return 0

        def set_cache_limit(self, value: int) -> int:
            self.calls.append(("cache", value))
            return 0

    class Generator:
        _old_wired_limit: int | None = 5 << 30  # what mlx-lm would restore at close

    monkeypatch.setattr(engine, "_limits_set", False)
    mx = FakeMx()
    first, second = Generator(), Generator()
    engine.own_memory_limits(mx, first, 8 << 30)
    engine.own_memory_limits(mx, second, 8 << 30)
    assert first._old_wired_limit is None and second._old_wired_limit is None
    assert mx.calls == [("wired", 8 << 30), ("cache", (8 << 30) // 10), ("wired", 8 << 30)]
    unbudgeted = FakeMx()
    monkeypatch.setattr(engine, "_limits_set", False)
    engine.own_memory_limits(unbudgeted, Generator(), 0)  # no budget: the device's advice
    assert unbudgeted.calls[0] == ("wired", 12 << 30)


def test_metal_needs_no_metal_llama_cpp_when_mlx_can_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modelhost import device
    from modelhost.engines import backend

    monkeypatch.setattr(device, "_is_apple_silicon", lambda: True)
    monkeypatch.setattr(backend("llama.cpp"), "unsupported", lambda d: "built without Metal")
    monkeypatch.setattr(backend("mlx"), "unsupported", lambda d: None)
    assert device.resolve_device("metal") == "metal"
    monkeypatch.setattr(backend("mlx"), "unsupported", lambda d: "mlx is not installed")
    with pytest.raises(device.DeviceError, match="no installed engine can use Metal"):
        device.resolve_device("metal")
