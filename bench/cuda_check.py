"""The CUDA check: the modelhost on a real NVIDIA GPU, held against the CPU engine.

    python -m bench.cuda_check --model MODEL.gguf --report cuda_report.md [--build-info TEXT]

bench/cuda_check.sh builds llama-cpp-python for the GPU and runs this. It records, in one
markdown report:
1. the GPU, its driver and memory (NVML);
2. `modelhost serve --device cuda` with the model: how many layers went to the GPU and the
   buffers llama.cpp allocated there (the host's `model_loaded` log line), VRAM used;
3. greedy text of 16 tokens for a few chat and raw prompts from `modelhost serve --device cuda`
   and `--device cpu` (the GPU hidden: CUDA_VISIBLE_DEVICES=""), each held against llama.cpp's
   own greedy loop in a process with the same context settings on the same device: the engine
   must add nothing;
4. cuda against cpu, teacher-forced: both devices score the cpu's greedy continuation position
   by position. Their kernels round differently (llama.cpp's own greedy text differs between
   cpu and cuda, and between flash attention on and off on cuda, for this model), so equal
   free-running text is the wrong test: one near-tie decided the other way changes every token
   after it. The check is that the argmax agrees wherever the cpu's top token leads by a
   margin (NEAR_TIE logits) and how far the logits of the top tokens move;
5. `bench.batching` at 1, 8 and 64 streams on cuda, with device memory sampled meanwhile.

Exits 1 when a check fails; the report says which.

    python -m bench.cuda_check logits --device cpu|cuda --model M --config C --out F.npz
        [--teacher F.npz]

is step 3 and 4's in-process half (run as a subprocess so that the cpu run can hide the GPU).
"""

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pynvml

from airouter.v1 import model_host_pb2, model_host_pb2_grpc
from tests.processes import ServerProcess

MODEL_NAME = "check-model"
GREEDY_TOKENS = 16
# (kind, text): a chat turn rendered with the model's template, or a raw prompt.
PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about rain."),
    ("raw", "Once upon a time, in a village by the sea,"),
    ("raw", "def fibonacci(n):"),
]
MIB = 1 << 20
# Logits by which the cpu's top token must lead for cuda's argmax to have to agree with it.
NEAR_TIE = 0.5
TOP = 10  # the cpu's top tokens whose logits are compared


@dataclass
class Greedy:
    text: str
    tokens: int
    error: str = ""


def generate(address: str, kind: str, prompt: str) -> Greedy:
    request = model_host_pb2.GenerateRequest(model=MODEL_NAME)
    if kind == "chat":
        request.chat.messages.add(role="user", content=prompt)
    else:
        request.prompt = prompt
    request.sampling.temperature = 0.0
    request.stopping.max_tokens = GREEDY_TOKENS
    text, tokens, error = [], 0, ""
    with grpc.insecure_channel(address) as channel:
        try:
            for response in model_host_pb2_grpc.ModelHostStub(channel).Generate(
                request, timeout=120
            ):
                if response.HasField("token"):
                    text.append(response.token.text)
                else:
                    tokens = response.finished.usage.completion_tokens
                    error = response.finished.error_message
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
    return Greedy("".join(text), tokens, error)


def greedy_all(address: str, together: bool = False) -> list[Greedy]:
    if not together:
        return [generate(address, kind, text) for kind, text in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: generate(address, *p), PROMPTS))


def wait_for_load(host: ServerProcess, timeout: float = 300) -> dict[str, object]:
    """The host's model_loaded log line; raises when the load fails or never ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in list(host.log):
            if record.get("event") == "model_loaded":
                return record
            if record.get("event") == "model_load_failed":
                raise RuntimeError(f"the model failed to load: {record.get('error')}")
        if host.process.poll() is not None:
            raise RuntimeError(f"the modelhost exited with {host.process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"the model did not load within {timeout:.0f} s")


class VramSampler:
    """The device's used memory through NVML, every 0.2 s on a thread, keeping the peak."""

    def __init__(self, handle: object) -> None:
        self.handle = handle
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, used_bytes(self.handle))

    def __enter__(self) -> "VramSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def used_bytes(handle: object) -> int:
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def first_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"from character {i}"
    return "equal" if len(a) == len(b) else f"from character {min(len(a), len(b))}"


def cell(text: str) -> str:
    return "`" + text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'") + "`"


def in_process(args: argparse.Namespace) -> int:
    """llama.cpp's own greedy loop on one device with the host's context settings, and the
    logits of every continuation position of --teacher's sequences (or of its own)."""
    # Imported here: only this subprocess loads the model.
    import llama_cpp

    from modelhost.config import load_config
    from modelhost.llama import ContextSettings, LlamaModel, default_threads

    config = load_config(args.config).models[0]
    model = LlamaModel(
        args.model,
        gpu_layers=-1 if args.device == "cuda" else 0,
        settings=ContextSettings(
            config.slots,
            config.context_length,
            config.batch_tokens,
            default_threads(),
            flash_attention=config.flash_attention,
        ),
    )
    batch = llama_cpp.llama_batch_init(config.batch_tokens, 0, 1)

    def decode(tokens: list[int], start: int, logits_from: int) -> np.ndarray:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i] = token, start + i
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
            batch.logits[i] = i >= logits_from
        if rc := llama_cpp.llama_decode(model.ctx, batch):
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.stack(
            [
                np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(model.ctx, i), (model.n_vocab,)
                )
                for i in range(logits_from, len(tokens))
            ]
        ).copy()

    greedy: list[list[int]] = []
    texts: list[str] = []
    logits: list[np.ndarray] = []
    teacher = np.load(args.teacher) if args.teacher else None
    for n, (kind, text) in enumerate(PROMPTS):
        rendered = model.apply_chat_template([("user", text)]) if kind == "chat" else text
        assert rendered is not None, "the model has no chat template"
        prompt = model.tokenize(rendered)
        llama_cpp.llama_memory_clear(model.memory, True)
        row = decode(prompt, 0, len(prompt) - 1)[-1]
        tokens: list[int] = []
        while len(tokens) < GREEDY_TOKENS:
            token = int(np.argmax(row))
            if model.is_end_of_generation(token):
                break
            tokens.append(token)
            row = decode([token], len(prompt) + len(tokens) - 1, 0)[-1]
        continuation = list(teacher[f"greedy{n}"]) if teacher is not None else tokens
        llama_cpp.llama_memory_clear(model.memory, True)
        forced = decode(prompt + continuation[:-1], 0, len(prompt) - 1)
        greedy.append(tokens)
        texts.append(b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", "replace"))
        logits.append(forced)
    llama_cpp.llama_batch_free(batch)
    arrays: dict[str, np.ndarray] = {"texts": np.array(texts)}
    for n, (tokens, forced) in enumerate(zip(greedy, logits, strict=True)):
        arrays[f"greedy{n}"] = np.array(tokens, dtype=np.int32)
        arrays[f"logits{n}"] = forced.astype(np.float32)
    np.savez(args.out, **arrays)  # type: ignore[arg-type]
    model.close()
    return 0


def run_in_process(device: str, model: Path, config: Path, out: Path, teacher: Path | None):
    command = [sys.executable, "-m", "bench.cuda_check", "logits", "--device", device]
    command += ["--model", str(model), "--config", str(config), "--out", str(out)]
    if teacher:
        command += ["--teacher", str(teacher)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"in-process {device} run failed: {done.stderr[-3000:]}")
    return np.load(out)


@dataclass
class Forced:
    positions: int
    agree: int
    clear_disagreements: list[str]  # the cpu led by NEAR_TIE or more, and cuda chose otherwise
    near_ties: list[float]  # the cpu's lead where cuda chose otherwise
    top_shift: float  # the largest move of one of the cpu's TOP logits


def compare_forced(cpu: np.ndarray, gpu: np.ndarray) -> Forced:
    result = Forced(len(cpu), 0, [], [], 0.0)
    for position, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        top = np.argsort(c)[-TOP:]
        result.top_shift = max(result.top_shift, float(np.max(np.abs(c[top] - g[top]))))
        a, b = int(np.argmax(c)), int(np.argmax(g))
        if a == b:
            result.agree += 1
            continue
        lead = float(c[a] - c[b])
        if lead < NEAR_TIE:
            result.near_ties.append(lead)
        else:
            result.clear_disagreements.append(
                f"position {position}: cpu {a} leads cuda's {b} by {lead:.2f}"
            )
    return result


def main() -> int:
    if sys.argv[1:2] == ["logits"]:
        parser = argparse.ArgumentParser(description="step 3 and 4 in one process")
        parser.add_argument("logits")
        parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
        parser.add_argument("--model", type=Path, required=True)
        parser.add_argument("--config", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--teacher", type=Path)
        return in_process(parser.parse_args())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the GGUF file to serve")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--build-info", default="", help="how llama-cpp-python was built")
    parser.add_argument("--rounds", type=int, default=2, help="bench.batching rounds")
    args = parser.parse_args()

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    name = pynvml.nvmlDeviceGetName(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    driver = pynvml.nvmlSystemGetDriverVersion()
    cuda = pynvml.nvmlSystemGetCudaDriverVersion()
    gpu = (
        f"{name}, {memory.total // MIB} MiB, compute capability {major}.{minor}, driver "
        f"{driver}, CUDA {cuda // 1000}.{cuda % 1000 // 10}"
    )
    print(f"GPU: {gpu}", flush=True)

    config = Path(tempfile.mkdtemp(prefix="airouter-cuda-")) / "models.toml"
    config.write_text(
        f'[[models]]\nname = "{MODEL_NAME}"\npath = "{args.model.resolve()}"\npreload = true\n'
    )
    failures: list[str] = []
    rows: list[tuple[str, str]] = [
        ("GPU", gpu),
        ("llama-cpp-python", args.build_info or "(not given)"),
        ("model", f"{args.model.name}, {args.model.stat().st_size / MIB:.1f} MiB"),
    ]

    # 1. The GPU host: where the layers went, greedy text alone and together.
    before = used_bytes(handle)
    host = ServerProcess("modelhost", "serve", "--device", "cuda", "--config", str(config))
    try:
        loaded = wait_for_load(host)
        after_load = used_bytes(handle)
        cuda_alone = greedy_all(host.address)
        cuda_together = greedy_all(host.address, together=True)
    finally:
        host.stop()
    offloaded = str(loaded.get("offloaded_layers"))
    buffers = dict(loaded.get("buffers") or {})  # type: ignore[call-overload]
    rows += [
        ("offloaded", f"{offloaded} layers; llama.cpp buffers {buffers}"),
        ("load", f"{loaded.get('seconds')} s; footprint measured {loaded.get('measured')}"),
        ("VRAM", f"{(after_load - before) / MIB:.0f} MiB more in use after the load (NVML)"),
    ]
    done, _, total = offloaded.partition("/")
    if not total or done != total:
        failures.append(f"not every layer is on the GPU: offloaded {offloaded}")
    if not any(str(b).startswith("CUDA") for b in buffers):
        failures.append(f"llama.cpp allocated no CUDA buffer: {buffers}")

    # 2. The same prompts on the CPU engine, the GPU hidden.
    host = ServerProcess(
        "modelhost",
        "serve",
        "--device",
        "cpu",
        "--config",
        str(config),
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        wait_for_load(host)
        cpu_alone = greedy_all(host.address)
    finally:
        host.stop()

    # 3 and 4. llama.cpp's own greedy loop and teacher-forced logits on each device.
    scratch = config.parent
    cpu_own = run_in_process("cpu", args.model, config, scratch / "cpu.npz", None)
    gpu_own = run_in_process("cuda", args.model, config, scratch / "cuda.npz", scratch / "cpu.npz")
    table = [
        f"| prompt | host cuda ({GREEDY_TOKENS} tokens) | host cpu | host = llama.cpp, cuda "
        "| host = llama.cpp, cpu | cuda together = alone | teacher-forced argmax cuda = cpu |",
        "|---|---|---|---|---|---|---|",
    ]
    positions = agree = 0
    near_ties: list[float] = []
    top_shift = 0.0
    for n, ((kind, prompt), gpu_text, cpu_text, together) in enumerate(
        zip(PROMPTS, cuda_alone, cpu_alone, cuda_together, strict=True)
    ):
        for label, result in (("cuda", gpu_text), ("cpu", cpu_text), ("together", together)):
            if result.error or result.tokens == 0:
                failures.append(f"{label} {kind} {prompt!r}: {result.error or 'no tokens'}")
        engine = []
        for device, own, text in (("cuda", gpu_own, gpu_text), ("cpu", cpu_own, cpu_text)):
            same = own["texts"][n] == text.text
            engine.append("yes" if same else first_difference(text.text, str(own["texts"][n])))
            if not same:
                failures.append(
                    f"{device} {kind} {prompt!r}: the host's greedy text differs from llama.cpp's "
                    f"own loop on the same device ({text.text!r} against {own['texts'][n]!r})"
                )
        forced = compare_forced(cpu_own[f"logits{n}"], gpu_own[f"logits{n}"])
        positions += forced.positions
        agree += forced.agree
        near_ties += forced.near_ties
        top_shift = max(top_shift, forced.top_shift)
        failures += [f"{kind} {prompt!r}, {d}" for d in forced.clear_disagreements]
        table.append(
            f"| {kind}: {cell(prompt)} | {cell(gpu_text.text)} | {cell(cpu_text.text)} "
            f"| {engine[0]} | {engine[1]} "
            f"| {'yes' if together.text == gpu_text.text else 'no'} "
            f"| {forced.agree}/{forced.positions} |"
        )
    rows.append(
        (
            "greedy, cuda against cpu (teacher-forced)",
            f"argmax equal at {agree} of {positions} positions; "
            + (
                f"where not, the cpu's lead was {', '.join(f'{t:.2f}' for t in near_ties)} "
                f"logits (a near-tie: < {NEAR_TIE})"
                if near_ties
                else "no near-ties decided otherwise"
            )
            + f"; the cpu's top-{TOP} logits moved by at most {top_shift:.3f}",
        )
    )

    # 5. bench.batching on the GPU.
    print("bench.batching ...", flush=True)
    command = [
        sys.executable,
        "-m",
        "bench.batching",
        "--device",
        "cuda",
        "--config",
        str(config),
        "--streams",
        "1",
        "8",
        "64",
        "--rounds",
        str(args.rounds),
    ]
    before = used_bytes(handle)
    with VramSampler(handle) as sampler:
        bench = subprocess.run(command, capture_output=True, text=True, timeout=360)
    if bench.returncode != 0:
        failures.append(f"bench.batching exited with {bench.returncode}: {bench.stderr[-2000:]}")
    rows.append(
        (
            "VRAM in bench.batching",
            f"peak {sampler.peak / MIB:.0f} MiB in use on the device, {before / MIB:.0f} MiB "
            "before (a host process and the in-process ceiling model both hold the model)",
        )
    )
    pynvml.nvmlShutdown()

    verdict = "PASS" if not failures else "FAIL"
    lines = [
        f"# CUDA check: {verdict} ({name}, {datetime.date.today()})",
        "",
        "Made by `bash bench/cuda_check.sh` (see its header).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Greedy text: the hosts, llama.cpp's own loop, cuda against cpu",
        "",
        *table,
        "",
        "## bench.batching --device cuda --streams 1 8 64",
        "",
        bench.stdout.strip(),
        "",
    ]
    if failures:
        lines += ["## Failures", "", *(f"- {f}" for f in failures), ""]
    args.report.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
