"""Gemma 2 (Gemma2ForCausalLM): RMSNorm as x * (1 + w), embeddings scaled by sqrt(hidden_size), GeGLU with the tanh
GELU, a norm after attention and after the MLP as well as before each, attention logits and final logits
soft-capped, queries scaled by query_pre_attn_scalar ** -0.5, and sliding-window attention in alternate layers
(the even ones, or as config.json's layer_types says). Embeddings are tied unless config.json says otherwise."""
from typing import Optional

from torch import Tensor

from ..model.args import ModelArgs
from . import hf, llama
from .hf import Piece

# What transformers' Gemma2Config assumes for fields config.json leaves out (hub configs omit some of these).
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh"}
# A norm before and after each sublayer: post_attention_layernorm normalizes the attention's output here.
LAYER_NAMES = {**llama.PROJECTION_NAMES, "input_layernorm.weight": "attention_norm.weight",
               "post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffn_norm.weight"}


def model_args(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    config = {**DEFAULTS, **config}
    if config.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported (the model has no bias terms)")
    if config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is not supported (decoding is causal)")
    window = hf.sliding_window(config, list(range(0, config["num_hidden_layers"], 2)))
    return hf.model_args(config, generation_config, hidden_act=config["hidden_activation"], norm_unit_offset=True,
                         post_norms=True, scale_embeddings=True, attn_scale=config["query_pre_attn_scalar"] ** -0.5,
                         attn_softcap=config["attn_logit_softcapping"],
                         final_softcap=config["final_logit_softcapping"], **window)


def weight_pieces(name: str, tensor: Tensor, args: ModelArgs) -> Optional[list[Piece]]:
    return llama.weight_pieces(name, tensor, args, LAYER_NAMES)
