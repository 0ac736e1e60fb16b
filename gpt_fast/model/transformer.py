"""A gpt-fast style Llama-family transformer over a slot-based static KV cache.

Every token carries its own position (`positions[b, t]`, -1 for padding), so rows of one batch can be at
different lengths and advance by different amounts: prefill, decode, chunked prefill and speculative
verification are all the same forward call.

Tensor parallelism (tp.py): the attention and the feed-forward each have `shard(state, prefix, rank, world)`,
which turns the (meta) module into rank's shard and the checkpoint `state` into its slices; their outputs are then
partial sums, all-reduced. Everything else (embedding, norms, a router) stays whole on every rank.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .args import ModelArgs
from .layers import ACTIVATIONS, KVCache, Linear, apply_rope, norm, resize_, rope_tables

EXACT_TOP = 8  # logits recomputed in fp32 per row (Transformer.logits)
EXPLICIT_ATTENTION_ROWS = 8  # CPU steps of up to this many tokens per row skip SDPA (explicit_attention)


def explicit_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float,
                       cap: Optional[float] = None) -> Tensor:
    """Attention written out as matmul, softmax, matmul, for what SDPA cannot do or does slowly: logits soft-capped
    to (-cap, cap) by cap * tanh(logits / cap) before the mask (Gemma 2), and CPU steps of a few query rows, where
    SDPA's flash kernel costs ~150 us a call whatever the size (over a quarter of a SmolLM2 decode step) and these
    few ops fuse into the compiled step (on CPUs with AVX-512 BF16, model/decode_attention.cpp computes the same
    in bf16, faster). q [B, H, T, D]; keys, values [B, Hkv, K, D]; mask [B, 1, T, K]. Logits
    and softmax in fp32. The query heads that share a kv head are folded into its rows, so GQA reads each key once."""
    bsz, n_head, seqlen, head_dim = q.shape
    n_kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = n_head // n_kv_heads
    logits = (q.reshape(bsz, n_kv_heads, group * seqlen, head_dim) @ keys.transpose(-1, -2)).float() * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.view(bsz, n_kv_heads, group, seqlen, n_keys).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(values.dtype)
    return (probs.view(bsz, n_kv_heads, group * seqlen, n_keys) @ values).view(bsz, n_head, seqlen, head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        self.wqkv = Linear(args.dim, (args.n_head + 2 * args.n_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_head * args.head_dim, args.dim, bias=False)
        # Per-head norms (Qwen3) act on each head alone: whole on every tensor-parallel rank.
        self.q_norm = norm(args, args.head_dim) if args.qk_norm else None
        self.k_norm = norm(args, args.head_dim) if args.qk_norm else None
        self.scale, self.softcap = args.attn_scale, args.attn_softcap
        # Whether this layer reads the sliding-window mask (Transformer.forward builds both masks).
        self.sliding = args.sliding_window is not None and (
            args.sliding_window_layers is None or layer_id in args.sliding_window_layers)
        self.kv_cache: Optional[KVCache] = None
        self.decode_kernel = False  # CPU bf16 steps of a few rows through cpu_kernels' attention (pack decides)

    def pack(self) -> None:
        """Choose the attention of few-row CPU steps: cpu_kernels' where this CPU and the head size allow it (not with
        Gemma 2's soft-capped logits, which only explicit_attention computes)."""
        self.decode_kernel = self.softcap is None and self.head_dim % 32 == 0 and cpu_kernels.bf16_available()

    def shard(self, state: dict[str, Tensor], prefix: str, rank: int, world: int) -> None:
        """Keep n_head / world query heads and the n_kv_heads / world kv heads they read under GQA (wqkv's rows),
        and wo's input columns of those query heads."""
        q_heads, kv_heads, hd = self.n_head // world, self.n_kv_heads // world, self.head_dim
        kv_rows = _span(rank, kv_heads * hd)
        rows = torch.cat([_span(rank, q_heads * hd), self.n_head * hd + kv_rows,
                          (self.n_head + self.n_kv_heads) * hd + kv_rows])
        self.wqkv = self.wqkv.shard_rows(state, prefix + "wqkv.", rows)
        self.wo = self.wo.shard_columns(state, prefix + "wo.", rank * q_heads * hd, q_heads * hd)
        self.n_head, self.n_kv_heads = q_heads, kv_heads

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Optional[Tensor],
                write_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = self.kv_cache
        n_keys = mask.shape[-1]  # read only the cache prefix the mask covers
        if slots is None:  # decode: rows are slots 0..B-1, read in place without a copy
            cache.update(torch.arange(bsz, device=x.device), write_pos, k, v)
            keys, values = cache.k_cache[:bsz, :, :n_keys], cache.v_cache[:bsz, :, :n_keys]
        else:
            cache.update(slots, write_pos, k, v)
            keys = cache.k_cache[:, :, :n_keys].index_select(0, slots)
            values = cache.v_cache[:, :, :n_keys].index_select(0, slots)
        if self.softcap is None and (x.device.type != "cpu" or seqlen > EXPLICIT_ATTENTION_ROWS):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.n_head != self.n_kv_heads)
        elif self.decode_kernel and x.device.type == "cpu" and q.dtype == torch.bfloat16:
            y = torch.ops.gpt_fast.decode_attention(q.transpose(1, 2), keys, values, mask,
                                                    self.scale or self.head_dim ** -0.5)
        else:
            y = explicit_attention(q.transpose(1, 2), keys, values, mask, self.scale or self.head_dim ** -0.5,
                                   self.softcap)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def shard(self, state: dict[str, Tensor], prefix: str, rank: int, world: int) -> None:
        """Keep 1/world of the intermediate features: w1's and w3's rows, w2's input columns."""
        size = self.w1.out_features // world
        self.w1 = self.w1.shard_rows(state, prefix + "w1.", _span(rank, size))
        self.w3 = self.w3.shard_rows(state, prefix + "w3.", _span(rank, size))
        self.w2 = self.w2.shard_columns(state, prefix + "w2.", rank * size, size)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def _expert_weights(num_experts: int, out_features: int, in_features: int) -> nn.Parameter:
    # nn.Linear's default init, so a model built directly (not loaded) is usable like a dense one.
    bound = in_features ** -0.5
    return nn.Parameter(torch.empty(num_experts, out_features, in_features).uniform_(-bound, bound))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse mixture of experts: a router picks top_k of the experts per token, weighted by its softmax
    probabilities renormalised over the chosen ones (transformers' MixtralSparseMoeBlock).

    Experts are stacked: w1, w3 [E, I, D] and w2 [E, D, I], each expert a gated SiLU FeedForward. Tensor
    parallelism shards I like a dense FeedForward (SHARDED_DIMS) and keeps the router whole.

    Two static-shape paths, chosen by the number of tokens N (a Python decision: each compiled bucket takes one):
    - N * top_k <= E (decode at small batch): gather only the chosen experts' matrices, so batch-1 decode reads
      2 of 8 experts' bytes.
    - otherwise (prefill, large batches): run every expert over all N tokens and combine them with routing
      weights that are zero for unchosen experts. Each expert is read once instead of gathered N * top_k times;
      it costs E / top_k times the FLOPs of sparse routing, but needs no data-dependent shapes.
    """

    # The dimension of each stacked tensor that indexes intermediate features (what tensor parallelism splits).
    SHARDED_DIMS = {"w1": 1, "w3": 1, "w2": 2}

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = Linear(args.dim, args.num_experts, bias=False)
        self.w1 = _expert_weights(args.num_experts, args.intermediate_size, args.dim)
        self.w3 = _expert_weights(args.num_experts, args.intermediate_size, args.dim)
        self.w2 = _expert_weights(args.num_experts, args.dim, args.intermediate_size)

    def shard(self, state: dict[str, Tensor], prefix: str, rank: int, world: int) -> None:
        """Keep 1/world of every expert's intermediate features."""
        size = self.w1.shape[1] // world
        for name, dim in self.SHARDED_DIMS.items():
            state[prefix + name] = state[prefix + name].narrow(dim, rank * size, size).contiguous()
            resize_(self, name, state[prefix + name].shape)

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
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = MoEFeedForward(args) if args.num_experts else FeedForward(args)
        self.attention_norm = norm(args)
        self.ffn_norm = norm(args)
        # Gemma 2 normalises each sublayer's output as well as its input.
        self.post_attention_norm = norm(args) if args.post_norms else None
        self.post_ffn_norm = norm(args) if args.post_norms else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Optional[Tensor],
                write_pos: Tensor) -> Tensor:
        if self.post_attention_norm is None:
            h = x + self.attention(self.attention_norm(x), cos, sin, mask, slots, write_pos)
            return h + self.feed_forward(self.ffn_norm(h))
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, mask, slots, write_pos))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


def _run_layer(layer: TransformerBlock, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, slots: Optional[Tensor],
               write_pos: Tensor) -> Tensor:
    return layer(x, cos, sin, mask, slots, write_pos)


# Under torch.compile the layers then share one compiled graph, called once per layer (hierarchical compilation):
# compile time no longer grows with the number of layers. In eager it is a plain call.
_run_layer_compiled_once = torch.compiler.nested_compile_region(_run_layer)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = norm(args)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.compile_layers_once = False  # set by the runner that compiles the model (engine/runner.py)

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
        cos, sin = rope_tables(self.args, max_seq_len)
        self.register_buffer("rope_cos", cos.to(weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device), persistent=False)
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
        keys = self.key_positions[:kv_len]
        mask = (keys <= pos.unsqueeze(-1)).unsqueeze(1)
        window = self.args.sliding_window
        # Sliding layers see only the last `window` of those.
        window_mask = mask & (keys > pos.unsqueeze(-1) - window).unsqueeze(1) if window else None
        write_pos = torch.where(valid, positions, self.max_seq_len)
        # The residual stream is fp32 whatever the model dtype (the norms hand the layers the model dtype): its
        # 2 x n_layer additions rounded to bf16 were most of a bf16 model's distance from its fp32 logits (half of
        # it on SmolLM2, issue 13), for a few KB per token.
        x = self.tok_embeddings(tokens).float()
        if self.args.scale_embeddings:  # Gemma: by sqrt(dim) rounded to the model dtype, as transformers does
            x = x * torch.tensor(self.args.dim ** 0.5, dtype=self.tok_embeddings.weight.dtype, device=x.device)
        run_layer = _run_layer_compiled_once if self.compile_layers_once else _run_layer
        for layer in self.layers:
            x = run_layer(layer, x, cos, sin, window_mask if layer.attention.sliding else mask, slots, write_pos)
        if logit_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logit_index]
        logits = self.logits(self.norm(x))
        cap = self.args.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def logits(self, h: Tensor) -> Tensor:
        """fp32 logits of the normed hidden states h; in bf16/fp16, the EXACT_TOP largest of each row are exact.

        A bf16 logit keeps 8 significant bits (steps of 0.125 between 16 and 32), so near-ties become exact ties
        that greedy breaks by token id (SmolLM2 answered "L'..." instead of "The capital of France is Paris").
        The largest are recomputed in fp32 from the same inputs, what the matmul summed before it rounded: the
        ranking and the probabilities at the top are then those of fp32 logits, for EXACT_TOP rows of the matrix.
        Quantized output layers keep their rounded logits (their weights' error is larger).
        """
        logits = self.output(h).float()
        if h.dtype == torch.float32 or not isinstance(self.output, nn.Linear):
            return logits
        top = logits.topk(min(EXACT_TOP, logits.shape[-1]), dim=-1).indices
        exact = (self.output.weight[top].float() @ h.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, top, exact)

    def copy_slot(self, src: int, dst: int) -> None:
        """Move one request's cached keys/values to another slot (keeps active slots contiguous)."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[dst].copy_(cache.k_cache[src])
            cache.v_cache[dst].copy_(cache.v_cache[src])


def _span(rank: int, size: int) -> Tensor:
    return torch.arange(rank * size, (rank + 1) * size)
