"""Perplexity of a text under a checkpoint: the measurement behind choosing a quantization.

    python -m gpt_fast.eval checkpoints/stories110M --text story.txt
    python -m gpt_fast.eval checkpoints/stories110M --text story.txt --quantize int4 --groupsize 32

The text is tokenized once (bos first, if the tokenizer adds one) and scored in windows of --max-seq-len tokens.
Consecutive windows share one token, so every token but the first is predicted exactly once, from the context of
its window.
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpoints.load import DTYPES, default_device, load
from .engine.engine import default_max_seq_len
from .model.args import QUANT_MODES, scheme_name
from .model.transformer import Transformer


@torch.no_grad()
def perplexity(model: Transformer, ids: list[int], window: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of ids[1:], and the number of tokens scored."""
    if window < 2 or len(ids) < 2:
        raise ValueError(f"need a window of >= 2 tokens and a text of >= 2 tokens (window {window}, "
                         f"text {len(ids)} tokens)")
    if window > model.args.max_position_embeddings:
        raise ValueError(f"window {window} exceeds the model's max_position_embeddings "
                         f"{model.args.max_position_embeddings}")
    device = model.tok_embeddings.weight.device
    model.setup_caches(1, window)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = torch.tensor([ids[start:start + window]], device=device)
        positions = torch.arange(chunk.shape[1], device=device)[None]
        logits = model(chunk, positions, slot)[0, :-1]
        nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count), count


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="checkpoint directory, or a .pth inside one")
    ap.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16")
    ap.add_argument("--max-seq-len", type=int, help="window length (default: min(2048, model's))")
    ap.add_argument("--quantize", choices=QUANT_MODES, help="quantize in memory first (unquantized checkpoints)")
    ap.add_argument("--groupsize", type=int, help="int4 group size (default 128)")
    a = ap.parse_args(argv)
    try:
        model, tokenizer = load(a.checkpoint, device=a.device or default_device(), dtype=DTYPES.get(a.dtype),
                                quantize=a.quantize, groupsize=a.groupsize)
        window = a.max_seq_len or default_max_seq_len(model.args)
        ppl, count = perplexity(model, tokenizer.encode(a.text.read_text(encoding="utf-8")), window)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    weight = model.tok_embeddings.weight
    print(f"perplexity {ppl:.4f} over {count} tokens (windows of {window}; {weight.device}, "
          f"{str(weight.dtype).removeprefix('torch.')}, {scheme_name(model.args.quantization)})")


if __name__ == "__main__":
    main()
