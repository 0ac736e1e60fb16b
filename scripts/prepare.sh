#!/usr/bin/env bash
# Make a servable checkpoint: scripts/prepare.sh REPO_ID_OR_LOCAL_DIR_OR_GGUF [--quantize int8|int4 [--groupsize N]]
#   meta-llama/Llama-3.1-8B-Instruct -> downloads into checkpoints/Llama-3.1-8B-Instruct/hf/, converts into
#   checkpoints/Llama-3.1-8B-Instruct/. A local Hugging Face directory is converted in place of the download,
#   and so is a local GGUF file: model.Q4_K_M.gguf -> checkpoints/model.Q4_K_M/ (dequantized to bf16).
#   --quantize also writes a quantized copy beside it: checkpoints/Llama-3.1-8B-Instruct-int8/ (or -int4-g128/).
set -euo pipefail

usage="usage: $0 REPO_ID_OR_LOCAL_DIR_OR_GGUF [--quantize int8|int4 [--groupsize 32|64|128|256]]"
if [[ $# -lt 1 ]]; then
    echo "$usage" >&2
    exit 2
fi
src=$1
shift
mode=""
groupsize=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --quantize|--groupsize)
            [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; echo "$usage" >&2; exit 2; }
            if [[ $1 == --quantize ]]; then mode=$2; else groupsize=$2; fi
            shift 2 ;;
        *) echo "unknown option: $1" >&2; echo "$usage" >&2; exit 2 ;;
    esac
done
# Check the options before the download and conversion, not after.
case $mode/$groupsize in
    /) ;;
    int8/) ;;
    int4/|int4/32|int4/64|int4/128|int4/256) ;;
    *) echo "bad quantization: --quantize '$mode' --groupsize '$groupsize'" >&2; echo "$usage" >&2; exit 2 ;;
esac

if [[ -f $src && $src == *.gguf ]]; then
    input=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
    name=$(basename "$src" .gguf)
elif [[ -d $src ]]; then
    input=$(cd "$src" && pwd)
    name=$(basename "$input")
    # Re-preparing checkpoints/<name>/hf should land in checkpoints/<name>, not checkpoints/hf.
    [[ $name == hf ]] && name=$(basename "$(dirname "$input")")
else
    name=${src##*/}
    input=""
fi

cd "$(dirname "$0")/.."
out=checkpoints/$name
if [[ -z $input ]]; then
    input=$out/hf
    python -m gpt_fast.download "$src" "$input"
fi
python -m gpt_fast.convert "$input" "$out"
echo "ready: $out"
if [[ -n $mode ]]; then
    python -m gpt_fast.quantize "$out" --mode "$mode" ${groupsize:+--groupsize "$groupsize"}
fi
