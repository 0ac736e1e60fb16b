"""Convert a Hugging Face checkpoint directory into model.pth, config.json and the tokenizer.

    python -m gpt_fast.convert HF_DIR OUT_DIR

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
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from ..arch import for_hf_config
from ..model.args import ModelArgs
from ..model.transformer import Transformer
from ..text.hf_tokenizer import HuggingFaceTokenizer
from ..text.tokenizer import find_tokenizer, tokenizer_files


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


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes whole storages; a view into a shared .bin storage would drag the rest along.
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def convert_weights(files: list[Path], args: ModelArgs, arch: ModuleType) -> dict[str, torch.Tensor]:
    """Stream the HF weight files into a state dict with our names (arch.weight_pieces), checked against the
    model's shapes."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list[Optional[torch.Tensor]]] = {}  # parts of fused/stacked tensors read so far
    for i, path in enumerate(files, 1):
        print(f"[{i}/{len(files)}] {path.name}", file=sys.stderr, flush=True)
        unknown = []
        for name, tensor in _read_shard(path):
            pieces = arch.weight_pieces(name, tensor, args)
            if pieces is None:
                unknown.append(name)
            for piece in pieces or []:
                if piece.count == 1:
                    out[piece.name] = _own_storage(piece.tensor)
                    continue
                parts = pending.setdefault(piece.name, [None] * piece.count)
                parts[piece.index] = piece.tensor
                if all(p is not None for p in parts):
                    del pending[piece.name]
                    out[piece.name] = torch.stack(parts) if piece.stack else torch.cat(parts)
        if unknown:
            raise ValueError(f"{path}: unknown weight names {sorted(unknown)[:20]}"
                             f"{f' (and {len(unknown) - 20} more)' if len(unknown) > 20 else ''}")
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_embeddings:
        del expected["output.weight"]
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:20]}")
    unexpected = sorted(set(out) - set(expected))
    if unexpected:  # e.g. a dense MLP in a checkpoint whose config.json declares experts
        raise ValueError(f"weights the config.json model does not have: {unexpected[:20]}")
    for name, tensor in out.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match config.json "
                             f"(expected {tuple(expected[name].shape)})")
    return out


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

    state = convert_weights(files, args, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "model.pth"
    torch.save(state, weights_path)
    args.save(out_dir / "config.json")
    for source in tokenizer_files(hf_dir):
        if source.resolve() != (out_dir / source.name).resolve():
            shutil.copyfile(source, out_dir / source.name)
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    print(f"wrote {weights_path} ({len(state)} tensors, {size_gb:.2f} GB, {args.tokenizer} tokenizer)",
          file=sys.stderr)
    return weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write model.pth, config.json and the tokenizer")
    opts = parser.parse_args()
    try:
        convert(opts.hf_dir, opts.out_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
