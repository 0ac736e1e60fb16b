"""Our state dict from a checkpoint's named tensors, through its architecture adapter (arch.weight_pieces: renamed,
fused, stacked), checked against the model's shapes; and a checkpoint directory written: model.pth + config.json,
and the tokenizer's files copied. Shared by the Hugging Face (convert.py) and GGUF (gguf.py) converters and
quantize.py.
"""
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterable, Optional

import torch

from ..model.args import ModelArgs, scheme_name
from ..model.transformer import Transformer
from ..text.tokenizer import tokenizer_files


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes whole storages; a view into a shared .bin storage would drag the rest along.
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


Sources = Iterable[tuple[str, Iterable[tuple[str, torch.Tensor]]]]


def convert_weights(sources: Sources, args: ModelArgs, arch: ModuleType) -> dict[str, torch.Tensor]:
    """Stream (file name, its (Hugging Face name, tensor) pairs) into a state dict with our names
    (arch.weight_pieces), checked against the model's shapes; unknown names fail at the end of their file."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list[Optional[torch.Tensor]]] = {}  # parts of fused/stacked tensors read so far
    for source, tensors in sources:
        unknown = []
        for name, tensor in tensors:
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
            raise ValueError(f"{source}: unknown weight names {sorted(unknown)[:20]}"
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


def save_checkpoint(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path) -> Path:
    """Write model.pth and config.json into out_dir (the tokenizer's files are the caller's); returns model.pth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "model.pth"
    torch.save(state, weights_path)
    args.save(out_dir / "config.json")
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    quantized = f", {scheme_name(args.quantization)}" if args.quantization else ""
    print(f"wrote {weights_path} ({len(state)} tensors, {size_gb:.2f} GB{quantized}, {args.tokenizer} tokenizer)",
          file=sys.stderr)
    return weights_path


def copy_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """Copy a checkpoint directory's tokenizer files (text.tokenizer.tokenizer_files) into out_dir."""
    for source in tokenizer_files(src_dir):
        if source.resolve() != (out_dir / source.name).resolve():
            shutil.copyfile(source, out_dir / source.name)
