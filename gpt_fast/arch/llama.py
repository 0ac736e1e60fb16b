"""Llama (1, 2, 3.x, CodeLlama, TinyLlama, SmolLM): LlamaForCausalLM.

The model our Transformer is: separate q/k/v projections are fused into `wqkv`, the rest is renamed. Its GGUF files
(`general.architecture` "llama": Llama, Mistral, SmolLM, TinyLlama, ...) store q and k in llama.cpp's row order.
"""
import re
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..model.args import ModelArgs
from ..model.layers import rope_inv_freq
from . import gguf_layout, hf
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


GGUF_ARCHITECTURE = "llama"
# Llama 3.1-3.3's rope scaling besides `factor` (Meta's published values): llama.cpp stores only the resulting
# per-frequency factors (the rope_freqs.weight tensor), so these are checked against it.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def gguf_config(metadata: dict, shapes: dict[str, tuple[int, ...]], read: Callable[[str], Tensor]) -> dict:
    """The Hugging Face config.json of a "llama" GGUF file (read(name): one of its tensors, dequantized)."""
    experts = gguf_layout.scalar(metadata, "llama.expert_count", 0)
    if experts:
        raise ValueError(f"GGUF mixture of experts (llama.expert_count={experts}, e.g. Mixtral) is not supported: "
                         "convert the Hugging Face checkpoint")
    config = gguf_layout.llama_config(metadata, shapes, GGUF_ARCHITECTURE, "LlamaForCausalLM")
    if "rope_freqs.weight" in shapes:
        config["rope_scaling"] = _llama3_rope_scaling(config, read("rope_freqs.weight").float())
    return config


def _llama3_rope_scaling(config: dict, freq_factors: Tensor) -> dict:
    """Llama 3.1's rope_scaling from llama.cpp's per-frequency divisors; ValueError if they are not Llama 3's."""
    scaling = {"rope_type": "llama3", "factor": freq_factors.max().item(), **LLAMA3_ROPE}
    args = model_args(config)
    plain = rope_inv_freq(args)
    args.rope_scaling = scaling
    if freq_factors.shape != plain.shape or not torch.allclose(plain / freq_factors, rope_inv_freq(args), rtol=1e-4):
        raise ValueError("GGUF rope_freqs.weight is not Llama 3.1's rope scaling (low_freq_factor 1, "
                         "high_freq_factor 4, original context 8192): not supported")
    return scaling


def gguf_weight(name: str, tensor: Tensor, config: dict) -> Optional[list[tuple[str, Tensor]]]:
    """GGUF tensor `name` as (Hugging Face name, tensor) pairs: [] for tensors to drop, None for unknown names."""
    if name == "rope_freqs.weight":
        return []  # read into config.json's rope_scaling by gguf_config
    hf_name = gguf_layout.hf_name(name, gguf_layout.TOP_NAMES, gguf_layout.BLOCK_NAMES)
    if hf_name is None:
        return None
    if hf_name.endswith("self_attn.q_proj.weight"):
        tensor = gguf_layout.unpermute_rope_rows(tensor, config["num_attention_heads"])
    elif hf_name.endswith("self_attn.k_proj.weight"):
        tensor = gguf_layout.unpermute_rope_rows(tensor, config["num_key_value_heads"])
    return [(hf_name, tensor)]
