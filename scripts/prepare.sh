#!/usr/bin/env bash
# Make a servable checkpoint: scripts/prepare.sh REPO_ID_OR_LOCAL_DIR
#   meta-llama/Llama-3.1-8B-Instruct -> downloads into checkpoints/Llama-3.1-8B-Instruct/hf/, converts into
#   checkpoints/Llama-3.1-8B-Instruct/. A local Hugging Face directory is converted in place of the download.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 REPO_ID_OR_LOCAL_DIR" >&2
    exit 2
fi
src=$1
shift
if [[ $# -gt 0 ]]; then  # options (e.g. --quantize) go here
    echo "unknown option: $1" >&2
    exit 2
fi

if [[ -d $src ]]; then
    hf_dir=$(cd "$src" && pwd)
    name=$(basename "$hf_dir")
    # Re-preparing checkpoints/<name>/hf should land in checkpoints/<name>, not checkpoints/hf.
    [[ $name == hf ]] && name=$(basename "$(dirname "$hf_dir")")
else
    name=${src##*/}
    hf_dir=""
fi

cd "$(dirname "$0")/.."
out=checkpoints/$name
if [[ -z $hf_dir ]]; then
    hf_dir=$out/hf
    python -m gpt_fast.download "$src" "$hf_dir"
fi
python -m gpt_fast.convert "$hf_dir" "$out"
echo "ready: $out"
