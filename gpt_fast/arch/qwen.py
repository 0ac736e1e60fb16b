"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM) and Qwen3 dense (Qwen3ForCausalLM): Llama's layout with
- Qwen2: a bias on the q, k and v projections (fused into wqkv's bias);
- Qwen3: no bias, an RMSNorm over each head's query and key before RoPE, head_dim independent of hidden_size.
Both: tied or untied embeddings, a vocabulary padded past the tokenizer's, and sliding-window attention in the
layers from max_window_layers on when use_sliding_window is set (no released checkpoint sets it).

Qwen2's GGUF files (`general.architecture` "qwen2") keep Hugging Face's q and k row order (llama.cpp rotates them
NeoX-style, as transformers does) and name the q/k/v biases attn_q.bias, attn_k.bias, attn_v.bias.
"""
from typing import Callable, Optional

from torch import Tensor

from ..model.args import ModelArgs
from . import gguf_layout, hf, llama
from .hf import Piece

# What transformers' Qwen2Config / Qwen3Config assume for fields config.json leaves out.
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "max_window_layers": 28}
QWEN3_DEFAULTS = {"head_dim": 128}
QKV_INDEX = {**llama.QKV_INDEX, "self_attn.q_proj.bias": 0, "self_attn.k_proj.bias": 1, "self_attn.v_proj.bias": 2}
LAYER_NAMES = {**llama.LAYER_NAMES, "self_attn.q_norm.weight": "attention.q_norm.weight",
               "self_attn.k_norm.weight": "attention.k_norm.weight"}


def model_args(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    qwen3 = "Qwen3ForCausalLM" in config.get("architectures", [])
    config = {**DEFAULTS, **(QWEN3_DEFAULTS if qwen3 else {}), **config}
    if qwen3 and config.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported for Qwen3 (the output projection has no bias)")
    if not config.get("use_sliding_window"):
        config["sliding_window"] = None
    window = hf.sliding_window(config, list(range(config["max_window_layers"], config["num_hidden_layers"])))
    return hf.model_args(config, generation_config, qkv_bias=not qwen3, qk_norm=qwen3, **window)


def weight_pieces(name: str, tensor: Tensor, args: ModelArgs) -> Optional[list[Piece]]:
    return llama.weight_pieces(name, tensor, args, LAYER_NAMES, QKV_INDEX)


GGUF_ARCHITECTURE = "qwen2"
GGUF_BLOCK_NAMES = {**gguf_layout.BLOCK_NAMES, "attn_q.bias": "self_attn.q_proj.bias",
                    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias"}


def gguf_config(metadata: dict, shapes: dict[str, tuple[int, ...]], read: Callable[[str], Tensor]) -> dict:
    """The Hugging Face config.json of a "qwen2" GGUF file."""
    return gguf_layout.llama_config(metadata, shapes, GGUF_ARCHITECTURE, "Qwen2ForCausalLM")


def gguf_weight(name: str, tensor: Tensor, config: dict) -> Optional[list[tuple[str, Tensor]]]:
    hf_name = gguf_layout.hf_name(name, gguf_layout.TOP_NAMES, GGUF_BLOCK_NAMES)
    return None if hf_name is None else [(hf_name, tensor)]
