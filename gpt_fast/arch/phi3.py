"""Phi-3 / Phi-3.5-mini / Phi-3-medium (Phi3ForCausalLM): Llama's layer with the q, k, v projections stored fused
(qkv_proj, already our wqkv) and the gate and up projections too (gate_up_proj, split into w1 and w3 here); RoPE
on the first partial_rotary_factor of each head; LongRoPE (rope_scaling type longrope, or its old names su and
yarn) for the 128k-context variants; sliding-window attention in every layer when config.json sets one shorter
than the context (Phi-3-mini-4k: 2047)."""
from typing import Optional

from torch import Tensor

from ..model.args import ModelArgs
from . import hf, llama
from .hf import Piece

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def model_args(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    config = {**DEFAULTS, **config}
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):  # what transformers' Phi3Config renames
        config["rope_scaling"] = {**rope, "rope_type": "longrope"}
        config.pop("rope_parameters", None)
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    return llama.model_args(config, generation_config, rotary_dim=None if rotary_dim == head_dim else rotary_dim,
                            **hf.sliding_window(config))


def weight_pieces(name: str, tensor: Tensor, args: ModelArgs) -> Optional[list[Piece]]:
    layer = hf.layer_name(name, args)
    if layer is not None:
        prefix, local = layer
        if local == "self_attn.qkv_proj.weight":  # rows q, k, v: wqkv's order
            return [Piece(prefix + "attention.wqkv.weight", tensor)]
        if local == "mlp.gate_up_proj.weight":  # rows gate, then up
            gate, up = tensor.chunk(2)
            return [Piece(prefix + "feed_forward.w1.weight", gate), Piece(prefix + "feed_forward.w3.weight", up)]
    return llama.weight_pieces(name, tensor, args)
