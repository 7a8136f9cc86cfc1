"""The CUDA device check's wheels: locked for a fresh Python 3.12 venv on a machine with no
network (bench/cuda_requirements.txt), and enough there to run the three CLIs."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench import cuda_lock

ROOT = Path(__file__).resolve().parents[1]

# llama-cpp-python is built on the device from its sdist; only its modules may be missing.
BUILT_THERE = {"llama_cpp"}

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
missing = []
for package in ("airouter", "gateway", "modelhost"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if exc.name.split(".")[0] not in sys.argv[1].split(","):
                missing.append(f"{info.name}: {exc.name}")
import bench.cuda_check
print("\\n".join(missing))
sys.exit(1 if missing else 0)
"""


def locked_names() -> set[str]:
    names = set()
    for line in cuda_lock.LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            assert "--hash=sha256:" in line, f"an unhashed line in the lock: {line}"
            names.add(canonicalize_name(line.split("==")[0]))
    return names


def test_the_lock_holds_every_runtime_requirement():
    # A dependency added to pyproject.toml without `python -m bench.cuda_lock` shows here.
    missing = {Requirement(line).name for line in cuda_lock.requirements()} - locked_names()
    assert not {canonicalize_name(name) for name in missing}, (
        f"bench/cuda_requirements.txt lacks {sorted(missing)}: run `python -m bench.cuda_lock`"
    )


def test_the_lock_holds_what_llama_cpp_python_needs_at_run_time():
    declared = importlib.metadata.requires("llama_cpp_python") or []
    runtime = {
        canonicalize_name(Requirement(line).name)
        for line in declared
        if Requirement(line).marker is None
    }
    listed = {canonicalize_name(Requirement(line).name) for line in cuda_lock.LLAMA_CPP_RUNTIME}
    assert runtime == listed, "llama-cpp-python's requirements changed: update LLAMA_CPP_RUNTIME"
    assert runtime <= locked_names()


def python_312() -> str | None:
    """On PATH, else the newest pyenv build (a pyenv shim on PATH may not run it)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    builds = sorted(root.glob("3.12.*/bin/python3"), key=lambda p: p.parts[-3])
    for candidate in [shutil.which("python3.12"), *reversed([str(p) for p in builds])]:
        if (
            candidate
            and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0
        ):
            return candidate
    return None


def test_the_locked_wheels_make_a_fresh_venv_that_runs_the_three_clis(tmp_path):
    python = python_312()
    if python is None:
        pytest.skip("no CPython 3.12 here (on PATH or through pyenv)")
    # A copy of the tree as it would travel (tracked and unignored files), so the editable
    # install writes nothing into this checkout.
    tree = tmp_path / "tree"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            (tree / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / os.fsdecode(name))

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    script = ["bash", "bench/cuda_check.sh"]
    env = {**os.environ, "PYTHON": python, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    downloaded = subprocess.run(
        [*script, "wheels", str(wheels)], cwd=tree, env=env, capture_output=True, text=True
    )
    assert downloaded.returncode == 0, downloaded.stderr[-3000:]
    # Only the downloaded wheels from here on, as on the device: no pip configuration's
    # find-links or indexes.
    offline = {**env, "PIP_CONFIG_FILE": os.devnull}
    made = subprocess.run(
        [*script, "venv", str(wheels), str(venv)],
        cwd=tree,
        env=offline,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert len(list(wheels.iterdir())) == len(locked_names())

    for cli in ("modelhost", "gateway", "airouter"):
        shown = subprocess.run(
            [str(venv / "bin" / cli), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert shown.returncode == 0, f"{cli}: {shown.stderr[-2000:]}"
        assert re.search(r"usage: ", shown.stdout), shown.stdout
    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_EVERY_MODULE, ",".join(BUILT_THERE)],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr[-2000:]


def test_a_random_q4_0_llama_loads_and_decodes(tmp_path: Path) -> None:
    """The device check's 8B-shaped model, at a small shape: raw Q4_0 blocks llama.cpp reads,
    a vocabulary it tokenizes, logits it computes."""
    import gguf
    import numpy as np

    from bench.random_llama import Shape, write_model
    from modelhost.engines.llamacpp.model import ContextSettings, LlamaModel

    shape = Shape(n_embd=256, layers=2, n_ff=512, n_head=4, n_head_kv=2)
    path = write_model(tmp_path / "random.gguf", 1000, shape, q4_0=True)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    settings = ContextSettings(slots=1, context_per_slot=64, batch_tokens=64, threads=2)
    model = LlamaModel(path, gpu_layers=0, settings=settings)
    try:
        assert model.n_vocab == 1000
        tokens = model.tokenize("ta et")
        assert tokens[0] == 1 and len(tokens) >= 3  # <s> and the words
        import llama_cpp

        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
            assert llama_cpp.llama_decode(model.ctx, batch) == 0
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), (1000,))
            assert np.isfinite(row).all() and row.std() > 0
        finally:
            llama_cpp.llama_batch_free(batch)
    finally:
        model.close()
