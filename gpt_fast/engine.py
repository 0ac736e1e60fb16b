"""The generation engine: slot scheduling over the static KV cache, prefill, batched decode, sampling.

Active requests always occupy slots 0..n-1 (a finished request's slot is filled by moving the last one
into it), so a decode step reads the cache prefix in place, and runs at the smallest batch bucket >= n.
One admitted request at a time is being prefilled, in slot n. While others decode, a step prefills at most
PREFILL_TOKENS_PER_STEP prompt tokens, so a long prompt joining a busy batch is prefilled in chunks between
decode steps instead of stalling every running stream for the whole prompt.
"""
import random
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .config import ModelArgs
from .model import Transformer
from .prefix_cache import PrefixCache
from .request import Request, StepOutput
from .sampling import SamplingParams, greedy_sample, sample
from .tokenizer import Tokenizer

# 128 is there for the rest of a prompt after a cached prefix (a 1000-token prompt with 900 cached prefills 104).
PREFILL_BUCKETS = (16, 64, 128, 256, 1024)
# Decode attends to a cache prefix of one of these lengths (doubling from 256 up to max_seq_len), so a short
# sequence does not read the whole static cache every step.
MIN_KV_BUCKET = 256
PREFILL_TOKENS_PER_STEP = 256
DEFAULT_MAX_SEQ_LEN = 2048


def default_max_seq_len(args: ModelArgs) -> int:
    """The KV cache length the CLI and the handler use unless told otherwise."""
    return min(DEFAULT_MAX_SEQ_LEN, args.max_position_embeddings)


class PromptTooLongError(ValueError):
    pass


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache


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


def _bucket(buckets: Sequence[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int, max_seq_len: int,
                 compile: bool = False, seed: Optional[int] = None, prefix_cache_bytes: int = 0):
        if max_seq_len > model.args.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{model.args.max_position_embeddings}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = model.tok_embeddings.weight.device
        model.setup_caches(max_batch_size, max_seq_len)
        self.decode_buckets = batch_buckets(max_batch_size)
        self.kv_buckets = kv_buckets(max_seq_len)
        self.prefill_buckets = prefill_buckets(max_seq_len)
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # decoding; active[i].slot == i
        self.prefilling: Optional[Request] = None  # admitted, prompt partly in its slot (len(self.active))
        # Built after every cached model has its KV cache: the pool holds each one's keys and values.
        self.prefix_cache = PrefixCache(self._cached_models(), prefix_cache_bytes) if prefix_cache_bytes else None
        self._rng = random.Random(seed)  # seeds for requests that bring none
        self._decode, self._prefill_logits = self._decode_logits, model
        if compile:
            self._compile()

    def _cached_models(self) -> list[Transformer]:
        """The models whose KV caches hold each request's sequence: filled, moved and prefix-cached together."""
        return [self.model]

    def _decode_logits(self, tokens: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        return self.model(tokens, positions, kv_len=kv_len)[:, 0]

    def _compile(self) -> None:
        cuda = self.device.type == "cuda"
        # Every bucket (batch x cache length for decode, prompt length for prefill) is its own static graph:
        # allow them all. torch's compiler settings are per thread, so they travel with each call (the
        # handler compiles and steps on its own engine thread).
        dynamo = {"recompile_limit": 64, "accumulated_recompile_limit": 512}
        inductor = {"coordinate_descent_tuning": True} if cuda else {}

        def with_settings(fn):
            def call(*args):
                with torch._dynamo.config.patch(**dynamo), torch._inductor.config.patch(**inductor):
                    return fn(*args)
            return call

        self._decode = with_settings(torch.compile(self._decode_logits, mode="reduce-overhead" if cuda else None,
                                                   fullgraph=True, dynamic=False))
        # Sampling stays eager: a handful of small kernels, not worth a compile per batch bucket.
        self._prefill_logits = with_settings(torch.compile(self.model, fullgraph=True, dynamic=False))

    @property
    def num_active(self) -> int:
        return len(self.active) + len(self.waiting) + (self.prefilling is not None)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it is prefilled at the next step() with a free slot."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens but the context holds "
                                     f"{self.max_seq_len} (at most {self.max_seq_len - 1} prompt tokens)")
        in_flight = [*self.active, *self.waiting] + ([self.prefilling] if self.prefilling else [])
        if any(r.request_id == request_id for r in in_flight):
            raise ValueError(f"request id {request_id!r} is already in flight")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self.waiting.append(Request(request_id, list(prompt_ids), params, seed, self.tokenizer))

    def cancel(self, request_id: str) -> None:
        """Forget a request at once and free its slot (the client went away)."""
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        if self.prefilling is not None and self.prefilling.request_id == request_id:
            self.prefilling = None
        for i, req in enumerate(self.active):
            if req.request_id == request_id:
                self._free(i)
                return

    def step(self) -> list[StepOutput]:
        """One decode step for running requests, then prefill of admitted ones: all of it when nothing was
        decoding, else at most PREFILL_TOKENS_PER_STEP prompt tokens. A prompt prefilled to its end yields its
        first token."""
        decoding = bool(self.active)
        outputs = self._decode_step(self.active) if decoding else []
        self._retire()
        budget = PREFILL_TOKENS_PER_STEP if decoding else self.max_seq_len
        while budget > 0 and self._admit():
            req = self.prefilling
            end = min(len(req.prompt_ids), req.prefilled + budget)
            budget -= end - req.prefilled
            logits = self._prefill(req, end)
            if end == len(req.prompt_ids):
                self.prefilling = None
                self.active.append(req)
                if self.prefix_cache is not None:
                    self.prefix_cache.store(req.prompt_ids, req.slot)
                outputs.append(req.append(self._pick([req], logits), self.max_seq_len))
        self._retire()
        return outputs

    def generate(self, prompts: Sequence[list[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams]]) -> list[Completion]:
        """Run a batch of prompts to completion (offline use: CLI, tests, benchmarks)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"generate-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, per_prompt):
            self.add(rid, prompt, p)
        done: dict[str, list[StepOutput]] = {rid: [] for rid in ids}
        while self.num_active:
            for out in self.step():
                done[out.request_id].append(out)
        return [Completion(tokens=[t for o in outs for t in o.token_ids], text="".join(o.text for o in outs),
                           finish_reason=outs[-1].finish_reason, prompt_tokens=outs[-1].prompt_tokens,
                           cached_tokens=outs[-1].cached_tokens)
                for outs in done.values()]

    def warmup(self) -> None:
        """Compile every decode/prefill bucket ahead of traffic; padding-only inputs leave the cache as is."""
        # CUDA graphs are recorded on a shape's second run: run each decode bucket twice.
        runs = 2 if self.device.type == "cuda" else 1
        for batch in self.decode_buckets:
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            for kv_len in self.kv_buckets:
                for _ in range(runs):
                    self._decode(tokens, torch.full_like(tokens, -1), kv_len)
        for length in self.prefill_buckets:
            tokens = torch.zeros(1, length, dtype=torch.long, device=self.device)
            # Distinct slot and logit_index tensors, as real calls pass: dynamo guards on aliasing.
            self._prefill_logits(tokens, torch.full_like(tokens, -1), self._tensor([0]), self._tensor([0]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _decode_step(self, reqs: list[Request]) -> list[StepOutput]:
        n = len(reqs)
        batch = _bucket(self.decode_buckets, n)
        tokens = [r.generated[-1] for r in reqs] + [0] * (batch - n)
        positions = [r.num_tokens - 1 for r in reqs] + [-1] * (batch - n)
        kv_len = _bucket(self.kv_buckets, max(positions) + 1)
        logits = self._decode(self._tensor(tokens)[:, None], self._tensor(positions)[:, None], kv_len)
        next_ids = self._pick(reqs, logits)
        return [r.append([t], self.max_seq_len) for r, t in zip(reqs, next_ids)]

    def _admit(self) -> bool:
        """Make sure a request is being prefilled (the next waiting one, if a slot is free); False if none."""
        if self.prefilling is None and self.waiting and len(self.active) < self.max_batch_size:
            req = self.prefilling = self.waiting.popleft()
            req.slot = len(self.active)
            if self.prefix_cache is not None:
                req.cached_tokens = req.prefilled = self.prefix_cache.load(req.prompt_ids, req.slot)
        return self.prefilling is not None

    def _prefill(self, req: Request, end: int) -> Tensor:
        """Prefill prompt tokens req.prefilled..end-1; logits [1, V] of the last one."""
        chunk = self.prefill_buckets[-1]
        for start in range(req.prefilled, end, chunk):
            part = req.prompt_ids[start:min(start + chunk, end)]
            pad = _bucket(self.prefill_buckets, len(part)) - len(part)
            positions = list(range(start, start + len(part))) + [-1] * pad
            logits = self._prefill_logits(self._tensor([part + [0] * pad]), self._tensor([positions]),
                                          self._tensor([req.slot]), self._tensor([len(part) - 1]))
        req.prefilled = end
        return logits

    def _pick(self, reqs: list[Request], logits: Tensor) -> list[int]:
        """Sample one token per request from logits [B >= len(reqs), V]; one host sync for the batch."""
        if all(r.params.greedy for r in reqs):
            return greedy_sample(logits)[: len(reqs)].tolist()
        pad = logits.shape[0] - len(reqs)
        floats = lambda xs: torch.tensor(xs + [1.0] * pad, dtype=torch.float32, device=self.device)
        ids = sample(logits,
                     floats([0.0 if r.params.greedy else r.params.temperature for r in reqs]),
                     self._tensor([r.params.top_k for r in reqs] + [0] * pad),
                     floats([r.params.top_p for r in reqs]),
                     self._tensor([r.seed for r in reqs] + [0] * pad),
                     self._tensor([r.num_tokens for r in reqs] + [0] * pad))
        return ids[: len(reqs)].tolist()

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _retire(self) -> None:
        i = 0
        while i < len(self.active):
            if self.active[i].finished:
                self._free(i)
            else:
                i += 1

    def _free(self, index: int) -> None:
        last = self.active.pop()
        if index < len(self.active):
            self._move_slot(last, index)
            self.active[index] = last
        if self.prefilling is not None and self.prefilling.slot > len(self.active):
            self._move_slot(self.prefilling, len(self.active))

    def _move_slot(self, req: Request, slot: int) -> None:
        for model in self._cached_models():
            model.copy_slot(req.slot, slot)
        req.slot = slot
