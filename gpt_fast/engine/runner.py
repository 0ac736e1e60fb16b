"""One model's forward passes over its slot KV cache, compiled per static shape bucket.

The engine runs two kinds of call: row-aligned steps, where batch row b is slot b (decode, speculative
verification, draft proposals), and single-slot prefill chunks. The target and a draft model each get a runner.
"""
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..model.matvec import MatvecAsReduction
from ..model.transformer import Transformer

# 128 is there for the rest of a prompt after a cached prefix (a 1000-token prompt with 900 cached prefills 104).
PREFILL_BUCKETS = (16, 64, 128, 256, 1024)
# Row steps attend to a cache prefix of one of these lengths (doubling from 256 up to max_seq_len), so a short
# sequence does not read the whole static cache every step.
MIN_KV_BUCKET = 256


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def kv_buckets(max_seq_len: int) -> list[int]:
    sizes = []
    while (MIN_KV_BUCKET << len(sizes)) < max_seq_len:
        sizes.append(MIN_KV_BUCKET << len(sizes))
    return sizes + [max_seq_len]


def prefill_buckets(max_seq_len: int) -> list[int]:
    return [b for b in PREFILL_BUCKETS if b < max_seq_len] + [min(max_seq_len, PREFILL_BUCKETS[-1])]


def bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest bucket >= n."""
    return next(b for b in buckets if b >= n)


class ModelRunner:
    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, compile: bool = False,
                 vocab_size: Optional[int] = None):
        """vocab_size: the logits returned are those of ids 0..vocab_size-1 (the tokenizer's; a model may have
        padding rows beyond them, which must never be sampled); None keeps every row."""
        model.setup_caches(max_batch_size, max_seq_len)
        self.model = model.requires_grad_(False)  # compiled graphs of parameters that require grad save activations
        self.device = model.tok_embeddings.weight.device
        self.vocab_size = min(vocab_size or model.args.vocab_size, model.args.vocab_size)
        self.prefill_buckets = prefill_buckets(max_seq_len)
        self._rows, self._slot = self._rows_logits, self._slot_logits
        if compile:
            self._compile()

    # The slices are views: samplers, speculative verification and drafts simply never see the padding ids.
    def _rows_logits(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        return self.model(tokens, positions, kv_len=kv_len)[..., :self.vocab_size]

    def _slot_logits(self, tokens: Tensor, positions: Tensor, slots: Tensor, logit_index: Tensor) -> Tensor:
        return self.model(tokens, positions, slots, logit_index)[..., :self.vocab_size]

    def _compile(self) -> None:
        cuda = self.device.type == "cuda"
        # Every bucket (batch x width x cache length for row steps, prompt length for prefill) is its own static
        # graph: allow them all. torch's compiler settings are per thread, so they travel with each call (the
        # handler compiles and steps on its own engine thread).
        dynamo = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}
        # CPU: matmuls of up to 4 rows (decode of small batches) as fused reductions, not oneDNN (model/matvec.py).
        inductor = {"coordinate_descent_tuning": True} if cuda else {"post_grad_custom_pre_pass": MatvecAsReduction()}

        def with_settings(fn: Callable) -> Callable:
            def call(*args):
                with torch._dynamo.config.patch(**dynamo), torch._inductor.config.patch(**inductor):
                    return fn(*args)
            return call

        self._rows = with_settings(torch.compile(self._rows_logits, mode="reduce-overhead" if cuda else None,
                                                 fullgraph=True, dynamic=False))
        self._slot = with_settings(torch.compile(self._slot_logits, fullgraph=True, dynamic=False))

    def rows(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        """tokens, positions [B, T] for slots 0..B-1, every position below kv_len -> logits [B, T, V]."""
        return self._rows(tokens, positions, kv_len)

    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Write `tokens` (sequence positions start, start+1, ...) into `slot`, in chunks padded to a prefill
        bucket; returns the logits [1, V] after the last token."""
        chunk = self.prefill_buckets[-1]
        for offset in range(0, len(tokens), chunk):
            part = tokens[offset:offset + chunk]
            pad = bucket(self.prefill_buckets, len(part)) - len(part)
            positions = list(range(start + offset, start + offset + len(part))) + [-1] * pad
            logits = self._slot(self._tensor([part + [0] * pad]), self._tensor([positions]), self._tensor([slot]),
                                self._tensor([len(part) - 1]))
        return logits

    def warmup(self, batches: Sequence[int], widths: Sequence[int], kv_lens: Sequence[int]) -> None:
        """Compile every bucket ahead of traffic; padding-only inputs leave the cache as it is."""
        # CUDA graphs are recorded on a shape's second run: run each row-step bucket twice.
        runs = 2 if self.device.type == "cuda" else 1
        for batch in batches:
            for width in widths:
                tokens = torch.zeros(batch, width, dtype=torch.long, device=self.device)
                for kv_len in kv_lens:
                    for _ in range(runs):
                        self.rows(tokens, torch.full_like(tokens, -1), kv_len)
        for length in self.prefill_buckets:
            tokens = torch.zeros(1, length, dtype=torch.long, device=self.device)
            # Distinct slot and logit_index tensors, as real calls pass: dynamo guards on aliasing.
            self._slot(tokens, torch.full_like(tokens, -1), self._tensor([0]), self._tensor([0]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def copy_slot(self, src: int, dst: int) -> None:
        self.model.copy_slot(src, dst)

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
