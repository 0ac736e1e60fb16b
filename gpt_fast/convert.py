"""Convert a Hugging Face Llama/Mistral/Mixtral checkpoint directory into model.pth, config.json, tokenizer.model.

    python -m gpt_fast.convert HF_DIR OUT_DIR

Weights are streamed shard by shard: each tensor is renamed as it is read, q/k/v are fused into `wqkv` as soon
as a layer's three projections have all been seen (they may sit in different shards), and Mixtral's per-expert
matrices are stacked into [num_experts, ...] tensors as soon as a layer's last expert has been seen, so the
converter holds the model roughly once, never a shard and its converted copy together.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from .config import ModelArgs
from .model import Transformer
from .tokenizer import detect_kind

# Llama layout; Mixtral replaces the MLP by `block_sparse_moe` (a router `gate` and experts.M.w1/w2/w3, the
# names real checkpoints use and that transformers' save_pretrained writes).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")

_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "block_sparse_moe.gate.weight": "feed_forward.gate.weight",
}
# Position of each projection inside the fused wqkv (the model splits it as q, k, v).
_QKV_INDEX = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
# Old checkpoints saved the RoPE table as a buffer; the model recomputes it.
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _rope(config: dict) -> tuple[float, Optional[dict]]:
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


def _stop_token_ids(config: dict, generation_config: Optional[dict]) -> list:
    eos = config.get("eos_token_id")
    if generation_config and generation_config.get("eos_token_id") is not None:
        eos = generation_config["eos_token_id"]
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def model_args_from_hf(config: dict, generation_config: Optional[dict] = None) -> ModelArgs:
    """Map a Hugging Face config.json (and generation_config.json) to ModelArgs; raises on anything unsupported."""
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"unsupported architecture {archs} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported (the model has no bias terms)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r} (supported: silu)")
    n_head = config["num_attention_heads"]
    rope_base, rope_scaling = _rope(config)
    max_pos = config.get("max_position_embeddings", 4096)
    window = config.get("sliding_window")
    if window is not None and window < max_pos:
        # Within the window sliding attention equals full attention, so serving at most `window` positions
        # is exact; longer contexts would need the sliding mask this model does not implement.
        max_pos = window
    return ModelArgs(
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
        max_position_embeddings=max_pos,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        stop_token_ids=_stop_token_ids(config, generation_config),
        num_experts=config.get("num_local_experts", 0) if "MixtralForCausalLM" in archs else 0,
        num_experts_per_tok=config.get("num_experts_per_tok", 0) if "MixtralForCausalLM" in archs else 0,
    )


def find_tokenizer(hf_dir: Path) -> tuple[Path, str]:
    """Locate tokenizer.model (Llama 3 keeps its tiktoken file under original/) and tell its kind."""
    for path in (hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model"):
        if path.is_file():
            kind = detect_kind(path)
            if kind is None:
                raise ValueError(f"{path}: neither a sentencepiece model nor a tiktoken BPE file")
            return path, kind
    raise FileNotFoundError(f"no tokenizer.model in {hf_dir} or {hf_dir / 'original'} "
                            "(tokenizer.json-only checkpoints are not supported)")


def find_weight_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's weight files, preferring safetensors over .bin, sharded or single."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [hf_dir / name for name in shards]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"shard {f} listed in {index} is missing")
            return files
        if (hf_dir / single_name).is_file():
            return [hf_dir / single_name]
    raise FileNotFoundError(f"no weights in {hf_dir} (expected model.safetensors[.index.json] or "
                            "pytorch_model.bin[.index.json])")


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        while state:
            yield state.popitem()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes whole storages; a view into a shared .bin storage would drag the rest along.
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone()
    return t


def convert_weights(files: list[Path], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Stream the HF weight files into a state dict with our names, checked against the model's shapes."""
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[int, list[Optional[torch.Tensor]]] = {}
    pending_experts: dict[tuple[int, str], list[Optional[torch.Tensor]]] = {}
    for i, path in enumerate(files, 1):
        print(f"[{i}/{len(files)}] {path.name}", file=sys.stderr, flush=True)
        unknown = []
        for name, tensor in _read_shard(path):
            if _IGNORED_RE.fullmatch(name) or (name == "lm_head.weight" and args.tie_embeddings):
                continue  # a tied lm_head is a duplicate of the embeddings
            match = _LAYER_RE.fullmatch(name)
            layer = int(match.group(1)) if match else -1
            expert = _EXPERT_RE.fullmatch(match.group(2)) if match else None
            if name in _TOP_NAMES:
                out[_TOP_NAMES[name]] = _own_storage(tensor)
            elif match and layer < args.n_layer and match.group(2) in _LAYER_NAMES:
                out[f"layers.{layer}.{_LAYER_NAMES[match.group(2)]}"] = _own_storage(tensor)
            elif match and layer < args.n_layer and match.group(2) in _QKV_INDEX:
                parts = pending_qkv.setdefault(layer, [None, None, None])
                parts[_QKV_INDEX[match.group(2)]] = tensor
                if all(p is not None for p in parts):
                    out[f"layers.{layer}.attention.wqkv.weight"] = torch.cat(pending_qkv.pop(layer))
            elif expert and layer < args.n_layer and int(expert.group(1)) < args.num_experts:
                key = (layer, expert.group(2))
                parts = pending_experts.setdefault(key, [None] * args.num_experts)
                parts[int(expert.group(1))] = tensor
                if all(p is not None for p in parts):
                    out[f"layers.{layer}.feed_forward.{key[1]}"] = torch.stack(pending_experts.pop(key))
            else:
                unknown.append(name)
        if unknown:
            raise ValueError(f"{path}: unknown weight names {sorted(unknown)[:20]}"
                             f"{f' (and {len(unknown) - 20} more)' if len(unknown) > 20 else ''}")
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_embeddings:
        del expected["output.weight"]
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:20]}")
    unexpected = sorted(set(out) - set(expected))
    if unexpected:  # e.g. a dense MLP in a checkpoint whose config.json declares experts
        raise ValueError(f"weights the config.json model does not have: {unexpected[:20]}")
    for name, tensor in out.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match config.json "
                             f"(expected {tuple(expected[name].shape)})")
    return out


def convert(hf_dir: Path, out_dir: Path) -> Path:
    """Convert the HF checkpoint in hf_dir into out_dir; returns out_dir/model.pth."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {hf_dir}")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    generation_path = hf_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    args = model_args_from_hf(json.loads(config_path.read_text()), generation)
    # Find everything before the slow part so a bad directory fails at once.
    tokenizer_path, args.tokenizer = find_tokenizer(hf_dir)
    files = find_weight_files(hf_dir)

    state = convert_weights(files, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "model.pth"
    torch.save(state, weights_path)
    args.save(out_dir / "config.json")
    if tokenizer_path.resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    size_gb = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    print(f"wrote {weights_path} ({len(state)} tensors, {size_gb:.2f} GB, {args.tokenizer} tokenizer)",
          file=sys.stderr)
    return weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="where to write model.pth, config.json, tokenizer.model")
    opts = parser.parse_args()
    try:
        convert(opts.hf_dir, opts.out_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
