"""Convert a GGUF file (llama.cpp's format) into a checkpoint directory: model.pth, config.json and the Hugging Face
tokenizer files (gguf_tokenizer.py).

    python -m gpt_fast.convert FILE.gguf OUT_DIR [--dtype float32]

The file's `general.architecture` picks the adapter (arch.for_gguf), which turns the metadata into a Hugging Face
config.json and llama.cpp's tensor names and layouts into Hugging Face's; from there the weights take the same
renames and checks as a Hugging Face checkpoint (weights.convert_weights). The whole mapping is first run on
shapes alone, so a file the model cannot take fails before anything is dequantized. Then tensors are dequantized
one at a time from the memory-mapped file by the `gguf` package's vectorized numpy code and cast to bf16 (or
fp32): the converter holds the output model plus one tensor in fp32, never the model twice.
"""
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize as dequantize_blocks

from ..arch import for_gguf
from ..arch.gguf_layout import field
from .gguf_tokenizer import generation_config, tokenizer_files
from .weights import convert_weights, save_checkpoint

Q = GGMLQuantizationType
# The tensor types we read: plain floats and llama.cpp's usual quantizations (block types Q4_0..Q8_0, K-quants).
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.Q6_K, Q.Q5_K, Q.Q4_K)


def read_metadata(reader: GGUFReader) -> dict:
    """The key/value metadata as Python values (strings, numbers, lists)."""
    metadata = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = f.contents()
        if f.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06, in config.json
        metadata[name] = value
    return metadata


def tensor_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The torch shape: GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def dequantize(tensor: ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the file as `dtype` (the memory-mapped bytes are copied, never written)."""
    kind, data = tensor.tensor_type, tensor.data
    if kind == Q.F32:
        values = torch.from_numpy(np.array(data, dtype=np.float32))
    elif kind == Q.F16:
        values = torch.from_numpy(np.array(data.view(np.float16)))
    elif kind == Q.BF16:
        values = torch.from_numpy(np.array(data.view(np.int16))).view(torch.bfloat16)
    else:
        values = torch.from_numpy(dequantize_blocks(data, kind))
    return values.reshape(tensor_shape(tensor)).to(dtype)


def check_types(reader: GGUFReader) -> None:
    unsupported: dict[str, list[str]] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            unsupported.setdefault(t.tensor_type.name, []).append(t.name)
    if unsupported:
        found = "; ".join(f"{kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                          for kind, names in unsupported.items())
        raise ValueError(f"unsupported GGUF tensor type {found} "
                         f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert the GGUF file at path into out_dir; returns out_dir/model.pth."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError) as e:  # the gguf package's errors for a bad magic or a cut-off file
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    metadata = read_metadata(reader)
    arch = for_gguf(field(metadata, "general.architecture"))
    check_types(reader)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tensor_shape(t) for name, t in tensors.items()}
    config = arch.gguf_config(metadata, shapes, lambda name: dequantize(tensors[name], torch.float32))
    tokenizer = tokenizer_files(metadata, config["max_position_embeddings"])
    args = arch.model_args(config, generation_config(metadata))
    args.tokenizer = "huggingface"

    def hf_tensors(read: Callable[[ReaderTensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        unknown = []
        for t in reader.tensors:
            pairs = arch.gguf_weight(t.name, read(t), config)
            if pairs is None:
                unknown.append(t.name)
            yield from pairs or []
        if unknown:
            raise ValueError(f"{path}: unknown tensor names {unknown[:20]}")

    convert_weights([(str(path), hf_tensors(lambda t: torch.empty(tensor_shape(t), device="meta")))], args, arch)
    counts = ", ".join(f"{kind} {n}" for kind, n in Counter(t.tensor_type.name for t in reader.tensors).items())
    print(f"{path.name}: {metadata['general.architecture']}, {len(tensors)} tensors ({counts}) -> {dtype}",
          file=sys.stderr, flush=True)
    state = convert_weights([(str(path), hf_tensors(lambda t: dequantize(t, dtype)))], args, arch)
    weights_path = save_checkpoint(state, args, out_dir)
    for name, text in tokenizer.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return weights_path
