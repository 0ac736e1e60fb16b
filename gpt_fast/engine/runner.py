"""One model's forward passes over its slot KV cache, eager or compiled.

The engine runs two kinds of call: row-aligned steps, where batch row b is slot b (decode, speculative
verification, draft proposals), and single-slot prefill chunks. The target and a draft model each get a runner.

Compiled, every batch size and step width is its own graph. How lengths are compiled depends on the device:
- CUDA (CUDA graphs need static shapes): each prompt chunk is padded to a prefill bucket and each row step attends to
  a cache prefix of a doubling length from 256, each its own graph;
- CPU: the cache length and the prompt length are dynamic sizes, so one graph serves them all, and the layers share
  one compiled graph (hierarchical compilation): compile time no longer grows with lengths and layers.
Eager, lengths are only rounded up a little (the cache prefix read to a multiple of KV_STEP).
"""
import bisect
import types
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..model.matvec import MatvecAsReduction
from ..model.transformer import Transformer

PREFILL_CHUNK = 1024  # prompt tokens per forward call at most
# 128 is there for the rest of a prompt after a cached prefix (a 1000-token prompt with 900 cached prefills 104).
CUDA_PREFILL_BUCKETS = (16, 64, 128, 256, PREFILL_CHUNK)
MIN_CUDA_KV_BUCKET = 256
KV_STEP = 64
# Compiled on CPU, prompt chunks are padded to a multiple of this: a dynamic size of 1 would be specialized (a graph
# of its own).
CPU_PREFILL_STEP = 16


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def kv_buckets(max_seq_len: int, static: bool) -> list[int]:
    """The cache prefix lengths a row step attends to (a sequence reads the smallest one that holds it)."""
    if static:
        sizes = []
        while (MIN_CUDA_KV_BUCKET << len(sizes)) < max_seq_len:
            sizes.append(MIN_CUDA_KV_BUCKET << len(sizes))
        return sizes + [max_seq_len]
    return list(range(KV_STEP, max_seq_len, KV_STEP)) + [max_seq_len]


def prefill_buckets(max_seq_len: int, static: bool, step: int = 1) -> list[int]:
    """The lengths a prompt chunk is padded to: CUDA's buckets when shapes are static, else multiples of step."""
    chunk = min(max_seq_len, PREFILL_CHUNK)
    if static:
        return [b for b in CUDA_PREFILL_BUCKETS if b < chunk] + [chunk]
    return list(range(step, chunk, step)) + [chunk]


def bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest bucket >= n."""
    return buckets[bisect.bisect_left(buckets, n)]


def _own_code(method: Callable) -> Callable:
    """The bound method on a copy of its function's code object."""
    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


class ModelRunner:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, compile: bool = False,
                 vocab_size: Optional[int] = None):
        """vocab_size: the logits returned are those of ids 0..vocab_size-1 (the tokenizer's; a model may have
        padding rows beyond them, which must never be sampled); None keeps every row."""
        model.setup_caches(max_batch_size, max_seq_len)
        self.model = model.requires_grad_(False)  # compiled graphs of parameters that require grad save activations
        self.device = model.tok_embeddings.weight.device
        self.vocab_size = min(vocab_size or model.args.vocab_size, model.args.vocab_size)
        self.static_lengths = compile and self.device.type == "cuda"
        self.dynamic_lengths = compile and not self.static_lengths
        self.kv_buckets = kv_buckets(max_seq_len, self.static_lengths)
        self.prefill_buckets = prefill_buckets(max_seq_len, self.static_lengths, CPU_PREFILL_STEP if compile else 1)
        # One prompt length needs no dynamic size (and a chunk as long as the cache is specialized to it).
        self.dynamic_prefill = self.dynamic_lengths and len(self.prefill_buckets) > 1
        self._rows, self._slot = self._rows_logits, self._slot_logits
        if compile:
            self._compile()

    # The slices are views: samplers, speculative verification and drafts simply never see the padding ids.
    def _rows_logits(self, tokens: Tensor, positions: Tensor, keys: Tensor) -> Tensor:
        return self.model(tokens, positions, kv_len=keys.shape[0])[..., :self.vocab_size]

    def _slot_logits(self, tokens: Tensor, positions: Tensor, slots: Tensor, logit_index: Tensor) -> Tensor:
        return self.model(tokens, positions, slots, logit_index)[..., :self.vocab_size]

    def _compile(self) -> None:
        cuda = self.device.type == "cuda"
        # Every batch x width (and on CUDA every length bucket) is its own graph: allow them all. torch's compiler
        # settings are per thread, so they travel with each call (the handler compiles and steps on its own engine
        # thread).
        dynamo = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}
        # CPU: matmuls of up to 4 rows (decode of small batches) as fused reductions, not oneDNN (model/matvec.py);
        # bf16 layers on CPUs with AVX-512 BF16 call their own kernel instead (model/cpu_kernels.py).
        # size_asserts off: dynamo's guards have checked every input's sizes and strides already, and the asserts
        # cost ~1 ms of a 12 ms SmolLM2 CPU step (20 checks per layer in Python).
        inductor = ({"coordinate_descent_tuning": True} if cuda else
                    {"post_grad_custom_pre_pass": MatvecAsReduction(), "size_asserts": False})
        self.model.compile_layers_once = not cuda

        def with_settings(fn: Callable) -> Callable:
            def call(*args):
                with torch._dynamo.config.patch(**dynamo), torch._inductor.config.patch(**inductor):
                    return fn(*args)
            return call

        # Guards only on the call's arguments, none on the model: it never changes once its runner exists, and
        # checking its ~300-600 parameters and modules on every call cost up to 0.9 ms of a 7 ms SmolLM2 int8 step.
        # Dynamo keeps graphs per code object, so each runner compiles its own copy of the code: without the model's
        # guards a draft's runner would otherwise run the target's graphs.
        guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        # CUDA graphs ("reduce-overhead" mode, which cannot be given with options) for the row steps only.
        self._rows = with_settings(torch.compile(_own_code(self._rows_logits), fullgraph=True, dynamic=False,
                                                 options={**guards, "triton.cudagraphs": cuda}))
        self._slot = with_settings(torch.compile(_own_code(self._slot_logits), fullgraph=True, dynamic=False,
                                                 options=guards))

    def rows(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        """tokens, positions [B, T] for slots 0..B-1, every position below kv_len -> logits [B, T, V]."""
        # The length travels as the size of a view: an int argument would be a constant of the graph.
        keys = self.model.key_positions[:kv_len]
        if self.dynamic_lengths:
            torch._dynamo.mark_dynamic(keys, 0)
        return self._rows(tokens, positions, keys)

    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Write `tokens` (sequence positions start, start+1, ...) into `slot`, in chunks padded to a prefill
        bucket; returns the logits [1, V] after the last token."""
        chunk = self.prefill_buckets[-1]
        for offset in range(0, len(tokens), chunk):
            part = tokens[offset:offset + chunk]
            pad = bucket(self.prefill_buckets, len(part)) - len(part)
            positions = list(range(start + offset, start + offset + len(part))) + [-1] * pad
            logits = self._prefill_chunk(self._tensor([part + [0] * pad]), self._tensor([positions]), slot,
                                         len(part) - 1)
        return logits

    def _prefill_chunk(self, tokens: Tensor, positions: Tensor, slot: int, last: int) -> Tensor:
        if self.dynamic_prefill:
            torch._dynamo.mark_dynamic(tokens, 1)
            torch._dynamo.mark_dynamic(positions, 1)
        # Distinct slot and logit_index tensors, as every call passes: dynamo guards on aliasing.
        return self._slot(tokens, positions, self._tensor([slot]), self._tensor([last]))

    def warmup(self, batches: Sequence[int], widths: Sequence[int], kv_lens: Sequence[int]) -> None:
        """Compile every graph ahead of traffic; padding-only inputs leave the cache as it is."""
        # CUDA graphs are recorded on a shape's second run: run each row-step bucket twice.
        runs = 2 if self.device.type == "cuda" else 1
        # With dynamic lengths one length compiles the graph that serves them all.
        kv_lens = kv_lens if self.static_lengths else kv_lens[:1]
        lengths = self.prefill_buckets if self.static_lengths else self.prefill_buckets[:1]
        for batch in batches:
            for width in widths:
                tokens = torch.zeros(batch, width, dtype=torch.long, device=self.device)
                for kv_len in kv_lens:
                    for _ in range(runs):
                        self.rows(tokens, torch.full_like(tokens, -1), kv_len)
        for length in lengths:
            tokens = torch.zeros(1, length, dtype=torch.long, device=self.device)
            self._prefill_chunk(tokens, torch.full_like(tokens, -1), 0, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def copy_slot(self, src: int, dst: int) -> None:
        self.model.copy_slot(src, dst)

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
