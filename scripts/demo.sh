#!/usr/bin/env bash
# The README's main command, for a fresh machine: set up, build the tiny default model, archive it, start
# TorchServe and stream the answer to request.json.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/setup.sh
python3 -m gpt_fast.tiny checkpoints/tiny
scripts/archive.sh checkpoints/tiny --config model_config_cpu.yaml
scripts/serve.sh start

KEY=$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
echo "\$ curl -N -H 'Authorization: Bearer <inference key>' -H 'Content-Type: application/json' \\"
echo "    --data @request.json http://127.0.0.1:8080/predictions/gpt-fast"
curl -sS -N -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" --data @request.json \
  http://127.0.0.1:8080/predictions/gpt-fast
echo
echo "TorchServe is still running (keys in key_file.json, metrics on http://127.0.0.1:8082/metrics)."
echo "Stop it with: scripts/serve.sh stop"
