"""Llama (1, 2, 3.x, CodeLlama, TinyLlama, SmolLM): LlamaForCausalLM.

The model our Transformer is: separate q/k/v projections are fused into `wqkv`, the rest is renamed.
"""
import re
from typing import Any, Optional

from torch import Tensor

from ..model.args import ModelArgs
from . import hf
from .hf import Piece

TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
PROJECTION_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
# Llama's post_attention_layernorm is the feed-forward's input norm.
LAYER_NAMES = {**PROJECTION_NAMES, "input_layernorm.weight": "attention_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight"}
# Position of each projection inside the fused wqkv (the model splits it as q, k, v).
QKV_INDEX = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
# Old checkpoints saved the RoPE table as a buffer; the model recomputes it.
IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def model_args(config: dict, generation_config: Optional[dict] = None, **options: Any) -> ModelArgs:
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported (the model has no bias terms)")
    return hf.model_args(config, generation_config, **options)


def weight_pieces(name: str, tensor: Tensor, args: ModelArgs, layer_names: dict[str, str] = LAYER_NAMES,
                  qkv_index: dict[str, int] = QKV_INDEX) -> Optional[list[Piece]]:
    """Llama's names; a family with more or other tensors per layer passes its own tables."""
    if IGNORED_RE.fullmatch(name) or (name == "lm_head.weight" and args.tie_embeddings):
        return []  # a tied lm_head is a duplicate of the embeddings
    if name in TOP_NAMES:
        return [Piece(TOP_NAMES[name], tensor)]
    layer = hf.layer_name(name, args)
    if layer is None:
        return None
    prefix, local = layer
    if local in layer_names:
        return [Piece(prefix + layer_names[local], tensor)]
    if local in qkv_index:
        kind = local.rsplit(".", 1)[1]  # weight or bias
        return [Piece(f"{prefix}attention.wqkv.{kind}", tensor, qkv_index[local], count=3)]
    return None
