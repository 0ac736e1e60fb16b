"""Architecture adapters: what one model family's checkpoints look like, mapped onto the one Transformer.

Each adapter module (llama.py, mistral.py, mixtral.py, qwen.py, gemma2.py, phi3.py) has
- `model_args(config, generation_config) -> ModelArgs`: its Hugging Face config.json (and generation_config.json)
  as ModelArgs, raising ValueError on what the Transformer cannot run;
- `weight_pieces(name, tensor, args) -> list[Piece] | None`: where one of its weight tensors goes in our state dict
  (renamed, or one part of a fused / stacked tensor); [] for tensors to drop, None for names it does not know.
Architectural differences are ModelArgs options read by the layers, never a copy of the model; adding a family is
an adapter module plus, if it needs them, new options.

An adapter that reads GGUF files (llama.cpp's format; the reader is checkpoints/gguf.py) also has
- `GGUF_ARCHITECTURE`: the `general.architecture` metadata value it reads (its key in GGUF_ARCHITECTURES);
- `gguf_config(metadata, shapes, read) -> dict`: the Hugging Face config.json the file's metadata describes
  (gguf_layout.llama_config has the common fields), so model_args reads it as it reads a Hugging Face one;
  `shapes` maps tensor names to their torch shapes, `read(name)` dequantizes one tensor (for tensors that are
  really configuration, like Llama 3.1's rope_freqs);
- `gguf_weight(name, tensor, config) -> list[(hf_name, tensor)] | None`: a GGUF tensor under its Hugging Face
  name, in Hugging Face's layout (llama: q and k rows back from llama.cpp's order), for weight_pieces; [] for
  tensors to drop, None for names it does not know.

Imports model only.
"""
from types import ModuleType
from typing import Optional

from ..model.args import ModelArgs
from . import gemma2, llama, mistral, mixtral, phi3, qwen

# Hugging Face `architectures` name -> adapter.
ARCHITECTURES: dict[str, ModuleType] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": mistral,
    "MixtralForCausalLM": mixtral,
    "Qwen2ForCausalLM": qwen,
    "Qwen3ForCausalLM": qwen,
    "Gemma2ForCausalLM": gemma2,
    "Phi3ForCausalLM": phi3,
}
# GGUF `general.architecture` -> adapter.
GGUF_ARCHITECTURES: dict[str, ModuleType] = {adapter.GGUF_ARCHITECTURE: adapter for adapter in (llama, qwen)}


def for_hf_config(config: dict) -> ModuleType:
    """The adapter for a Hugging Face config.json; ValueError naming the supported ones if there is none."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"unsupported architecture {names} (supported: {', '.join(ARCHITECTURES)})")


def model_args_from_hf(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    """A Hugging Face config.json (and generation_config.json) as ModelArgs; ValueError on anything unsupported."""
    return for_hf_config(config).model_args(config, generation_config)


def for_gguf(architecture: str) -> ModuleType:
    """The adapter for a GGUF file's `general.architecture`; ValueError naming the supported ones if there is none."""
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {architecture!r} "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[architecture]
