"""Write a weight-only quantized copy of a converted checkpoint, like gpt-fast's quantize.py.

    python -m gpt_fast.quantize checkpoints/Llama-3.1-8B-Instruct --mode int8
    python -m gpt_fast.quantize checkpoints/Llama-3.1-8B-Instruct --mode int4 --groupsize 128

writes checkpoints/Llama-3.1-8B-Instruct-int8/ (or -int4-g128/): model.pth, config.json with the scheme under
"quantization" (loading reads it from there, never from a name) and a copy of the tokenizer's files. A quantized
checkpoint is thus an ordinary checkpoint directory: generate, eval, bench and the handler load it as they are.
Quantization runs on the CPU and keeps the checkpoint's dtype for scales; int4 codes are saved unpacked, so one
file serves CPU and CUDA.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from ..model.args import QUANT_MODES, ModelArgs, quantization_scheme, scheme_name
from ..model.quantized import quantize_model
from .load import load_model, resolve_checkpoint
from .weights import copy_tokenizer, save_checkpoint


def quantize_checkpoint(path: Union[str, Path], mode: str, groupsize: Optional[int] = None,
                        out_dir: Union[str, Path, None] = None) -> Path:
    """Quantize the checkpoint at `path` into out_dir (default: beside it, named by scheme); returns out_dir."""
    weights = resolve_checkpoint(path)
    src = weights.parent
    args = ModelArgs.load(src / "config.json")
    if args.quantization:
        raise ValueError(f"{src} is already quantized ({scheme_name(args.quantization)}); "
                         "quantize the unquantized checkpoint instead")
    scheme = quantization_scheme(mode, groupsize)
    out_dir = Path(out_dir) if out_dir else src.with_name(f"{src.name}-{scheme_name(scheme)}")
    if out_dir.resolve() == src.resolve():
        raise ValueError(f"{out_dir} holds the checkpoint being quantized; choose another output directory")
    # Keep the checkpoint's dtype: the int8 scales and int4 scales/zeros are stored in it.
    dtype = torch.load(weights, mmap=True, weights_only=True)["tok_embeddings.weight"].dtype
    model = load_model(weights, device="cpu", dtype=dtype)
    quantize_model(model, mode, groupsize, pack=False, progress=True)
    save_checkpoint(model.state_dict(), model.args, out_dir)
    copy_tokenizer(src, out_dir)
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="checkpoint directory, or a .pth inside one")
    ap.add_argument("--mode", required=True, choices=QUANT_MODES)
    ap.add_argument("--groupsize", type=int, help="int4 only: input features per scale/zero (default 128)")
    ap.add_argument("--out", type=Path, help="output directory (default: CHECKPOINT-int8 or CHECKPOINT-int4-gN)")
    a = ap.parse_args(argv)
    try:
        quantize_checkpoint(a.checkpoint, a.mode, a.groupsize, a.out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
