"""Mixtral (MixtralForCausalLM): Mistral with a sparse mixture of experts in place of the MLP.

Its `block_sparse_moe` has a router `gate` and experts.M.w1/w2/w3 (the names real checkpoints use and that
transformers' save_pretrained writes); the experts' matrices are stacked into [num_experts, ...] tensors.
"""
import re
from typing import Optional

from torch import Tensor

from ..model.args import ModelArgs
from . import hf, llama, mistral
from .hf import Piece

EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def model_args(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    return mistral.model_args(config, generation_config, num_experts=config.get("num_local_experts", 0),
                              num_experts_per_tok=config.get("num_experts_per_tok", 0))


def weight_pieces(name: str, tensor: Tensor, args: ModelArgs) -> Optional[list[Piece]]:
    layer = hf.layer_name(name, args)
    if layer is not None:
        prefix, local = layer
        if local == "block_sparse_moe.gate.weight":
            return [Piece(prefix + "feed_forward.gate.weight", tensor)]
        expert = EXPERT_RE.fullmatch(local)
        if expert and int(expert.group(1)) < args.num_experts:
            return [Piece(f"{prefix}feed_forward.{expert.group(2)}", tensor, int(expert.group(1)),
                          count=args.num_experts, stack=True)]
    return llama.weight_pieces(name, tensor, args)
