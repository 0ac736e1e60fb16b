#!/usr/bin/env bash
# Package a checkpoint for TorchServe:
#   scripts/archive.sh CHECKPOINT_DIR [--name NAME] [--config YAML] [--no-archive]
# writes model_store/NAME.tar.gz (default NAME: gpt-fast, YAML: model_config.yaml) holding handler.py, the
# gpt_fast package and the checkpoint's files under checkpoint/. --no-archive writes model_store/NAME/
# instead, with checkpoint/ a symlink to CHECKPOINT_DIR: no copy of a multi-GB checkpoint, and no unpacking
# on every start (keep CHECKPOINT_DIR where it is). GFS_MODEL_STORE overrides model_store/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { echo "usage: $0 CHECKPOINT_DIR [--name NAME] [--config YAML] [--no-archive]" >&2; exit 2; }

[[ $# -ge 1 ]] || usage
CHECKPOINT=$1; shift
NAME=gpt-fast
CONFIG=$ROOT/model_config.yaml
FORMAT=tgz
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=${2:?}; shift 2 ;;
    --config) CONFIG=${2:?}; shift 2 ;;
    --no-archive) FORMAT=no-archive; shift ;;
    *) usage ;;
  esac
done
[[ -f $CHECKPOINT/model.pth && -f $CHECKPOINT/config.json && ( -f $CHECKPOINT/tokenizer.model || \
   -f $CHECKPOINT/tokenizer.json ) ]] || {
  echo "error: $CHECKPOINT needs model.pth, config.json and tokenizer.json or tokenizer.model (see gpt_fast.convert)" >&2
  exit 1; }
[[ -f $CONFIG ]] || { echo "error: config not found: $CONFIG" >&2; exit 1; }
CHECKPOINT=$(cd "$CHECKPOINT" && pwd)
STORE=${GFS_MODEL_STORE:-$ROOT/model_store}
mkdir -p "$STORE"

# The archiver copies the children of an --extra-files folder to the archive root, so stage one holding
# gpt_fast/ (and checkpoint/ as symlinks, which the copy follows). It also builds the archive in
# $TMPDIR/NAME: a private TMPDIR keeps two runs from sharing it.
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/extra" "$STAGE/tmp"
cp -r "$ROOT/gpt_fast" "$STAGE/extra/gpt_fast"
if [[ $FORMAT == tgz ]]; then
  mkdir "$STAGE/extra/checkpoint"
  for f in "$CHECKPOINT"/*; do
    [[ -f $f ]] && ln -s "$f" "$STAGE/extra/checkpoint/"
  done
fi

# One model per name: an old archive in the other format would make TorchServe load the name twice.
rm -rf "${STORE:?}/$NAME" "$STORE/$NAME.tar.gz"
TMPDIR=$STAGE/tmp torch-model-archiver --model-name "$NAME" --version 1.0 --handler "$ROOT/handler.py" \
  --extra-files "$STAGE/extra" --config-file "$CONFIG" --archive-format "$FORMAT" --export-path "$STORE" -f
if [[ $FORMAT == no-archive ]]; then
  ln -s "$CHECKPOINT" "$STORE/$NAME/checkpoint"
  echo "wrote $STORE/$NAME/ (checkpoint -> $CHECKPOINT)"
else
  echo "wrote $STORE/$NAME.tar.gz ($(du -h "$STORE/$NAME.tar.gz" | cut -f1))"
fi
