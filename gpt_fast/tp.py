"""Tensor parallelism over the ranks torchrun starts (one per GPU; CPU processes for tests), Megatron-style.

Each rank holds 1/N of every matrix, and all of the embedding, the norms and a mixture of experts' router:
- attention: wqkv split by heads (each rank gets n_head / N query heads and the n_kv_heads / N kv heads they
  read under GQA), wo by its input columns, then an all-reduce of the partial outputs;
- feed-forward: w1 and w3 by output rows, w2 by input columns (for a mixture of experts, every expert's
  intermediate dimension), then an all-reduce;
- output layer: vocabulary rows (padded to a multiple of N), then an all-gather of the logits. Replicated, it
  would be read whole by every rank at every step (Llama 3.1 8B on 8 GPUs: 49% more bytes per rank); sharded,
  it costs one all-gather of the [batch, vocab] logits per step.

A rank reads only its shard's bytes from the mmapped checkpoint (rows are index_select-ed, columns sliced) and
builds its layers at the shard's shape, so quantized layers are sharded in their stored form: int8 codes with the
scales of their rows, int4 codes and groups before packing for the device. Collectives are functional
(torch.distributed._functional_collectives), which torch.compile traces into the graph.

Every rank runs the same engine steps on the same requests: the all-reduced activations, hence the logits, are
identical on every rank, and so are the sampled tokens when the seeds are (shared_seed()).
"""
import os
import random
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelArgs
from .model import MoEFeedForward, Transformer
from .quantized import WeightOnlyInt4Linear, WeightOnlyInt8Linear, WeightOnlyInt8MoEFeedForward

# torch 2.13 renamed all_gather_tensor (which now warns) to all_gather_single; torch 2.11 has the old name only.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


# A gloo group for the host-side agreements below (seeds, batches, when to stop stepping): small CPU objects, kept
# off the model's collectives (and off the GPUs under nccl).
_control: Optional[dist.ProcessGroup] = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def setup(device: torch.device) -> torch.device:
    """Under torchrun with WORLD_SIZE > 1, join its process group (nccl on CUDA, gloo on CPU) and return this
    rank's device (cuda:LOCAL_RANK on CUDA); otherwise return `device` as it is."""
    global _control
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    _control = dist.new_group(backend="gloo")
    return device


def shared_seed() -> Optional[int]:
    """A random seed that is the same on every rank (rank 0's); None in a single process (the engine draws)."""
    if world_size() == 1:
        return None
    return rank0_object(random.SystemRandom().getrandbits(63))


def rank0_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable), on every rank: a collective, every rank calls it at the same point."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def rank0_flag(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank (cheaper than rank0_object)."""
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.broadcast(value, src=0, group=_control)
    return bool(value.item())


def check_shardable(n_head: int, n_kv_heads: int, intermediate_size: int, world: int) -> None:
    for name, n in (("n_head", n_head), ("n_kv_heads", n_kv_heads), ("intermediate_size", intermediate_size)):
        if n % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs every dimension it splits to be a "
                             f"multiple of {world}: n_head={n_head}, n_kv_heads={n_kv_heads}, intermediate_size="
                             f"{intermediate_size} ({name} is not; kv heads are not replicated across ranks)")


def shard_model(model: Transformer, state: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """Turn `model` (on the meta device) into this rank's shard; returns the slices of `state` it loads.

    `state` is the full checkpoint (mmapped: only the slices taken are read), with the output layer's weight
    present even when tied to the embedding.
    """
    args = model.args
    check_shardable(args.n_head, args.n_kv_heads, args.intermediate_size, world)
    head_dim, q_heads, kv_heads = args.head_dim, args.n_head // world, args.n_kv_heads // world
    q_rows = _span(rank, q_heads * head_dim)
    kv_rows = _span(rank, kv_heads * head_dim)
    qkv_rows = torch.cat([q_rows, args.n_head * head_dim + kv_rows,
                          (args.n_head + args.n_kv_heads) * head_dim + kv_rows])
    inter = args.intermediate_size // world
    ffn_rows = _span(rank, inter)
    shard = dict(state)
    for i, layer in enumerate(model.layers):
        attn, ffn, prefix = layer.attention, layer.feed_forward, f"layers.{i}."
        attn.n_head, attn.n_kv_heads = q_heads, kv_heads
        attn.wqkv = _shard_rows(attn.wqkv, shard, prefix + "attention.wqkv.", qkv_rows)
        attn.wo = _shard_columns(attn.wo, shard, prefix + "attention.wo.", rank * q_heads * head_dim,
                                 q_heads * head_dim)
        if isinstance(ffn, MoEFeedForward):
            layer.feed_forward = ffn = _shard_experts(ffn, shard, prefix + "feed_forward.", args, rank * inter, inter)
        else:
            ffn.w1 = _shard_rows(ffn.w1, shard, prefix + "feed_forward.w1.", ffn_rows)
            ffn.w3 = _shard_rows(ffn.w3, shard, prefix + "feed_forward.w3.", ffn_rows)
            ffn.w2 = _shard_columns(ffn.w2, shard, prefix + "feed_forward.w2.", rank * inter, inter)
        attn.register_forward_hook(_all_reduce_output)
        ffn.register_forward_hook(_all_reduce_output)
    vocab_rows = -(-args.vocab_size // world)  # the last rank's rows past the vocabulary are zeros
    rows = torch.arange(rank * vocab_rows, min((rank + 1) * vocab_rows, args.vocab_size))
    model.output = _shard_rows(model.output, shard, "output.", rows, vocab_rows)
    model.register_forward_hook(_gather_logits)
    return shard


def _span(rank: int, size: int) -> Tensor:
    return torch.arange(rank * size, (rank + 1) * size)


def _all_reduce_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def _gather_logits(model: Transformer, inputs: tuple, logits: Tensor) -> Tensor:
    gathered = _all_gather(logits.contiguous(), logits.dim() - 1, dist.group.WORLD)
    return gathered[..., :model.args.vocab_size]


def _take(t: Tensor, dim: int, rows: Tensor, size: int) -> Tensor:
    """Rows `rows` of t along `dim`, zero-padded to `size` along it."""
    t = t.index_select(dim, rows)
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - len(rows)]
    return F.pad(t, pad) if size > len(rows) else t


def _shard_rows(linear: nn.Module, state: dict[str, Tensor], prefix: str, rows: Tensor,
                size: Optional[int] = None) -> nn.Module:
    """Keep output features `rows` (zero-padded to `size`): the shard's empty layer; `state` gets its slices."""
    size = size or len(rows)
    if isinstance(linear, WeightOnlyInt4Linear):
        state[prefix + "weight"] = _take(state[prefix + "weight"], 0, rows, size)
        state[prefix + "scales_and_zeros"] = _take(state[prefix + "scales_and_zeros"], 1, rows, size)
    else:  # nn.Linear or WeightOnlyInt8Linear: every tensor has one row per output feature
        for name in ("weight", "scales") if isinstance(linear, WeightOnlyInt8Linear) else ("weight",):
            state[prefix + name] = _take(state[prefix + name], 0, rows, size)
    return _empty_like(linear, linear.in_features, size)


def _shard_columns(linear: nn.Module, state: dict[str, Tensor], prefix: str, start: int, size: int) -> nn.Module:
    """Keep input features start..start+size: the shard's empty layer; `state` gets its slices."""
    weight, shard = state[prefix + "weight"], _empty_like(linear, size, linear.out_features)
    if isinstance(linear, WeightOnlyInt4Linear):
        groupsize = linear.groupsize
        if start % groupsize or size % groupsize:
            raise ValueError(f"{prefix}weight: int4 groups of {groupsize} inputs do not split into shards of "
                             f"{size} inputs; quantize with a group size dividing {size}, or use int8")
        state[prefix + "weight"] = weight[:, start // 2:(start + size) // 2].contiguous()
        sz = state[prefix + "scales_and_zeros"]
        state[prefix + "scales_and_zeros"] = sz[start // groupsize:(start + size) // groupsize].contiguous()
    elif isinstance(linear, WeightOnlyInt8Linear):
        # Each output row keeps its scale: the partial sums of all ranks add up under the same scale.
        state[prefix + "weight"] = F.pad(weight[:, start:start + size], (0, shard.padded_in - size))
    else:
        state[prefix + "weight"] = weight[:, start:start + size].contiguous()
    return shard


def _shard_experts(moe: MoEFeedForward, state: dict[str, Tensor], prefix: str, args: ModelArgs, start: int,
                   size: int) -> MoEFeedForward:
    """Keep intermediate features start..start+size of every expert (w1/w3 dim 1, w2 dim 2, int8 scales with
    their rows); the router stays whole. Returns the shard's empty layer; `state` gets its slices."""
    for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
        state[prefix + name] = state[prefix + name].narrow(dim, start, size).contiguous()
    with torch.device("meta"):
        shard = MoEFeedForward(replace(args, intermediate_size=size))
    if not isinstance(moe, WeightOnlyInt8MoEFeedForward):
        return shard
    # w2's scales are per output channel: the partial sums of all ranks add up under the same scale.
    for name in ("w1_scales", "w3_scales"):
        state[prefix + name] = state[prefix + name].narrow(1, start, size).contiguous()
    return WeightOnlyInt8MoEFeedForward(shard, device="meta")


def _empty_like(linear: nn.Module, in_features: int, out_features: int) -> nn.Module:
    if isinstance(linear, WeightOnlyInt4Linear):
        return WeightOnlyInt4Linear(in_features, out_features, linear.groupsize, linear.scales_and_zeros.dtype,
                                    device="meta")
    if isinstance(linear, WeightOnlyInt8Linear):
        return WeightOnlyInt8Linear(in_features, out_features, linear.scales.dtype, device="meta")
    return nn.Linear(in_features, out_features, bias=False, device="meta", dtype=linear.weight.dtype)
