"""Mistral (MistralForCausalLM): Llama's weights, with sliding-window attention in every layer when config.json
sets `sliding_window` (Mistral 7B v0.1: 4096 of 32768 positions)."""
from typing import Any, Optional

from ..model.args import ModelArgs
from . import hf, llama

weight_pieces = llama.weight_pieces


def model_args(config: dict, generation_config: Optional[dict] = None, **options: Any) -> ModelArgs:
    return llama.model_args(config, generation_config, **hf.sliding_window(config), **options)
