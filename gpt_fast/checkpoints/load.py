"""Load a converted checkpoint directory (model.pth + config.json + tokenizer) onto a device: the one place where a
checkpoint, quantization at load, tensor-parallel sharding and the tokenizer come together."""
from pathlib import Path
from typing import Optional, Union

import torch

from ..model.args import ModelArgs
from ..model.quantized import empty_quantized_linears, pack_for_device, quantize_model
from ..model.tp import shard_model
from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer, load_tokenizer


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint directory, or a .pth file inside one; returns the .pth file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


# The dtype names the CLI, the bench and the handler config accept.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    # bf16 on CUDA; on CPU bf16 too, the faster of bf16/fp32 as measured by scripts/bench.py (BENCHMARKS.md).
    return torch.bfloat16


def load(path: Union[str, Path], device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
         quantize: Optional[str] = None, groupsize: Optional[int] = None, rank: int = 0,
         world_size: int = 1) -> tuple[Transformer, Tokenizer]:
    """The model (see load_model) and the tokenizer of the checkpoint at `path`."""
    weights = resolve_checkpoint(path)
    model = load_model(weights, device, dtype, rank, world_size, quantize, groupsize)
    return model, load_tokenizer(weights.parent, model.args.tokenizer, model.args.stop_token_ids)


def load_model(path: Union[str, Path], device: Union[str, torch.device, None] = None,
               dtype: Optional[torch.dtype] = None, rank: int = 0, world_size: int = 1,
               quantize: Optional[str] = None, groupsize: Optional[int] = None) -> Transformer:
    """Build the model on the meta device and assign the mmapped weights (no second copy in RAM).

    A quantized checkpoint (config.json's `quantization`) gets quantized Linear layers before the weights are
    assigned; int4 weights are packed for `device` last. quantize ("int8" | "int4", with groupsize) quantizes an
    unquantized checkpoint after loading. world_size > 1 loads tensor-parallel shard `rank` (model/tp.py), reading only
    that shard's bytes.
    """
    weights = resolve_checkpoint(path)
    args = ModelArgs.load(weights.parent / "config.json")
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(args)
        if args.quantization:
            empty_quantized_linears(model, args.quantization)
    state = torch.load(weights, mmap=True, weights_only=True)
    # A quantized checkpoint stores its own quantized copy of a tied output layer.
    tied = args.tie_embeddings and not args.quantization
    expected = set(model.state_dict()) - ({"output.weight"} if tied else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match config.json: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    if world_size > 1:
        # Each rank gets its own slice of a tied output layer: the embedding stays whole.
        state = shard_model(model, {**state, "output.weight": state["tok_embeddings.weight"]} if tied else state,
                            rank, world_size)
        tied = False
    model.load_state_dict(state, assign=True, strict=False)
    if tied:
        model.tie_weights()
    model = model.to(device=device, dtype=dtype)
    if quantize:
        quantize_model(model, quantize, groupsize)
    pack_for_device(model)
    return model.eval().requires_grad_(False)
