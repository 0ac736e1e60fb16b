"""One generation request's state on the host: tokens so far, text deltas, stop conditions."""
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from ..text.detokenizer import IncrementalDetokenizer
from ..text.tokenizer import Tokenizer
from .sampling import SamplingParams


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its position (most likely first)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """What one engine step produced for one request."""
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "error" | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # Speculation so far: verify passes, tokens drafted, and how many of them the target accepted.
    draft_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when the request asked

    def followed_by(self, later: "StepOutput") -> "StepOutput":
        """This step's output and a later step's, as one."""
        return replace(later, token_ids=self.token_ids + later.token_ids, text=self.text + later.text,
                       logprobs=self.logprobs + later.logprobs)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    tokenizer: Tokenizer
    slot: int = -1
    prefilled: int = 0  # prompt tokens whose keys and values are in the slot
    cached_tokens: int = 0  # of those, copied from the prefix cache
    generated: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    draft_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    _held: str = ""  # text that may be the start of a stop string, not yet shown
    _stopped_by_string: bool = False

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequence so far; the last generated one is not yet in the KV cache."""
        return len(self.prompt_ids) + len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def count_drafts(self, drafted: int, accepted: int) -> None:
        """A verify pass checked `drafted` draft tokens of this request and accepted `accepted` of them."""
        if drafted:
            self.draft_passes += 1
            self.draft_tokens += drafted
            self.accepted_tokens += accepted

    def append(self, token_ids: list[int], max_seq_len: int, logprobs: Sequence[TokenLogprob] = ()) -> StepOutput:
        """Take newly sampled tokens (possibly several, e.g. from speculation; logprobs: theirs, if asked) and
        decide what to show."""
        new: list[int] = []
        text = ""
        for token in token_ids:
            self.generated.append(token)
            new.append(token)
            if token in self.tokenizer.stop_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
                break
            text += self._release(self._detok.push([token]))
            if self.finished:
                break
            if len(self.generated) >= self.params.max_new_tokens or self.num_tokens >= max_seq_len:
                self.finish_reason = "length"
                break
        if self.finished and not self._stopped_by_string:
            text += self._release(self._detok.flush(), final=True)
        return self._output(new, text, list(logprobs[:len(new)]))

    def fail(self) -> StepOutput:
        """End this request with finish_reason "error" (its host-side work failed; the batch goes on)."""
        self.finish_reason = "error"
        return self._output([], "", [])

    def _output(self, new: list[int], text: str, logprobs: list[TokenLogprob]) -> StepOutput:
        return StepOutput(self.request_id, new, text, self.finished, self.finish_reason,
                          len(self.prompt_ids), len(self.generated), self.cached_tokens, self.draft_passes,
                          self.draft_tokens, self.accepted_tokens, logprobs)

    def _release(self, delta: str, final: bool = False) -> str:
        """Return the text safe to show; hold back a tail that could still grow into a stop string."""
        pending = self._held + delta
        self._held = ""
        hits = [i for i in (pending.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self._stopped_by_string = True
            self.finish_reason = self.finish_reason or "stop"
            return pending[: min(hits)]
        if final:
            return pending
        hold = _partial_stop(pending, self.params.stop)
        if hold:
            self._held = pending[-hold:]
            return pending[:-hold]
        return pending


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of text that is a proper prefix of a stop string (0: none).

    Only the last len(s) - 1 characters of text can start one, and only where s's first character occurs, so
    the work is bounded by the text's length, not the stop string's: a 1 MB stop string costs what a short one
    does (checking every prefix length of it took seconds per token).
    """
    hold = 0
    for s in stops:
        start, end = max(len(text) - len(s) + 1, 0), len(text) - hold  # only tails longer than `hold`
        i = text.find(s[0], start, end)
        while i >= 0:
            if s.startswith(text[i:]):  # the longest candidate first
                hold = len(text) - i
                break
            i = text.find(s[0], i + 1, end)
    return hold
