"""What GGUF files (llama.cpp's format) share across model families: the metadata keys of a decoder-only model,
llama.cpp's tensor names, and its row order for RoPE'd projections.

An adapter that reads GGUF (see arch/__init__.py) maps its `general.architecture` metadata to the Hugging Face
config.json fields its model_args already reads, and llama.cpp's tensor names to the Hugging Face names its
weight_pieces already knows, so a GGUF file goes through the same checks and renames as a Hugging Face checkpoint.
"""
import re
from typing import Any, Optional

from torch import Tensor

# blk.N.<name within the block>
BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# llama.cpp's names of a Llama-style model -> Hugging Face's. A family that adds tensors extends these tables.
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

_MISSING = object()


def hf_name(name: str, top_names: dict[str, str], block_names: dict[str, str]) -> Optional[str]:
    """The Hugging Face name of GGUF tensor `name`, or None for a name the tables do not know."""
    if name in top_names:
        return top_names[name]
    match = BLOCK_RE.fullmatch(name)
    if match is None or match.group(2) not in block_names:
        return None
    return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}"


def field(metadata: dict, key: str, default: Any = _MISSING) -> Any:
    """metadata[key]; ValueError naming the key when it is missing and there is no default."""
    if key in metadata:
        return metadata[key]
    if default is _MISSING:
        raise ValueError(f"GGUF metadata has no {key!r}")
    return default


def scalar(metadata: dict, key: str, default: Any = _MISSING) -> Any:
    """A per-model number; llama.cpp writes some as one value per layer, which the Transformer cannot run unless
    they are all equal."""
    value = field(metadata, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF metadata {key!r} differs between layers ({value}): not supported")
        value = value[0]
    return value


def llama_config(metadata: dict, shapes: dict[str, tuple[int, ...]], architecture: str,
                 hf_architecture: str) -> dict:
    """The Hugging Face config.json fields of a Llama-style model from the `<architecture>.*` metadata; `shapes`
    (torch order) fills what the metadata may leave out (vocabulary size, tied output layer)."""
    arch = architecture

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_head = scalar(metadata, key("attention.head_count"))
    dim = scalar(metadata, key("embedding_length"))
    head_dim = scalar(metadata, key("attention.key_length"), dim // n_head)
    rotary = scalar(metadata, key("rope.dimension_count"), head_dim)
    if rotary != head_dim:
        raise ValueError(f"GGUF {key('rope.dimension_count')}={rotary} rotates part of each head "
                         f"(head_dim {head_dim}): not supported")
    if "token_embd.weight" not in shapes:
        raise ValueError("GGUF file has no token_embd.weight")
    config = {
        "architectures": [hf_architecture],
        "hidden_size": dim,
        "num_hidden_layers": scalar(metadata, key("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": scalar(metadata, key("attention.head_count_kv"), n_head),
        "head_dim": head_dim,
        "intermediate_size": scalar(metadata, key("feed_forward_length")),
        "vocab_size": shapes["token_embd.weight"][0],
        "rms_norm_eps": scalar(metadata, key("attention.layer_norm_rms_epsilon")),
        "rope_theta": scalar(metadata, key("rope.freq_base"), 10000.0),
        "max_position_embeddings": scalar(metadata, key("context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    scaling = field(metadata, key("rope.scaling.type"), "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": scalar(metadata, key("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r} (supported: none, linear)")
    return config


def unpermute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's row order for a RoPE'd projection.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head, so its converter reorders the rows of
    q and k from Hugging Face's halves layout (x_i paired with x_{i + head_dim/2}): within each head, row
    (half h, index i) moves to 2i + h. This puts them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))
