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
scales of their rows, int4 codes and groups before packing for the device. Each layer knows its own split (the
`shard` methods of transformer.py, the shard_rows/shard_columns of every linear kind). Collectives are functional
(torch.distributed._functional_collectives), which torch.compile traces into the graph.

Every rank runs the same engine steps on the same requests: the all-reduced activations, hence the logits, are
identical on every rank, and so are the sampled tokens when the seeds are (shared_seed()).
"""
import os
import random
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch import Tensor

from .transformer import Transformer

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


def teardown() -> None:
    """Leave the process group before the interpreter exits. A process that exits in it can abort in gloo's worker
    threads during finalization ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489)."""
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


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
    present even when tied to the embedding. Every module with a `shard` method (attention, feed-forward) splits
    itself and gets its output all-reduced; the output layer is split by vocabulary rows and its logits gathered.
    """
    args = model.args
    check_shardable(args.n_head, args.n_kv_heads, args.intermediate_size, world)
    shard = dict(state)
    for name, module in list(model.named_modules()):
        if hasattr(module, "shard"):
            module.shard(shard, f"{name}.", rank, world)
            module.register_forward_hook(_all_reduce_output)
    vocab_rows = -(-args.vocab_size // world)  # the last rank's rows past the vocabulary are zeros
    rows = torch.arange(rank * vocab_rows, min((rank + 1) * vocab_rows, args.vocab_size))
    model.output = model.output.shard_rows(shard, "output.", rows, vocab_rows)
    model.register_forward_hook(_gather_logits)
    return shard


def _all_reduce_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def _gather_logits(model: Transformer, inputs: tuple, logits: Tensor) -> Tensor:
    gathered = _all_gather(logits.contiguous(), logits.dim() - 1, dist.group.WORLD)
    return gathered[..., :model.args.vocab_size]
