"""Convert a Hugging Face checkpoint directory into model.pth, config.json and the tokenizer.

    python -m gpt_fast.convert HF_DIR OUT_DIR
    python -m gpt_fast.convert FILE.gguf OUT_DIR [--dtype float32]     # see gguf.py

The architecture's adapter (gpt_fast/arch) maps config.json to ModelArgs and each weight name to ours. Weights are
streamed shard by shard: each tensor is renamed as it is read, and the parts of a fused or stacked tensor (q/k/v
into `wqkv`, Mixtral's experts) are joined as soon as its last part has been seen (they may sit in different
shards), so the converter holds the model roughly once, never a shard and its converted copy together.

The tokenizer: tokenizer.json when the directory has one (what transformers' AutoTokenizer reads), copied with
tokenizer_config.json, chat_template.jinja and generation_config.json; else tokenizer.model (sentencepiece, or Llama
3's tiktoken file under original/).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..arch import for_hf_config
from ..text.hf_tokenizer import HuggingFaceTokenizer
from ..text.tokenizer import find_tokenizer
from .gguf import convert_gguf
from .load import DTYPES
from .weights import convert_weights, copy_tokenizer, save_checkpoint


def find_weight_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's weight files, preferring safetensors over .bin, sharded or single."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [hf_dir / name for name in shards]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"shard {f} listed in {index} is missing")
            return files
        if (hf_dir / single_name).is_file():
            return [hf_dir / single_name]
    raise FileNotFoundError(f"no weights in {hf_dir} (expected model.safetensors[.index.json] or "
                            "pytorch_model.bin[.index.json])")


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        while state:
            yield state.popitem()


def _read_shards(files: list[Path]) -> Iterator[tuple[str, Iterator[tuple[str, torch.Tensor]]]]:
    for i, path in enumerate(files, 1):
        print(f"[{i}/{len(files)}] {path.name}", file=sys.stderr, flush=True)
        yield str(path), _read_shard(path)


def convert(hf_dir: Path, out_dir: Path) -> Path:
    """Convert the HF checkpoint in hf_dir into out_dir; returns out_dir/model.pth."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {hf_dir}")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    generation_path = hf_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    config = json.loads(config_path.read_text())
    arch = for_hf_config(config)
    args = arch.model_args(config, generation)
    # Find everything before the slow part so a bad directory fails at once.
    _, args.tokenizer = find_tokenizer(hf_dir)
    if args.tokenizer == "huggingface":
        HuggingFaceTokenizer(hf_dir)  # a malformed tokenizer.json or chat template fails here, not at serving time
    files = find_weight_files(hf_dir)

    state = convert_weights(_read_shards(files), args, arch)
    weights_path = save_checkpoint(state, args, out_dir)
    copy_tokenizer(hf_dir, out_dir)
    return weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Hugging Face checkpoint directory, or a .gguf file")
    parser.add_argument("out_dir", type=Path, help="where to write model.pth, config.json and the tokenizer")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="what a GGUF file's tensors are dequantized to (default bfloat16; Hugging Face "
                             "weights keep their own dtype)")
    opts = parser.parse_args()
    try:
        if opts.source.suffix == ".gguf":
            convert_gguf(opts.source, opts.out_dir, DTYPES[opts.dtype or "bfloat16"])
        elif opts.dtype:
            parser.error("--dtype applies to .gguf files only")
        else:
            convert(opts.source, opts.out_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
