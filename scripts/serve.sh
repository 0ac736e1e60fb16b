#!/usr/bin/env bash
# Start or stop TorchServe on every model archive in model_store/:
#   scripts/serve.sh start   # returns once all models are ready (fails with the cause if one is not)
#   scripts/serve.sh stop
#   scripts/serve.sh rotate-key inference|management   # a new key in key_file.json; the old one stops working
# The keys are in key_file.json in the run directory (the repo root); logs/ is configured by scripts/log4j2.xml.
# Environment overrides (the tests use them to run a private server): GFS_INFERENCE_PORT, GFS_MANAGEMENT_PORT,
# GFS_METRICS_PORT (8080-8082), GFS_GRPC_INFERENCE_PORT, GFS_GRPC_MANAGEMENT_PORT (7070, 7071),
# GFS_MODEL_STORE (model_store/), GFS_RUN_DIR (repo root: key_file.json, logs/ and build/serve/ go there),
# GFS_START_TIMEOUT (seconds, 1800), GFS_KEY_MINUTES (minutes the inference and management keys stay valid,
# 1440; rotate them before that, or give a longer time), GFS_LOG_CONFIG (scripts/log4j2.xml; empty: TorchServe's
# own, which logs ~80x more).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STORE=${GFS_MODEL_STORE:-$ROOT/model_store}
RUN_DIR=${GFS_RUN_DIR:-$ROOT}
INFERENCE_PORT=${GFS_INFERENCE_PORT:-8080}
MANAGEMENT_PORT=${GFS_MANAGEMENT_PORT:-8081}
METRICS_PORT=${GFS_METRICS_PORT:-8082}
GRPC_INFERENCE_PORT=${GFS_GRPC_INFERENCE_PORT:-7070}
GRPC_MANAGEMENT_PORT=${GFS_GRPC_MANAGEMENT_PORT:-7071}
START_TIMEOUT=${GFS_START_TIMEOUT:-1800}
KEY_MINUTES=${GFS_KEY_MINUTES:-1440}
LOG_CONFIG=${GFS_LOG_CONFIG-$ROOT/scripts/log4j2.xml}

# TorchServe keeps its pid file, the worker sockets and unpacked archives in the temp dir: a private one
# lets this server run beside others on the machine.
mkdir -p "$RUN_DIR/build/serve"
export TMPDIR=$RUN_DIR/build/serve TEMP=$RUN_DIR/build/serve
cd "$RUN_DIR"

key() {  # key management|inference|API
  python3 -c 'import json, sys; print(json.load(open("key_file.json"))[sys.argv[1]]["key"])' "$1"
}

fail() {
  echo "error: $*" >&2
  tail -n 40 logs/model_log.log logs/ts_log.log >&2 2>/dev/null || true
  # The frontend prints some fatal exceptions (a port it cannot bind) only to its stdout.
  grep -E "^([A-Za-z.$]+(Exception|Error)\b|Caused by: )" logs/torchserve_stdout.log >&2 2>/dev/null || true
  torchserve --stop --foreground >/dev/null 2>&1 || true
  exit 1
}

busy_ports() {  # which of "name=port ..." something on this machine already listens on
  python3 - "$@" <<'EOF'
import socket, sys
for arg in sys.argv[1:]:
    name, port = arg.split("=")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the frontend binds: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as e:
            print(f"  {name} port {port}: {e.strerror}")
EOF
}

running() {
  [[ -f $TMPDIR/.model_server.pid ]] && kill -0 "$(cat "$TMPDIR/.model_server.pid")" 2>/dev/null
}

start() {
  running && { echo "error: TorchServe already runs from $RUN_DIR (scripts/serve.sh stop)" >&2; exit 1; }
  shopt -s nullglob
  local archives=("$STORE"/*.tar.gz "$STORE"/*.mar "$STORE"/*/MAR-INF/MANIFEST.json)
  [[ ${#archives[@]} -gt 0 ]] || { echo "error: no model archive in $STORE (run scripts/archive.sh)" >&2; exit 1; }
  local busy
  busy=$(busy_ports inference=$INFERENCE_PORT management=$MANAGEMENT_PORT metrics=$METRICS_PORT \
    grpc-inference=$GRPC_INFERENCE_PORT grpc-management=$GRPC_MANAGEMENT_PORT)
  if [[ -n $busy ]]; then
    echo "error: cannot listen on 127.0.0.1:" >&2
    echo "$busy" >&2
    echo "stop what uses them (another TorchServe: scripts/serve.sh stop in its directory), or choose other ports" \
      "with GFS_INFERENCE_PORT, GFS_MANAGEMENT_PORT, GFS_METRICS_PORT, GFS_GRPC_*_PORT" >&2
    exit 1
  fi
  sed -e "s#^inference_address=.*#inference_address=http://127.0.0.1:$INFERENCE_PORT#" \
      -e "s#^management_address=.*#management_address=http://127.0.0.1:$MANAGEMENT_PORT#" \
      -e "s#^metrics_address=.*#metrics_address=http://127.0.0.1:$METRICS_PORT#" \
      -e "s#^grpc_inference_port=.*#grpc_inference_port=$GRPC_INFERENCE_PORT#" \
      -e "s#^grpc_management_port=.*#grpc_management_port=$GRPC_MANAGEMENT_PORT#" \
      -e "s#^metrics_config=.*#metrics_config=$ROOT/scripts/metrics.yaml#" \
      -e "s#^token_expiration_min=.*#token_expiration_min=$KEY_MINUTES#" \
      "$ROOT/scripts/config.properties" > build/serve/config.properties
  rm -f key_file.json
  mkdir -p logs
  torchserve --start --ts-config build/serve/config.properties --model-store "$STORE" --models all \
    ${LOG_CONFIG:+--log-config "$LOG_CONFIG"} > logs/torchserve_stdout.log 2>&1 \
    || fail "torchserve --start failed: $(cat logs/torchserve_stdout.log)"

  local mgmt=http://127.0.0.1:$MANAGEMENT_PORT deadline=$((SECONDS + START_TIMEOUT)) models
  echo "waiting for TorchServe on 127.0.0.1:$INFERENCE_PORT to load $STORE (up to ${START_TIMEOUT}s)..."
  until [[ -s key_file.json ]] && models=$(curl -sf -H "Authorization: Bearer $(key management)" "$mgmt/models"); do
    running || fail "TorchServe exited"
    [[ $SECONDS -lt $deadline ]] || fail "TorchServe did not come up"
    sleep 1
  done
  # Ready when every registered model has a READY worker; a failed initialize() is retried forever by
  # TorchServe, so give up on the first one.
  local names
  names=$(python3 -c 'import json, sys; print(*(m["modelName"] for m in json.loads(sys.argv[1])["models"]))' "$models")
  [[ -n $names ]] || fail "TorchServe registered no model from $STORE"
  for name in $names; do
    until curl -sf -H "Authorization: Bearer $(key management)" "$mgmt/models/$name" | grep -q '"status": "READY"'; do
      grep -q "Load model failed: $name" logs/ts_log.log 2>/dev/null && fail "model $name failed to load"
      running || fail "TorchServe exited"
      [[ $SECONDS -lt $deadline ]] || fail "model $name not ready after ${START_TIMEOUT}s"
      sleep 1
    done
    echo "ready: http://127.0.0.1:$INFERENCE_PORT/predictions/$name"
  done
  echo "keys: $RUN_DIR/key_file.json (Authorization: Bearer <inference key>); stop with scripts/serve.sh stop"
}

stop() {
  # --stop terminates the frontend (which stops its workers) and removes key_file.json from this directory.
  torchserve --stop --foreground
  echo "stopped TorchServe in $RUN_DIR"
}

rotate_key() {  # inference|management: TorchServe writes the new key to key_file.json; the old one is void at once
  [[ ${1:-} == inference || ${1:-} == management ]] || { echo "usage: $0 rotate-key inference|management" >&2; exit 2; }
  curl -sSf -H "Authorization: Bearer $(key API)" "http://127.0.0.1:$MANAGEMENT_PORT/token?type=$1" >/dev/null
  echo "new $1 key: $(key "$1") (in $RUN_DIR/key_file.json)"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  rotate-key) rotate_key "${2:-}" ;;
  *) echo "usage: $0 start|stop|rotate-key inference|management" >&2; exit 2 ;;
esac
