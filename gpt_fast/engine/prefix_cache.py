"""Automatic prefix caching: keys and values of prompt prefixes, kept in blocks, copied into a new request's slot.

A prompt is cut into blocks of BLOCK_SIZE tokens. Block i is keyed by a SHA-256 chain over the token ids of
blocks 0..i, so one key names the whole prefix up to the end of the block (the keys and values of a token
depend on every token before it); a lookup also checks each block's own ids and its parent key, so a hit
is never a hash collision. Blocks live in a pool allocated once from the memory budget, evicted least
recently used. A request that starts with cached blocks gets them copied into its slot and prefills only
the rest; at least one prompt token is always left to prefill, since its logits give the first new token.

The pool holds every cached model's keys and values (the target and a draft model fill their slots together).
"""
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..model.layers import KVCache
from ..model.transformer import Transformer

BLOCK_SIZE = 16


@dataclass
class _Block:
    row: int  # in the pool
    parent: bytes  # key of the block before it (b"" for the first)
    token_ids: tuple[int, ...]


@dataclass
class PrefixCacheStats:
    """Running totals since start, for metrics."""
    hit_blocks: int = 0
    miss_blocks: int = 0  # blocks a prompt could have reused but were not cached
    evicted_blocks: int = 0
    saved_tokens: int = 0  # prompt tokens not prefilled thanks to a hit


def block_keys(prompt_ids: list[int], n_blocks: int) -> list[bytes]:
    """Chained key of each of the first n_blocks blocks of the prompt."""
    keys, key = [], b""
    for b in range(n_blocks):
        key = hashlib.sha256(key + array("q", _block_ids(prompt_ids, b)).tobytes()).digest()
        keys.append(key)
    return keys


def _caches(model: Transformer) -> list[KVCache]:
    return [layer.attention.kv_cache for layer in model.layers]


class PrefixCache:
    """Cached prompt blocks of `models` (their KV caches must be set up), in at most budget_bytes."""

    def __init__(self, models: list[Transformer], budget_bytes: int):
        self.models = models
        per_block = sum(2 * len(m.layers) * _caches(m)[0].k_cache[0, :, :BLOCK_SIZE].nbytes for m in models)
        self.num_blocks = budget_bytes // per_block
        # Per model: [n_layer, 2 (keys, values), num_blocks, n_kv_heads, BLOCK_SIZE, head_dim].
        self.pools = []
        for m in models:
            k = _caches(m)[0].k_cache
            self.pools.append(torch.empty(len(m.layers), 2, self.num_blocks, k.shape[1], BLOCK_SIZE, k.shape[3],
                                          dtype=k.dtype, device=k.device))
        self.blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self.free = list(range(self.num_blocks))
        self.stats = PrefixCacheStats()

    def load(self, prompt_ids: list[int], slot: int) -> int:
        """Copy the longest cached prefix of the prompt into the slot; returns its length in tokens."""
        eligible = (len(prompt_ids) - 1) // BLOCK_SIZE
        keys = block_keys(prompt_ids, eligible)
        hits = 0
        while hits < eligible and self._cached(prompt_ids, keys, hits):
            hits += 1
        self.stats.hit_blocks += hits
        self.stats.miss_blocks += eligible - hits
        self.stats.saved_tokens += hits * BLOCK_SIZE
        if hits:
            self._copy(list(range(hits)), [self.blocks[key].row for key in keys[:hits]], slot, into_slot=True)
            self._touch(keys[:hits])
        return hits * BLOCK_SIZE

    def store(self, prompt_ids: list[int], slot: int) -> None:
        """Keep the prompt's whole blocks, whose keys and values are now in the slot."""
        keys = block_keys(prompt_ids, len(prompt_ids) // BLOCK_SIZE)
        chain = set(keys)
        new_blocks, new_rows = [], []
        for b, key in enumerate(keys):
            if key in self.blocks:
                if self._cached(prompt_ids, keys, b):
                    continue
                break  # another prefix under the same key: a hash collision, keep nothing further
            row = self._take_row(chain)
            if row is None:
                break
            self.blocks[key] = _Block(row, keys[b - 1] if b else b"", _block_ids(prompt_ids, b))
            new_blocks.append(b)
            new_rows.append(row)
        if new_rows:
            self._copy(new_blocks, new_rows, slot, into_slot=False)
        self._touch([key for key in keys if key in self.blocks])

    def _cached(self, prompt_ids: list[int], keys: list[bytes], b: int) -> bool:
        """Whether block b of the prompt is in the cache (its key, parent key and own ids all match)."""
        block = self.blocks.get(keys[b])
        return block is not None and block.parent == (keys[b - 1] if b else b"") and \
            block.token_ids == _block_ids(prompt_ids, b)

    def _take_row(self, keep: set[bytes]) -> Optional[int]:
        """A free pool row, evicting the least recently used block outside `keep` if needed; None if none."""
        if self.free:
            return self.free.pop()
        victim = next((key for key in self.blocks if key not in keep), None)
        if victim is None:
            return None
        self.stats.evicted_blocks += 1
        return self.blocks.pop(victim).row

    def _touch(self, keys: list[bytes]) -> None:
        # Last block first, so a shared first block is the most recently used and is evicted after its children.
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def _copy(self, block_numbers: list[int], rows: list[int], slot: int, into_slot: bool) -> None:
        """Copy blocks (by number in the slot's sequence) from the pool rows into the slot, or the other way."""
        device = self.pools[0].device
        rows_t = torch.tensor(rows, device=device)
        positions = torch.tensor([b * BLOCK_SIZE + t for b in block_numbers for t in range(BLOCK_SIZE)],
                                 device=device)
        for model, pool in zip(self.models, self.pools):
            for layer, cache in enumerate(_caches(model)):
                for kv, full in enumerate((cache.k_cache, cache.v_cache)):
                    seq = full[slot]  # [n_kv_heads, max_seq_len + 1, head_dim]
                    heads, _, dim = seq.shape
                    if into_slot:  # pool rows are [blocks, n_kv_heads, BLOCK_SIZE, head_dim]
                        blocks = pool[layer, kv].index_select(0, rows_t).transpose(0, 1)
                        seq.index_copy_(1, positions, blocks.reshape(heads, len(rows) * BLOCK_SIZE, dim))
                    else:
                        blocks = seq.index_select(1, positions).reshape(heads, len(rows), BLOCK_SIZE, dim)
                        pool[layer, kv].index_copy_(0, rows_t, blocks.transpose(0, 1))


def _block_ids(prompt_ids: list[int], b: int) -> tuple[int, ...]:
    return tuple(prompt_ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
