"""The Tokenizer interface: what the engine, the detokenizer and the request protocols need from a tokenizer."""
from typing import Optional

from .chat import ChatTemplate


class Tokenizer:
    """What the engine needs from a tokenizer: ids for bos/eos, the ids that end a generation, encode/decode.

    A prompt is plain text: the string of a special token in it is encoded as its characters, never as the id.
    """

    bos_id: Optional[int]
    eos_id: Optional[int]
    stop_ids: frozenset[int]
    vocab_size: int  # ids 0..vocab_size-1 decode; a model may have more embedding rows (padding), never emitted
    add_bos: bool = True  # whether encode() starts a prompt with bos
    chat_template: Optional[ChatTemplate] = None  # the model's own, when it has one

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        """The ids of plain text, with bos first if `bos` (default: the tokenizer's own add_bos)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, leading space included (per-token output such as logprobs)."""
        return self.decode([token_id]).encode()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The ids of `messages` ([{"role", "content"}, ...]) rendered by the model's chat template, ready for the
        assistant's reply; ValueError without a template, ChatTemplateError when the template refuses them."""
        raise ValueError("the model has no chat template (tokenizer_config.json `chat_template` or "
                         "chat_template.jinja)")
