"""What the Hugging Face architectures share: the config.json fields every decoder-only model has, and the Piece
that says where one of a checkpoint's tensors goes in our state dict."""
import re
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from ..model.args import ModelArgs

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
    # Pops both spellings (the default is evaluated first); the newer `rope_type` wins.
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("llama3", "linear"):
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: llama3, linear)")
    return float(theta), {"rope_type": kind, **params}


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
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        stop_token_ids=stop_token_ids(config, generation_config),
    )
    return ModelArgs(**{**fields, **options})
