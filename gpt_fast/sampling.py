"""Per-request sampling parameters and a batched sampler that never syncs with the host.

Randomness comes from a counter-based hash of (seed, position, token id) computed on the device, so a
request's tokens depend only on its own seed and params, never on what else shares its batch.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


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


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seeds: Tensor,
           positions: Tensor) -> Tensor:
    """logits [B, V] fp32; per-row temperature/top_k/top_p/seed/position [B]. Rows with temperature 0 are greedy."""
    vocab = logits.shape[-1]
    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    keep = (ranks < top_k[:, None]) | (top_k[:, None] == 0)
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token is always kept).
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # Gumbel-style trick: argmax(p / Exp(1)) is a sample from p, with no torch.multinomial host sync.
    noise = -torch.log(uniform_noise(seeds, positions, vocab))
    choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(temperature == 0, logits.argmax(dim=-1), sampled)
