"""A gpt-fast style Llama-family transformer over a slot-based static KV cache.

Every token carries its own position (`positions[b, t]`, -1 for padding), so rows of one batch can be at
different lengths and advance by different amounts: prefill, decode, chunked prefill and speculative
verification are all the same forward call.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelArgs


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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
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


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Optional[Tensor],
                write_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q = (q.float() * cos + rotate_half(q.float()) * sin).type_as(x)
        k = (k.float() * cos + rotate_half(k.float()) * sin).type_as(x)
        cache = self.kv_cache
        n_keys = mask.shape[-1]  # read only the cache prefix the mask covers
        if slots is None:  # decode: rows are slots 0..B-1, read in place without a copy
            cache.update(torch.arange(bsz, device=x.device), write_pos, k, v)
            keys, values = cache.k_cache[:bsz, :, :n_keys], cache.v_cache[:bsz, :, :n_keys]
        else:
            cache.update(slots, write_pos, k, v)
            keys = cache.k_cache[:, :, :n_keys].index_select(0, slots)
            values = cache.v_cache[:, :, :n_keys].index_select(0, slots)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                           enable_gqa=self.n_head != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _expert_weights(num_experts: int, out_features: int, in_features: int) -> nn.Parameter:
    # nn.Linear's default init, so a model built directly (not loaded) is usable like a dense one.
    bound = in_features ** -0.5
    return nn.Parameter(torch.empty(num_experts, out_features, in_features).uniform_(-bound, bound))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse mixture of experts: a router picks top_k of the experts per token, weighted by its softmax
    probabilities renormalised over the chosen ones (transformers' MixtralSparseMoeBlock).

    Experts are stacked: w1, w3 [E, I, D] and w2 [E, D, I], each expert a gated SiLU FeedForward. Tensor
    parallelism shards I like a dense FeedForward (w1/w3 dim 1, w2 dim 2) and keeps the router whole.

    Two static-shape paths, chosen by the number of tokens N (a Python decision: each compiled bucket takes one):
    - N * top_k <= E (decode at small batch): gather only the chosen experts' matrices, so batch-1 decode reads
      2 of 8 experts' bytes.
    - otherwise (prefill, large batches): run every expert over all N tokens and combine them with routing
      weights that are zero for unchosen experts. Each expert is read once instead of gathered N * top_k times;
      it costs E / top_k times the FLOPs of sparse routing, but needs no data-dependent shapes.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.w1 = _expert_weights(args.num_experts, args.intermediate_size, args.dim)
        self.w3 = _expert_weights(args.num_experts, args.intermediate_size, args.dim)
        self.w2 = _expert_weights(args.num_experts, args.dim, args.intermediate_size)

    def expert_linear(self, name: str, x: Tensor, expert: int) -> Tensor:
        """x [N, in] times expert `expert`'s matrix `name` ("w1", "w2" or "w3") -> [N, out]."""
        return F.linear(x, getattr(self, name)[expert])

    def gathered_linear(self, name: str, x: Tensor, experts: Tensor) -> Tensor:
        """x [N, 1 or k, in] times the matrix `name` of each expert in experts [N, k] -> [N, k, out]."""
        return (getattr(self, name)[experts] @ x.unsqueeze(-1)).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        num_experts = self.w1.shape[0]
        if x.shape[0] * self.top_k <= num_experts:
            xk = x.unsqueeze(1)
            h = F.silu(self.gathered_linear("w1", xk, experts)) * self.gathered_linear("w3", xk, experts)
            y = torch.einsum("nkd,nk->nd", self.gathered_linear("w2", h, experts), weights)
        else:
            routing = torch.zeros(x.shape[0], num_experts, dtype=x.dtype, device=x.device)
            routing = routing.scatter(1, experts, weights)
            y = torch.zeros_like(x)
            for e in range(num_experts):
                h = F.silu(self.expert_linear("w1", x, e)) * self.expert_linear("w3", x, e)
                y = y + self.expert_linear("w2", h, e) * routing[:, e, None]
        return y.reshape(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = MoEFeedForward(args) if args.num_experts else FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Optional[Tensor],
                write_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, slots, write_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the slot KV cache and the RoPE tables for positions 0..max_seq_len-1."""
        weight = self.tok_embeddings.weight
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            attention = layer.attention  # its kv heads: a tensor-parallel rank holds only its share
            attention.kv_cache = KVCache(max_batch_size, max_seq_len, attention.n_kv_heads, attention.head_dim,
                                         weight.dtype, weight.device)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), rope_inv_freq(self.args))
        emb = torch.cat((freqs, freqs), dim=-1).to(weight.device)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.register_buffer("key_positions", torch.arange(max_seq_len + 1, device=weight.device),
                             persistent=False)

    def forward(self, tokens: Tensor, positions: Tensor, slots: Optional[Tensor] = None,
                logit_index: Optional[Tensor] = None, kv_len: Optional[int] = None) -> Tensor:
        """tokens, positions: [B, T] (position -1 marks padding). slots: [B] cache rows, or None for rows 0..B-1.
        kv_len: attend to cache positions 0..kv_len-1 only (all positions in the batch must be below it);
        None reads the whole cache.

        Returns fp32 logits [B, T, V], or [B, V] for the token at `logit_index[b]` of each row.
        """
        valid = positions >= 0
        pos = positions.clamp(min=0)
        cos = self.rope_cos[pos].unsqueeze(2)
        sin = self.rope_sin[pos].unsqueeze(2)
        # A token sees every key at a position <= its own in its row's slot (never the scratch column).
        mask = (self.key_positions[:kv_len] <= pos.unsqueeze(-1)).unsqueeze(1)
        write_pos = torch.where(valid, positions, self.max_seq_len)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slots, write_pos)
        if logit_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logit_index]
        return self.output(self.norm(x)).float()

    def copy_slot(self, src: int, dst: int) -> None:
        """Move one request's cached keys/values to another slot (keeps active slots contiguous)."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[dst].copy_(cache.k_cache[src])
            cache.v_cache[dst].copy_(cache.v_cache[src])
