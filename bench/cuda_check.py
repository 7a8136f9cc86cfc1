"""The CUDA check: the modelhost on a real NVIDIA GPU, held against the CPU engine.

    python -m bench.cuda_check --model MODEL.gguf --report cuda_report.md [--build-info TEXT]

bench/cuda_check.sh builds llama-cpp-python for the GPU and runs this. It records, in one
markdown report:
1. the GPU, its driver and memory (NVML);
2. `modelhost serve --device cuda` with the model: how many layers went to the GPU and the
   buffers llama.cpp allocated there (the host's `model_loaded` log line), VRAM used;
3. greedy text of 16 tokens for a few chat and raw prompts from `modelhost serve --device cuda`
   and `--device cpu` (the GPU hidden: CUDA_VISIBLE_DEVICES=""). The engine must add nothing:
   each token a host chose is llama.cpp's argmax in a process with the same context settings on
   the same device, fed the same tokens, up to a near-tie. (On cuda the result of a step depends
   on the batch's shape and where the cells lie, and a host reuses prefixes another request
   computed, so its text can part from a cold greedy loop at a near-tie; on the cpu it does not.)
4. cuda against cpu, teacher-forced: both devices score the cpu's greedy continuation position
   by position. Their kernels round differently (llama.cpp's own greedy text differs between
   cpu and cuda, and between flash attention on and off, for this model), so equal free-running
   text is the wrong test: one near-tie decided the other way changes every token after it.
   The check: argmax equal wherever the cpu's top token leads by NEAR_TIE logits, and a mean KL
   divergence under KL_LIMIT, with the cpu's flash attention on against off beside it for scale;
5. `bench.batching` at 1, 8 and 64 streams on cuda, with device memory sampled meanwhile.

Exits 1 when a check fails; the report says which.

    python -m bench.cuda_check logits --device cpu|cuda --model M --config C --out F.npz
        [--teacher F.npz] [--host-texts F.json] [--flash-attention on|off]

is step 3 and 4's in-process half (run as a subprocess so that the cpu run can hide the GPU).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pynvml

from airouter.v1 import model_host_pb2, model_host_pb2_grpc
from tests.processes import ServerProcess
from tests.scratch import scratch_dir

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
# Kernels round differently on each device: the cpu with flash attention on and off moves
# this model's top logits by up to 0.6 and flips four near-ties in 55 positions. A broken kernel
# or engine moves far more, so: where one run's top token leads by NEAR_TIE logits or more, the
# other's argmax must agree, and the mean KL divergence between the two must stay under
# KL_LIMIT nats (~0.005 between the cpu's two flash attention settings).
NEAR_TIE = 1.0
KL_LIMIT = 0.02
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
    """llama.cpp's own greedy loop on one device with the host's context settings; the logits
    of every continuation position of --teacher's greedy tokens (else of its own); and, for
    each token the host chose (--host-texts), by how much llama.cpp's argmax led it."""
    # Imported here: only this subprocess loads the model.
    import llama_cpp

    from modelhost.config import load_config
    from modelhost.device import default_threads
    from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel

    config = load_config(args.config).models[0]
    flash = config.flash_attention if args.flash_attention is None else args.flash_attention == "on"
    model = LlamaModel(
        args.model,
        gpu_layers=-1 if args.device == "cuda" else 0,
        settings=ContextSettings(
            config.slots,
            config.context_length,
            config.batch_tokens,
            default_threads(),
            flash_attention=flash,
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
        rows = [
            llama_cpp.llama_get_logits_ith(model.ctx, i) for i in range(logits_from, len(tokens))
        ]
        return np.stack([np.ctypeslib.as_array(r, (model.n_vocab,)) for r in rows]).copy()

    def forced(prompt: list[int], continuation: list[int]) -> np.ndarray:
        """Logits predicting each continuation token, the tokens before it given."""
        llama_cpp.llama_memory_clear(model.memory, True)
        return decode(prompt + continuation[:-1], 0, len(prompt) - 1)

    teacher = np.load(args.teacher) if args.teacher else None
    host_texts = json.loads(args.host_texts.read_text()) if args.host_texts else None
    arrays: dict[str, np.ndarray] = {}
    texts = []
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
        texts.append(b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", "replace"))
        arrays[f"greedy{n}"] = np.array(tokens, dtype=np.int32)
        continuation = [int(t) for t in teacher[f"greedy{n}"]] if teacher is not None else tokens
        arrays[f"logits{n}"] = forced(prompt, continuation).astype(np.float32)
        if host_texts is not None:
            # The host streams text, so its tokens are the text tokenized again; -1 marks text
            # that does not tokenize back onto the prompt's tokens.
            host = model.tokenize(rendered + host_texts[n])
            lead = np.array([-1.0], dtype=np.float32)
            if host[: len(prompt)] == prompt and len(host) > len(prompt):
                chosen = host[len(prompt) :]
                logits = forced(prompt, chosen)
                lead = logits.max(axis=1) - logits[np.arange(len(chosen)), chosen]
            arrays[f"host_lead{n}"] = lead
    arrays["texts"] = np.array(texts)
    llama_cpp.llama_batch_free(batch)
    np.savez(args.out, **arrays)  # type: ignore[arg-type]
    model.close()
    return 0


def run_in_process(
    device: str,
    model: Path,
    config: Path,
    out: Path,
    *,
    teacher: Path | None = None,
    host_texts: list[str] | None = None,
    flash_attention: str | None = None,
) -> Any:
    command = [sys.executable, "-m", "bench.cuda_check", "logits", "--device", device]
    command += ["--model", str(model), "--config", str(config), "--out", str(out)]
    if teacher:
        command += ["--teacher", str(teacher)]
    if host_texts is not None:
        texts = out.with_suffix(".host.json")
        texts.write_text(json.dumps(host_texts))
        command += ["--host-texts", str(texts)]
    if flash_attention:
        command += ["--flash-attention", flash_attention]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"in-process {device} run failed: {done.stderr[-3000:]}")
    return np.load(out)


@dataclass
class Forced:
    """Two runs' logits over the same tokens, position by position."""

    positions: int
    agree: int  # argmax equal
    clear_disagreements: list[str]  # the first led by NEAR_TIE or more, the second chose otherwise
    near_ties: list[float]  # the first's lead where the second chose otherwise
    top_shift: float  # the largest move of one of the first's TOP logits
    kl: list[float]  # KL divergence of the second's distribution from the first's, in nats


def compare_forced(first: np.ndarray, second: np.ndarray) -> Forced:
    result = Forced(len(first), 0, [], [], 0.0, [])
    for position, (a_logits, b_logits) in enumerate(zip(first, second, strict=True)):
        top = np.argsort(a_logits)[-TOP:]
        shift = float(np.max(np.abs(a_logits[top] - b_logits[top])))
        result.top_shift = max(result.top_shift, shift)
        p, q = log_softmax(a_logits), log_softmax(b_logits)
        result.kl.append(float(np.sum(np.exp(p) * (p - q))))
        a, b = int(np.argmax(a_logits)), int(np.argmax(b_logits))
        if a == b:
            result.agree += 1
            continue
        lead = float(a_logits[a] - a_logits[b])
        if lead < NEAR_TIE:
            result.near_ties.append(lead)
        else:
            result.clear_disagreements.append(f"position {position}: {a} leads {b} by {lead:.2f}")
    return result


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def host_verdict(lead: np.ndarray) -> tuple[str, bool]:
    """How the host's tokens stand against llama.cpp's argmax: the cell, and whether it fails."""
    if len(lead) == 1 and lead[0] < 0:
        return "not checked (its text tokenizes differently)", False
    worst = float(lead.max())
    if worst == 0:
        return f"yes, {len(lead)}/{len(lead)}", False
    position = int(lead.argmax())
    verdict = f"{int((lead == 0).sum())}/{len(lead)}; worst lead {worst:.2f} at {position}"
    return verdict, worst >= NEAR_TIE


def compare_greedy(
    model: Path,
    config: Path,
    scratch: Path,
    cpu_alone: list[Greedy],
    cuda_alone: list[Greedy],
    cuda_together: list[Greedy],
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Steps 3 and 4: llama.cpp's own greedy loop and teacher-forced logits on each device
    against the hosts' text, and for scale the cpu with flash attention off against on (both
    correct llama.cpp). Returns report rows, the greedy table and failures."""
    rows: list[tuple[str, str]] = []
    failures: list[str] = []
    cpu_npz = scratch / "cpu.npz"
    texts = [r.text for r in cpu_alone]
    cpu_own = run_in_process("cpu", model, config, cpu_npz, host_texts=texts)
    texts = [r.text for r in cuda_alone]
    gpu_own = run_in_process(
        "cuda", model, config, scratch / "cuda.npz", teacher=cpu_npz, host_texts=texts
    )
    cpu_other = run_in_process(
        "cpu", model, config, scratch / "cpu-fa.npz", teacher=cpu_npz, flash_attention="off"
    )
    table = [
        f"| prompt | host cuda ({GREEDY_TOKENS} tokens) | host cpu | host cuda's tokens are "
        "llama.cpp's argmax | host cpu's | cuda together = alone | argmax cuda = cpu "
        "(teacher-forced) |",
        "|---|---|---|---|---|---|---|",
    ]
    gpu_forced, reference = [], []
    for n, ((kind, prompt), gpu_text, cpu_text, together) in enumerate(
        zip(PROMPTS, cuda_alone, cpu_alone, cuda_together, strict=True)
    ):
        for label, result in (("cuda", gpu_text), ("cpu", cpu_text), ("together", together)):
            if result.error or result.tokens == 0:
                failures.append(f"{label} {kind} {prompt!r}: {result.error or 'no tokens'}")
        engine = []
        for device, own, text in (("cuda", gpu_own, gpu_text), ("cpu", cpu_own, cpu_text)):
            verdict, failed = host_verdict(own[f"host_lead{n}"])
            engine.append(verdict)
            if failed:
                failures.append(
                    f"{device} {kind} {prompt!r}: the host chose a token that llama.cpp's argmax "
                    f"led by {NEAR_TIE} logits or more ({verdict}; host {text.text!r}, "
                    f"llama.cpp's own loop {str(own['texts'][n])!r})"
                )
        forced = compare_forced(cpu_own[f"logits{n}"], gpu_own[f"logits{n}"])
        gpu_forced.append(forced)
        reference.append(compare_forced(cpu_own[f"logits{n}"], cpu_other[f"logits{n}"]))
        failures += [
            f"{kind} {prompt!r}, cpu against cuda: {d}" for d in forced.clear_disagreements
        ]
        table.append(
            f"| {kind}: {cell(prompt)} | {cell(gpu_text.text)} | {cell(cpu_text.text)} "
            f"| {engine[0]} | {engine[1]} "
            f"| {'yes' if together.text == gpu_text.text else 'no'} "
            f"| {forced.agree}/{forced.positions} |"
        )
    for label, compared in (
        ("cuda against cpu, teacher-forced", gpu_forced),
        ("for scale: cpu, flash attention off against on", reference),
    ):
        kl = [k for f in compared for k in f.kl]
        ties = [t for f in compared for t in f.near_ties]
        rows.append(
            (
                label,
                f"argmax equal at {sum(f.agree for f in compared)} of {len(kl)} positions"
                + (
                    f" (the others near-ties: leads {', '.join(f'{t:.2f}' for t in ties)})"
                    if ties
                    else ""
                )
                + f"; KL divergence mean {np.mean(kl):.4f}, max {np.max(kl):.4f} nats; top-{TOP} "
                f"logits moved by at most {max(f.top_shift for f in compared):.2f}",
            )
        )
    kl_mean = float(np.mean([k for f in gpu_forced for k in f.kl]))
    if kl_mean > KL_LIMIT:
        failures.append(
            f"cuda's distributions differ from cpu's: mean KL {kl_mean:.4f} > {KL_LIMIT}"
        )
    return rows, table, failures


def main() -> int:
    if sys.argv[1:2] == ["logits"]:
        parser = argparse.ArgumentParser(description="step 3 and 4 in one process")
        parser.add_argument("logits")
        parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
        parser.add_argument("--model", type=Path, required=True)
        parser.add_argument("--config", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--teacher", type=Path)
        parser.add_argument("--host-texts", type=Path)
        parser.add_argument("--flash-attention", choices=["on", "off"])
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

    config = scratch_dir() / "models.toml"
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

    # 3 and 4.
    greedy_rows, table, greedy_failures = compare_greedy(
        args.model, config, args.report.parent, cpu_alone, cuda_alone, cuda_together
    )
    rows += greedy_rows
    failures += greedy_failures

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
