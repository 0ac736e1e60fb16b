"""The generation engine: slot scheduling over the static KV cache, prefill, batched decode, sampling.

Active requests always occupy slots 0..n-1 (a finished request's slot is filled by moving the last one
into it), so a decode step reads the cache prefix in place, and runs at the smallest batch bucket >= n.
One admitted request at a time is being prefilled, in slot n. While others decode, a step prefills at most
PREFILL_TOKENS_PER_STEP prompt tokens, so a long prompt joining a busy batch is prefilled in chunks between
decode steps instead of stalling every running stream for the whole prompt.
"""
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..model.args import ModelArgs
from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .prefix_cache import PrefixCache
from .request import Request, StepOutput, TokenLogprob
from .runner import ModelRunner, batch_buckets, bucket
from .sampling import RowSampling, SamplingParams, greedy_sample, penalties, sample, token_logprobs
from .speculative import Speculator

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
PREFILL_TOKENS_PER_STEP = 256
SPECULATE_MODES = ("draft", "lookup")


def default_max_seq_len(args: ModelArgs) -> int:
    """The KV cache length the CLI and the handler use unless told otherwise."""
    return min(DEFAULT_MAX_SEQ_LEN, args.max_position_embeddings)


class InvalidPromptError(ValueError):
    """A prompt the engine cannot run (the request's fault, not the engine's)."""


class PromptTooLongError(InvalidPromptError):
    pass


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    draft_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when asked


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int, max_seq_len: int,
                 compile: bool = False, seed: Optional[int] = None, prefix_cache_bytes: int = 0,
                 speculate: Optional[str] = None, speculate_k: int = 4, draft_model: Optional[Transformer] = None):
        """prefix_cache_bytes: memory for cached prompt prefixes (0: off). speculate: None, "draft" (draft_model
        proposes speculate_k tokens per step) or "lookup" (prompt lookup)."""
        if max_seq_len > model.args.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                             f"{model.args.max_position_embeddings}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = model.tok_embeddings.weight.device
        self.runner = ModelRunner(model, max_batch_size, max_seq_len, compile, tokenizer.vocab_size)
        self.decode_buckets = batch_buckets(max_batch_size)
        self.kv_buckets = self.runner.kv_buckets
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # decoding; active[i].slot == i
        self.prefilling: Optional[Request] = None  # admitted, prompt partly in its slot (len(self.active))
        self._rng = random.Random(seed)  # seeds for requests that bring none
        self.speculator = self._speculator(speculate, speculate_k, draft_model, compile)
        # Built after every model has its KV cache: the pool holds each one's keys and values.
        self.prefix_cache = None
        if prefix_cache_bytes:
            self.prefix_cache = PrefixCache([r.model for r in self._runners()], prefix_cache_bytes)

    def _speculator(self, mode: Optional[str], k: int, draft_model: Optional[Transformer],
                    compile: bool) -> Optional[Speculator]:
        if mode is None:
            return None
        if mode not in SPECULATE_MODES:
            raise ValueError(f"speculate must be one of {SPECULATE_MODES}, got {mode!r}")
        if mode == "lookup":
            return Speculator(self.runner, None, k, self.max_seq_len)
        if draft_model is None:
            raise ValueError('speculate="draft" needs a draft model')
        if draft_model.args.vocab_size != self.model.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_model.args.vocab_size} tokens) differs from the "
                             f"target's ({self.model.args.vocab_size}): they must share the tokenizer")
        draft = ModelRunner(draft_model, self.max_batch_size, self.max_seq_len, compile, self.tokenizer.vocab_size)
        cost = draft_model.args.weight_bytes(_element_size(draft_model)) / \
            self.model.args.weight_bytes(_element_size(self.model))
        return Speculator(self.runner, draft, k, self.max_seq_len, draft_cost=cost)

    def _runners(self) -> list[ModelRunner]:
        """The models whose KV caches hold each request's sequence: filled, moved and prefix-cached together."""
        draft = self.speculator.draft if self.speculator else None
        return [self.runner] + ([draft] if draft else [])

    @property
    def num_active(self) -> int:
        return len(self.active) + len(self.waiting) + (self.prefilling is not None)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it is prefilled at the next step() with a free slot."""
        if not prompt_ids:
            raise InvalidPromptError("prompt is empty")
        if not 0 <= min(prompt_ids) <= max(prompt_ids) < self.model.args.vocab_size:
            raise InvalidPromptError(f"prompt has token ids outside the model's {self.model.args.vocab_size}-row "
                                     "embedding (the tokenizer has more tokens than the model)")
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
                if self.speculator:  # penalties change each position's distribution: such requests decode plainly
                    self.speculator.admit(req, enabled=req.params.speculate and not req.params.penalized)
                tokens = self._pick([req], logits)
                outputs.append(self._append(req, tokens, self._logprobs([req], logits[:, None], [tokens])[0]))
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
                           cached_tokens=outs[-1].cached_tokens, draft_passes=outs[-1].draft_passes,
                           draft_tokens=outs[-1].draft_tokens, accepted_tokens=outs[-1].accepted_tokens,
                           logprobs=[lp for o in outs for lp in o.logprobs])
                for outs in done.values()]

    def warmup(self) -> None:
        """Compile every shape bucket ahead of traffic; padding-only inputs leave the caches as they are."""
        spec = self.speculator
        # decode, and verify of the last token + 1 (a probe) or k drafts
        widths = sorted({1, spec.verify_width(1), spec.verify_width(spec.k)}) if spec else [1]
        self.runner.warmup(self.decode_buckets, widths, self.kv_buckets)
        if spec and spec.draft:
            spec.draft.warmup(self.decode_buckets, [1, 2], self.kv_buckets)

    def _decode_step(self, reqs: list[Request]) -> list[StepOutput]:
        batch = bucket(self.decode_buckets, len(reqs))
        drafts = self.speculator.plan(reqs) if self.speculator else []
        if any(drafts):
            greedy = all(r.params.greedy for r in reqs)
            verified, logits = self.speculator.step(reqs, drafts, batch, self.kv_buckets,
                                                    None if greedy else self._sampling(reqs, batch),
                                                    lambda logits: self._penalize(reqs, logits))
            for r, v in zip(reqs, verified):
                r.count_drafts(v.drafted, v.accepted)
            new_tokens = [v.tokens for v in verified]
        else:
            tokens = [r.generated[-1] for r in reqs] + [0] * (batch - len(reqs))
            positions = [r.num_tokens - 1 for r in reqs] + [-1] * (batch - len(reqs))
            kv_len = bucket(self.kv_buckets, max(positions) + 1)
            logits = self.runner.rows(self._tensor(tokens)[:, None], self._tensor(positions)[:, None], kv_len)
            new_tokens = [[t] for t in self._pick(reqs, logits[:, 0])]
        logprobs = self._logprobs(reqs, logits, new_tokens)
        return [self._append(r, tokens, lp) for r, tokens, lp in zip(reqs, new_tokens, logprobs)]

    def _admit(self) -> bool:
        """Make sure a request is being prefilled (the next waiting one, if a slot is free); False if none."""
        if self.prefilling is None and self.waiting and len(self.active) < self.max_batch_size:
            req = self.prefilling = self.waiting.popleft()
            req.slot = len(self.active)
            if self.prefix_cache is not None:
                req.cached_tokens = req.prefilled = self.prefix_cache.load(req.prompt_ids, req.slot)
        return self.prefilling is not None

    def _prefill(self, req: Request, end: int) -> Tensor:
        """Prefill prompt tokens req.prefilled..end-1 into every model's slot; the target's logits [1, V] after
        the last one. The draft gets the prompt too, opted out of speculation or not: cached prefixes hold both."""
        tokens = req.prompt_ids[req.prefilled:end]
        for runner in self._runners()[1:]:
            runner.prefill(req.slot, tokens, start=req.prefilled)
        logits = self.runner.prefill(req.slot, tokens, start=req.prefilled)
        req.prefilled = end
        return logits

    def _append(self, req: Request, tokens: list[int], logprobs: list[TokenLogprob]) -> StepOutput:
        try:
            out = req.append(tokens, self.max_seq_len, logprobs)
        except Exception:  # a bug in one request's text or stop check ends that request, not the step
            logger.exception("request %s failed", req.request_id)
            return req.fail()
        if self.speculator:
            self.speculator.observe(req, out.token_ids)
        return out

    def _sampling(self, reqs: list[Request], rows: int) -> RowSampling:
        return RowSampling.build([r.params for r in reqs], [r.seed for r in reqs], [r.num_tokens for r in reqs],
                                 rows, self.device)

    def _pick(self, reqs: list[Request], logits: Tensor) -> list[int]:
        """Sample one token per request from logits [B >= len(reqs), V]; one host sync for the batch."""
        logits = self._penalize(reqs, logits)
        if all(r.params.greedy for r in reqs):
            return greedy_sample(logits)[: len(reqs)].tolist()
        rows = self._sampling(reqs, logits.shape[0])
        ids = sample(logits, rows.temperature, rows.top_k, rows.top_p, rows.seeds, rows.positions)
        return ids[: len(reqs)].tolist()

    def _penalize(self, reqs: list[Request], logits: Tensor) -> Tensor:
        """logits [B >= len(reqs), ..., V] less each penalized request's presence and frequency penalties."""
        rows = [i for i, r in enumerate(reqs) if r.params.penalized and r.generated]
        if not rows:
            return logits
        penalized = [reqs[i] for i in rows]
        subtract = penalties([r.generated for r in penalized], [r.params.presence_penalty for r in penalized],
                             [r.params.frequency_penalty for r in penalized], logits.shape[-1], logits.device)
        index = self._tensor(rows)
        logits = logits.clone()  # the runner's output may be a CUDA graph's buffer
        logits[index] -= subtract.view(len(rows), *[1] * (logits.dim() - 2), -1)
        return logits

    def _logprobs(self, reqs: list[Request], logits: Tensor, new_tokens: list[list[int]]) -> list[list[TokenLogprob]]:
        """The log-probabilities of each request's new tokens, for those that asked: logits [B, W, V] hold the
        distribution of row b's j-th new token at [b, j]. Costs nothing (no extra sync) when none asked."""
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if not rows:
            return [[] for _ in reqs]
        width = max(len(new_tokens[i]) for i in rows)
        tokens = self._tensor([new_tokens[i] + [0] * (width - len(new_tokens[i])) for i in rows])
        top = max(reqs[i].params.logprobs for i in rows)
        chosen, values, ids = (t.tolist() for t in token_logprobs(logits[self._tensor(rows), :width], tokens, top))
        out: list[list[TokenLogprob]] = [[] for _ in reqs]
        for a, i in enumerate(rows):
            n = reqs[i].params.logprobs
            out[i] = [TokenLogprob(token, chosen[a][j], list(zip(ids[a][j][:n], values[a][j][:n])))
                      for j, token in enumerate(new_tokens[i])]
        return out

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
        if self.speculator:
            self.speculator.forget(self.active[index].request_id)
        last = self.active.pop()
        if index < len(self.active):
            self._move_slot(last, index)
            self.active[index] = last
        if self.prefilling is not None and self.prefilling.slot > len(self.active):
            self._move_slot(self.prefilling, len(self.active))

    def _move_slot(self, req: Request, slot: int) -> None:
        for runner in self._runners():
            runner.copy_slot(req.slot, slot)
        req.slot = slot


def _element_size(model: Transformer) -> int:
    return model.tok_embeddings.weight.element_size()
