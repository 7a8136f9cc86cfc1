"""The CUDA check: the modelhost on a real NVIDIA GPU, held against the CPU engine.

    python -m bench.cuda_check --model MODEL.gguf --report cuda_report.md [--build-info TEXT]

bench/cuda_check.sh builds llama-cpp-python for the GPU and runs this. It records, in one
markdown report:
1. the GPU, its driver and memory (NVML);
2. `modelhost serve --device cuda` with the model: how many layers went to the GPU and the
   buffers llama.cpp allocated there (the host's `model_loaded` log line), VRAM used;
3. greedy text of 16 tokens for a few chat and raw prompts against `modelhost serve --device
   cpu` on the same machine with the GPU hidden (CUDA_VISIBLE_DEVICES=""), one prompt at a time,
   and the same prompts decoded together on the GPU;
4. `bench.batching` at 1, 8 and 64 streams on cuda, with device memory sampled meanwhile.

Exits 1 when a check fails; the report says which.
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


def main() -> int:
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

    table = [
        f"| prompt | cuda ({GREEDY_TOKENS} tokens) | cpu | cuda = cpu | cuda together = alone |",
        "|---|---|---|---|---|",
    ]
    equal = 0
    for (kind, prompt), gpu_text, cpu_text, together in zip(
        PROMPTS, cuda_alone, cpu_alone, cuda_together, strict=True
    ):
        for label, result in (("cuda", gpu_text), ("cpu", cpu_text), ("together", together)):
            if result.error or result.tokens == 0:
                failures.append(f"{label} {kind} {prompt!r}: {result.error or 'no tokens'}")
        same = gpu_text.text == cpu_text.text and gpu_text.tokens == cpu_text.tokens
        equal += same
        table.append(
            f"| {kind}: {cell(prompt)} | {cell(gpu_text.text)} | {cell(cpu_text.text)} "
            f"| {'yes' if same else first_difference(gpu_text.text, cpu_text.text)} "
            f"| {'yes' if together.text == gpu_text.text else 'no'} |"
        )
    rows.append(("greedy cuda = cpu", f"{equal} of {len(PROMPTS)} prompts"))
    if equal != len(PROMPTS):
        failures.append(f"greedy text on cuda differs from cpu for {len(PROMPTS) - equal} prompts")

    # 3. bench.batching on the GPU.
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
        "## Greedy text, cuda against cpu",
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
