"""The building blocks the Transformer is made of: RMSNorm, RoPE tables, the slot KV cache, and Linear layers that
know how to become a tensor-parallel shard of themselves (the quantized kinds in quantized.py do the same)."""
import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .args import ModelArgs


class KVCache(nn.Module):
    """Keys and values of one layer: [max_batch_size, n_kv_heads, max_seq_len + 1, head_dim].

    The extra last position is a scratch column: padding tokens write there, and no mask ever reads it.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, write_pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Write k, v ([B, T, H, D]) at (slots[b], write_pos[b, t])."""
        index = slots[:, None].expand_as(write_pos)
        self.k_cache[index, :, write_pos] = k
        self.v_cache[index, :, write_pos] = v


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, normalized in fp32 and returned in the model dtype (its
    weight's), whatever the dtype of x: the residual stream it reads is fp32 (Transformer.forward).
    unit_offset (Gemma): times (1 + weight), in fp32 before rounding, where Llama rounds and then multiplies."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        # Initialised to the identity either way.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(self.weight.dtype)
        return self.weight * xf.to(self.weight.dtype)


def norm(args: ModelArgs, dim: Optional[int] = None) -> RMSNorm:
    """The model's RMSNorm over `dim` features (default: the model dimension)."""
    return RMSNorm(dim or args.dim, args.norm_eps, args.norm_unit_offset)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def rope_inv_freq(args: ModelArgs, max_seq_len: int = 0) -> Tensor:
    """The rotation frequencies of the first rotary_dim features of a head, for a context of max_seq_len."""
    dim = args.rotary_dim or args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "longrope":
        # Phi-3 (LongRoPE): per-frequency divisors, the long set for contexts past the trained length. Decided once
        # for the context the cache serves (as vLLM does), not per sequence as transformers does: the rotation of a
        # position must not change once its key is cached (prefix cache, batching, a sequence growing past it).
        long = max_seq_len > scaling["original_max_position_embeddings"]
        inv_freq = inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq.float()


def rope_tables(args: ModelArgs, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos and sin [max_seq_len, rotary_dim] of positions 0..max_seq_len-1."""
    inv_freq = rope_inv_freq(args, max_seq_len)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    # LongRoPE scales the rotated features (so the attention logits by its square).
    scale = (args.rope_scaling or {}).get("attention_factor", 1.0)
    if scale != 1.0:
        return emb.cos() * scale, emb.sin() * scale
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, H, D] by the tables of its positions (cos, sin [B, T, 1, R]), in fp32: all D features, or
    the first R (partial rotary) with the others passed through."""
    xf = x.float()
    if cos.shape[-1] < x.shape[-1]:
        rot, rest = xf.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1).type_as(x)
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


def take(t: Tensor, dim: int, index: Tensor, size: int) -> Tensor:
    """Entries `index` of t along `dim`, zero-padded to `size` along it."""
    t = t.index_select(dim, index)
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - len(index)]
    return F.pad(t, pad) if size > len(index) else t


def resize_(module: nn.Module, name: str, shape: torch.Size) -> None:
    """Give a meta module's tensor `name` a new shape (a parameter stays a parameter, a buffer a buffer)."""
    old = getattr(module, name)
    new = torch.empty(shape, dtype=old.dtype, device="meta")
    setattr(module, name, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)


class ShardableLinear:
    """Tensor parallelism for a linear kind (a mixin): the shard's empty layer, and its slices of a state dict.

    A kind declares which dimension of each of its tensors indexes output features (ROW_DIMS), how to build an
    empty layer of another shape (resized) and how its stored input columns are sliced (slice_columns). Layers are
    on the meta device while sharding; `state` is the whole checkpoint (mmapped: only the slices taken are read).
    """
    ROW_DIMS: dict[str, int]
    in_features: int
    out_features: int

    def resized(self, in_features: int, out_features: int) -> nn.Module:
        raise NotImplementedError

    def slice_columns(self, state: dict[str, Tensor], prefix: str, start: int, size: int) -> None:
        raise NotImplementedError

    def shard_rows(self, state: dict[str, Tensor], prefix: str, rows: Tensor, size: Optional[int] = None) -> nn.Module:
        """Keep output features `rows` (zero-padded to `size`)."""
        size = size or len(rows)
        for name, dim in self.ROW_DIMS.items():
            if prefix + name in state:
                state[prefix + name] = take(state[prefix + name], dim, rows, size)
        return self.resized(self.in_features, size)

    def shard_columns(self, state: dict[str, Tensor], prefix: str, start: int, size: int) -> nn.Module:
        """Keep input features start..start+size: the layer then yields a partial sum, to be all-reduced."""
        self.slice_columns(state, prefix, start, size)
        if start and prefix + "bias" in state:
            # The bias is added once to the all-reduced sum: by the shard that holds the first inputs.
            state[prefix + "bias"] = torch.zeros_like(state[prefix + "bias"])
        return self.resized(size, self.out_features)


class Linear(ShardableLinear, nn.Linear):
    """nn.Linear (with or without bias) that can be sharded; on CPUs that have it, bf16 steps of a few rows run
    cpu_kernels' bf16 matmul (pack() decides)."""
    ROW_DIMS = {"weight": 0, "bias": 0}
    bf16_decode = False

    def pack(self) -> None:
        """Choose the kernel of few-row steps: cpu_kernels' where this CPU, the width and the dtype allow it."""
        self.bf16_decode = (self.weight.device.type == "cpu" and self.weight.dtype == torch.bfloat16
                            and self.in_features % cpu_kernels.BF16_CHUNK == 0 and self.weight.is_contiguous()
                            and cpu_kernels.bf16_available())

    def forward(self, x: Tensor) -> Tensor:
        if (self.bf16_decode and x.dtype == torch.bfloat16
                and x.numel() <= cpu_kernels.MAX_ROWS * x.shape[-1]):  # at most MAX_ROWS rows
            y = torch.ops.gpt_fast.bf16_matvec(x.reshape(-1, x.shape[-1]), self.weight)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def resized(self, in_features: int, out_features: int) -> "Linear":
        return Linear(in_features, out_features, bias=self.bias is not None, device="meta", dtype=self.weight.dtype)

    def slice_columns(self, state: dict[str, Tensor], prefix: str, start: int, size: int) -> None:
        state[prefix + "weight"] = state[prefix + "weight"][:, start:start + size].contiguous()
