"""Turn a stream of generated token ids into a stream of text deltas.

Decoding token by token goes wrong two ways: a character split over several byte tokens decodes to U+FFFD until
its last byte arrives, and sentencepiece drops the leading space of the first token of every decode. So we decode a
small window (a few tokens that were already emitted, then the new ones), emit what the new tokens added, and hold
the new tokens back while their text still ends in U+FFFD.

The window starts on a character: `tokenizers`' ByteFallback decoder (Llama 2 and Mistral tokenizer.json files) turns
a whole run of byte tokens into U+FFFDs when any byte of it is invalid, so a window starting inside a character would
garble the characters after it. (For the same reason, a generated run with an invalid byte decodes to U+FFFDs as a
whole, while the stream has already shown its valid characters: the one case where the deltas differ from decode.)
"""
from typing import Sequence

from .tokenizer import Tokenizer

# Already-emitted tokens re-decoded in front of the new ones; any non-empty context fixes the leading space.
CONTEXT_TOKENS = 4
# Tokens the window may reach further back to start on a character (at most 3 bytes precede a character's last).
MAX_CHARACTER_TOKENS = 3


class IncrementalDetokenizer:
    """"".join(pushes) + flush() == decode(prompt + generated)[len(decode(prompt)):], at O(window) per push."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._keep_context(list(prompt_ids))

    def _keep_context(self, ids: list[int]) -> None:
        """Make the window the last few of `ids`, all of whose text has been emitted (or is the prompt's)."""
        start = max(len(ids) - CONTEXT_TOKENS, 0)
        text = self.tokenizer.decode(ids[start:])
        for _ in range(MAX_CHARACTER_TOKENS):
            if not text.startswith("\ufffd") or start == 0:
                break
            start -= 1
            text = self.tokenizer.decode(ids[start:])
        if not text and start > 0:
            # Only bos/eos-like tokens: they would not stop the next token's leading space being dropped.
            start, text = 0, self.tokenizer.decode(ids)
        self._ids, self._emitted = ids[start:], text

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly "" while a character is incomplete)."""
        self._ids.extend(ids)
        text = self.tokenizer.decode(self._ids)
        delta = text[len(self._emitted):]
        if delta.endswith("\ufffd"):
            return ""
        self._keep_context(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is held back, as decode would show it (an incomplete character comes out as U+FFFD)."""
        delta = self.tokenizer.decode(self._ids)[len(self._emitted):]
        self._keep_context(self._ids)
        return delta
