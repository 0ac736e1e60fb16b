"""Speculative decoding: a draft model or prompt lookup proposes tokens, the target verifies them in one pass.

Acceptance is the standard rejection rule (accept draft x with min(1, p(x)/q(x)); on a reject sample from
the normalised positive part of p - q; a bonus token from p when all are accepted), so the output follows the
target's distribution exactly; greedy output equals plain greedy decoding token for token. Every row of the
batch drafts and accepts its own number of tokens: positions are per row, so stale cache entries past a row's
accepted tokens are simply overwritten later and never read before that.

A row whose drafts do not pay (a pass that accepts nothing, or too few accepted tokens per pass on average for
what a pass costs) backs off: it decodes plainly for 1, 4, 16, then 64 steps, then probes with a single draft,
whose pass (2 tokens wide) costs about a plain step, and drafts k again only once a probe is accepted. The
decisions depend only on the row's own history, so a seeded request gives the same tokens whatever shares its
batch.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .request import Request
from .runner import ModelRunner, bucket
from .sampling import RowSampling, probabilities, sample, sample_from, uniform_noise

# A verify pass over k + 1 = 5 tokens costs about this many plain decode steps: 2 on CPU (BENCHMARKS.md), where
# matmuls of up to 4 rows run as fused reductions (model/matvec.py) and wider ones on oneDNN; nearer 1 on GPUs.
VERIFY_COST = 2.0
MAX_BACKOFF = 64
LOOKUP_NGRAMS = (3, 2, 1)  # longest suffix match first


class NgramIndex:
    """Where each n-gram of a growing token sequence last occurred, for prompt-lookup drafts."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` are followed by it
            for n in LOOKUP_NGRAMS:
                if end >= n:
                    self._next[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        for n in LOOKUP_NGRAMS:
            start = self._next.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if start is not None:
                return self.tokens[start:start + k]
        return []


@dataclass
class RowState:
    """One request's speculation: what the draft cache holds, its back-off, lookup index, proposals."""
    enabled: bool
    tokens_per_pass: float  # running mean of tokens one verify pass yields
    draft_cached: int = 0  # sequence positions whose keys/values the draft's cache holds
    skip: int = 0  # plain steps left before drafting again
    backoff: int = 1
    probing: bool = False  # after a back-off: draft one token until one is accepted
    lookup: Optional[NgramIndex] = None
    proposal: list[int] = field(default_factory=list)

    def record(self, accepted: int, min_tokens_per_pass: float) -> None:
        if self.probing:  # a probe says only whether drafting is worth trying again
            self.probing = accepted == 0
        else:
            self.tokens_per_pass = 0.5 * self.tokens_per_pass + 0.5 * (accepted + 1)
            self.probing = accepted == 0 or self.tokens_per_pass < min_tokens_per_pass
        if self.probing:
            self.skip, self.backoff = self.backoff, min(4 * self.backoff, MAX_BACKOFF)
        else:
            self.backoff = 1


def accept(logits: Tensor, drafts: Tensor, num_drafts: Tensor, draft_probs: Optional[Tensor],
           sampling: Optional[RowSampling]) -> tuple[Tensor, Tensor]:
    """Verify drafts against target logits.

    logits [B, K+1, V]: the target at the last token and at each draft; drafts [B, K]; num_drafts [B] (row b's
    drafts are drafts[b, :num_drafts[b]]); draft_probs [B, K, V] the distributions the drafts were drawn from,
    None for point proposals (prompt lookup); sampling None when every row is greedy. Returns tokens [B, K+1]
    and counts [B]: row b emits tokens[b, :counts[b]] (its accepted drafts, then one corrected or bonus token).
    """
    bsz, width, vocab = logits.shape
    k = width - 1
    in_row = torch.arange(k, device=logits.device) < num_drafts[:, None]
    if sampling is None:
        target = logits.argmax(dim=-1)
        accepted = ((drafts == target[:, :k]) & in_row).int().cumprod(dim=-1).sum(dim=-1)
        return target, accepted + 1
    p = probabilities(logits.reshape(-1, vocab), *sampling.repeat(width)).view(bsz, width, vocab)
    q = draft_probs if draft_probs is not None else torch.zeros_like(p[:, :k]).scatter_(-1, drafts[..., None], 1.0)
    px = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qx = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = uniform_noise(sampling.seeds, sampling.positions, k, stream=2)
    accepted = ((u * qx < px) & in_row).int().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(bsz, device=logits.device)
    position = sampling.positions + accepted
    # All drafts accepted: a bonus token drawn exactly as plain decoding draws it.
    bonus = sample(logits[rows, accepted], sampling.temperature, sampling.top_k, sampling.top_p, sampling.seeds,
                   position)
    p_at = p[rows, accepted]
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]
    residual = (p_at - q_at).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_at)
    corrected = sample_from(residual, sampling.seeds, position, stream=3)
    tokens = torch.cat([drafts, drafts[:, :1]], dim=1)
    tokens[rows, accepted] = torch.where(accepted == num_drafts, bonus, corrected)
    return tokens, accepted + 1


@dataclass
class Verified:
    """One row's outcome of a draft-and-verify step: the tokens it takes, drafts proposed, drafts accepted."""
    tokens: list[int]
    drafted: int
    accepted: int


class Speculator:
    """Drafts up to k tokens per row (a draft model's, or prompt lookup's) and verifies them in one target pass.

    It keeps each admitted request's RowState by request id until forget(); the engine appends the tokens step()
    returns, so requests never hold speculation state themselves.
    """

    def __init__(self, target: ModelRunner, draft: Optional[ModelRunner], k: int, max_seq_len: int,
                 draft_cost: float = 0.0):
        """draft None means prompt lookup. draft_cost: one draft step's cost relative to a target decode step."""
        if k < 1:
            raise ValueError(f"speculate_k must be >= 1, got {k}")
        self.target, self.draft, self.k, self.max_seq_len = target, draft, k, max_seq_len
        self.min_tokens_per_pass = VERIFY_COST + k * draft_cost
        self.rows: dict[str, RowState] = {}

    def admit(self, req: Request, enabled: bool) -> None:
        """Set up a newly prefilled request (the engine prefills the draft's slot with the target's)."""
        state = self.rows[req.request_id] = RowState(enabled=enabled, tokens_per_pass=self.k + 1.0,
                                                     draft_cached=len(req.prompt_ids))
        if enabled and self.draft is None:
            state.lookup = NgramIndex()
            state.lookup.extend(req.prompt_ids)

    def forget(self, request_id: str) -> None:
        """The request left the engine (finished or cancelled)."""
        self.rows.pop(request_id, None)

    def plan(self, reqs: list[Request]) -> list[int]:
        """How many tokens each request drafts this step (0: a plain step for it)."""
        return [self._plan(r) for r in reqs]

    def step(self, reqs: list[Request], ks: list[int], batch: int, kv_buckets: Sequence[int],
             sampling: Optional[RowSampling],
             penalize: Callable[[Tensor], Tensor] = lambda logits: logits) -> tuple[list[Verified], Tensor]:
        """One draft-and-verify step for rows 0..len(reqs)-1 (batch >= len(reqs) rows run), drafting ks[b] tokens
        for row b (from plan()); returns each request's outcome, and the target's logits [batch, width, V] (row b's
        j-th token was taken from [b, j]). sampling None: every row is greedy. penalize: adjusts the logits before
        acceptance (rows that draft nothing take one token, from [b, 0])."""
        width = self.verify_width(max(ks))
        lengths = [r.num_tokens for r in reqs]
        kv_len = bucket(kv_buckets, max(n + k for n, k in zip(lengths, ks)))  # past the last draft's position
        pad = batch - len(reqs)
        ks_pad = ks + [0] * pad
        if self.draft is not None:
            drafts, draft_probs = self._draft(reqs, ks_pad, width - 1, kv_len, sampling)
        else:
            rows = [self.rows[r.request_id].proposal[:k] + [0] * (width - 1 - k) for r, k in zip(reqs, ks)]
            drafts, draft_probs = self._tensor(rows + [[0] * (width - 1)] * pad), None
        last = self._tensor([r.generated[-1] for r in reqs] + [0] * pad)
        positions = self._positions(lengths + [0] * pad, [k + 1 for k in ks] + [0] * pad, width, first=-1)
        logits = self.target.rows(torch.cat([last[:, None], drafts], dim=1), positions, kv_len)
        tokens, counts = accept(penalize(logits), drafts, self._tensor(ks_pad), draft_probs, sampling)
        tokens, counts = tokens.tolist(), counts.tolist()  # the step's one host sync
        out = []
        for r, k, n, row, count in zip(reqs, ks, lengths, tokens, counts):
            if k:
                state = self.rows[r.request_id]
                state.record(count - 1, self.min_tokens_per_pass)
                if self.draft is not None:  # the draft cached the last token and its drafts up to the first reject
                    state.draft_cached = n + min(count - 1, k - 1)
            out.append(Verified(row[:count], drafted=k, accepted=count - 1 if k else 0))
        return out, logits

    def verify_width(self, max_drafts: int) -> int:
        """Verify passes are 2 wide (single-draft probes) or k + 1 wide: two compiled shapes per batch size."""
        return 2 if max_drafts == 1 else self.k + 1

    def observe(self, req: Request, tokens: list[int]) -> None:
        """Tokens the request just took (after stop handling), for the lookup index."""
        state = self.rows.get(req.request_id)
        if state and state.lookup is not None:
            state.lookup.extend(tokens)

    def _plan(self, req: Request) -> int:
        state = self.rows[req.request_id]
        # Every step yields one token besides the drafts; positions must stay inside the cache.
        room = min(req.params.max_new_tokens - len(req.generated) - 1, self.max_seq_len - req.num_tokens)
        if not state.enabled or room < 1:
            return 0
        if state.skip:
            state.skip -= 1
            return 0
        k = min(1 if state.probing else self.k, room)
        if state.lookup is not None:
            state.proposal = state.lookup.propose(k)
            return len(state.proposal)
        return k

    def _draft(self, reqs: list[Request], ks: list[int], steps: int, kv_len: int,
               sampling: Optional[RowSampling]) -> tuple[Tensor, Optional[Tensor]]:
        """Run the draft model `steps` steps; drafts [B, steps] and the distributions they were drawn from (None:
        greedy)."""
        lags = []
        for r, k in zip(reqs, ks):
            state = self.rows[r.request_id]
            if k and r.num_tokens - state.draft_cached > 2:  # it decoded plainly for a while: catch the draft up
                sequence = r.prompt_ids + r.generated
                self.draft.prefill(r.slot, sequence[state.draft_cached:r.num_tokens - 2], start=state.draft_cached)
                state.draft_cached = r.num_tokens - 2
            lags.append(r.num_tokens - state.draft_cached if k else 0)
        pad = len(ks) - len(reqs)
        # First step: the one or two tokens the draft has not seen (the last one always in column 1).
        firsts = [[r.generated[-2] if lag == 2 else 0, r.generated[-1]] for r, lag in zip(reqs, lags)]
        lengths = [r.num_tokens for r in reqs] + [0] * pad
        tokens = self._tensor(firsts + [[0, 0]] * pad)
        positions = self._positions(lengths, [2 if k else 0 for k in ks], 2, first=-2)
        positions[:, 0].masked_fill_(self._tensor(lags + [0] * pad) < 2, -1)
        logits = self.draft.rows(tokens, positions, kv_len)[:, 1]
        drafts, probs = [], []
        for i in range(steps):
            if i:
                position = self._positions(lengths, [int(k > i) for k in ks], 1, first=i - 1)
                logits = self.draft.rows(drafts[-1][:, None], position, kv_len)[:, 0]
            if sampling is None:
                drafts.append(logits.argmax(dim=-1))
                continue
            q = probabilities(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            drafts.append(sample_from(q, sampling.seeds, sampling.positions + i, stream=1))
            probs.append(q)
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def _positions(self, lengths: list[int], valid: list[int], width: int, first: int) -> Tensor:
        """[B, width] positions length + first + j for j < valid[b], -1 (padding) elsewhere."""
        j = torch.arange(width, device=self.target.device)
        pos = self._tensor(lengths)[:, None] + first + j
        return torch.where(j < self._tensor(valid)[:, None], pos, -1)

    def _tensor(self, values: list) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.target.device)
