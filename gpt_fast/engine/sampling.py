"""Per-request sampling parameters and a batched sampler that never syncs with the host.

Randomness comes from a counter-based hash of (seed, position, token id) computed on the device, so a
request's tokens depend only on its own seed and params, never on what else shares its batch.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


MAX_LOGPROBS = 20  # most likely tokens a request may ask for at each position (OpenAI's limit)


class InvalidParam(ValueError):
    """A request parameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    speculate: bool = True  # draft-and-verify when the engine has a speculator (output is the same either way)
    # OpenAI's penalties, over the tokens generated so far: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # hand back each token's log-probability and this many most likely tokens'

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidParam("max_new_tokens", "must be >= 1")
        if self.temperature < 0:
            raise InvalidParam("temperature", "must be >= 0")
        if not 0 <= self.top_k < 2**31:
            raise InvalidParam("top_k", "must be in [0, 2**31) (0 disables top-k)")
        if not 0 < self.top_p <= 1:
            raise InvalidParam("top_p", "must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidParam("seed", "must be in [0, 2**63)")
        if any(not s for s in self.stop):
            raise InvalidParam("stop", "stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidParam(name, "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidParam("logprobs", f"must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class RowSampling:
    """A batch's per-row sampling settings as device tensors [B]; padding rows are greedy.

    positions[b] is the index in its sequence of the token being sampled: it keys the random draws.
    """
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    seeds: Tensor
    positions: Tensor

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int], rows: int,
              device: Union[str, torch.device]) -> "RowSampling":
        pad = rows - len(params)
        floats = lambda xs, fill: torch.tensor(list(xs) + [fill] * pad, dtype=torch.float32, device=device)
        longs = lambda xs: torch.tensor(list(xs) + [0] * pad, dtype=torch.long, device=device)
        return cls(temperature=floats((0.0 if p.greedy else p.temperature for p in params), 0.0),
                   top_k=longs(p.top_k for p in params), top_p=floats((p.top_p for p in params), 1.0),
                   seeds=longs(seeds), positions=longs(positions))

    def repeat(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(temperature, top_k, top_p) with every row repeated n times, for n logits per row."""
        return tuple(t.repeat_interleave(n) for t in (self.temperature, self.top_k, self.top_p))


_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer on int64 tensors (every product stays below 2**63, so nothing overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: Tensor, positions: Tensor, n: int, stream: int = 0) -> Tensor:
    """Uniforms in (0, 1), shape [B, n], a pure function of (seed, position, stream, column)."""
    key = _hash32((seeds ^ (seeds >> 32)) & _MASK32) ^ _hash32((positions * 4 + stream) & _MASK32)
    cols = torch.arange(n, device=seeds.device)
    bits = _hash32((_hash32(key[:, None] & _MASK32) + cols * 0x9E3779B) & _MASK32)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def greedy_sample(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1)


def _sorted_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """The temperature/top-k/top-p distribution of each row, over tokens sorted by logit: (probs, token order)."""
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    keep = (ranks < top_k[:, None]) | (top_k[:, None] == 0)
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token is always kept).
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    return torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1), order


def _exponential_argmax(probs: Tensor, seeds: Tensor, positions: Tensor, stream: int) -> Tensor:
    # argmax(p / Exp(1)) is a sample from p (p need not be normalised), with no torch.multinomial host sync.
    noise = -torch.log(uniform_noise(seeds, positions, probs.shape[-1], stream))
    return torch.argmax(probs / noise, dim=-1)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor,
           positions: Tensor) -> Tensor:
    """logits [B, V] fp32; per-row temperature/top_k/top_p/seed/position [B]. Rows with temperature 0 are greedy."""
    probs, order = _sorted_probs(logits, temperature, top_k, top_p)
    choice = _exponential_argmax(probs, seeds, positions, stream=0)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled)


def probabilities(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """The distribution `sample` draws from, [B, V] in vocabulary order; one-hot on the argmax for temperature 0."""
    probs, order = _sorted_probs(logits, temperature, top_k, top_p)
    probs = torch.zeros_like(probs).scatter_(-1, order, probs)
    greedy = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where((temperature == 0)[:, None], greedy, probs)


def sample_from(probs: Tensor, seeds: Tensor, positions: Tensor, stream: int) -> Tensor:
    """One token per row of (possibly unnormalised) probabilities [B, V]; `stream` keeps draws independent."""
    return _exponential_argmax(probs, seeds, positions, stream)


def penalties(generated: Sequence[Sequence[int]], presence: Sequence[float], frequency: Sequence[float],
              vocab_size: int, device: Union[str, torch.device]) -> Tensor:
    """[N, V] to subtract from N rows of logits: frequency * count + presence * (count > 0) of each token in the
    row's generated tokens. Built on the device from the token ids alone, so no per-request state moves with slots."""
    longest = max(1, max(len(g) for g in generated))
    ids = torch.tensor([list(g) + [0] * (longest - len(g)) for g in generated], dtype=torch.long, device=device)
    real = torch.tensor([[1.0] * len(g) + [0.0] * (longest - len(g)) for g in generated], device=device)
    counts = torch.zeros(len(generated), vocab_size, device=device).scatter_add_(1, ids, real)
    as_column = lambda xs: torch.tensor(list(xs), dtype=torch.float32, device=device)[:, None]
    return as_column(frequency) * counts + as_column(presence) * (counts > 0)


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits [..., V], tokens [...]: log p(token) [...] and the `top` most likely tokens' log-probabilities and
    ids [..., top], under the model's own distribution (before temperature, top-k/top-p and penalties)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(top, dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1), values, ids
