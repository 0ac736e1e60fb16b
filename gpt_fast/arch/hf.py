"""What the Hugging Face architectures share: the config.json fields every decoder-only model has, and the Piece
that says where one of a checkpoint's tensors goes in our state dict."""
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from ..model.args import ROPE_TYPES, ModelArgs

# model.layers.N.<name within the layer>
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class Piece:
    """Our tensor `name` is `tensor`, or its part `index` of `count`: parts are concatenated along dim 0 (fused
    projections) or stacked along a new dim 0 (experts) once all have been read."""
    name: str
    tensor: Tensor
    index: int = 0
    count: int = 1
    stack: bool = False


def layer_name(name: str, args: ModelArgs) -> Optional[tuple[str, str]]:
    """("layers.N.", the name within the layer) for a weight of layer N < n_layer; None for any other name."""
    match = LAYER_RE.fullmatch(name)
    if match is None or int(match.group(1)) >= args.n_layer:
        return None
    return f"layers.{match.group(1)}.", match.group(2)


def rope(config: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling for ModelArgs or None)."""
    # transformers >= 5 writes `rope_parameters` (theta inside); hub configs mostly `rope_theta` + `rope_scaling`.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    params.pop("partial_rotary_factor", None)  # transformers 5 keeps it here; the adapters that use it read it
    # Pops both spellings (the default is evaluated first); the newer `rope_type` wins.
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "longrope":
        return float(theta), longrope(config, params)
    return float(theta), {"rope_type": kind, **params}


def longrope(config: dict, params: dict) -> dict:
    """LongRoPE's rope_scaling with everything transformers derives made explicit: the trained context
    (config.json's top-level original_max_position_embeddings wins) and the attention factor."""
    original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    if original is None:
        raise ValueError("longrope needs original_max_position_embeddings")
    factor = params.get("factor") or config["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": list(params["short_factor"]),
            "long_factor": list(params["long_factor"]), "original_max_position_embeddings": original,
            "attention_factor": attention_factor}


def sliding_window(config: dict, sliding_layers: Optional[list[int]] = None) -> dict:
    """ModelArgs' sliding_window and sliding_window_layers from config.json's sliding_window and layer_types
    (else `sliding_layers`, else every layer); none when the window is unset or spans the whole context."""
    window = config.get("sliding_window")
    n_layer = config["num_hidden_layers"]
    if "layer_types" in config and config["layer_types"] is not None:
        kinds = set(config["layer_types"]) - {"full_attention", "sliding_attention"}
        if kinds:
            raise ValueError(f"unsupported layer_types {sorted(kinds)} (supported: full_attention, "
                             "sliding_attention)")
        sliding_layers = [i for i, kind in enumerate(config["layer_types"]) if kind == "sliding_attention"]
    if sliding_layers is not None and len(sliding_layers) == n_layer:
        sliding_layers = None
    if window is None or window >= config.get("max_position_embeddings", 4096) or sliding_layers == []:
        return {}
    return {"sliding_window": window, "sliding_window_layers": sliding_layers}


def stop_token_ids(config: dict, generation_config: Optional[dict]) -> list:
    """generation_config.json's eos_token_id (an int or a list), else config.json's."""
    eos = config.get("eos_token_id")
    if generation_config and generation_config.get("eos_token_id") is not None:
        eos = generation_config["eos_token_id"]
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def model_args(config: dict, generation_config: Optional[dict], **options: Any) -> ModelArgs:
    """ModelArgs from the fields every decoder-only config.json has (Llama's names), plus family options."""
    n_head = config["num_attention_heads"]
    rope_base, rope_scaling = rope(config)
    fields = dict(
        dim=config["hidden_size"],
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_kv_heads=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        hidden_act=config.get("hidden_act", "silu"),
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        stop_token_ids=stop_token_ids(config, generation_config),
    )
    return ModelArgs(**{**fields, **options})
