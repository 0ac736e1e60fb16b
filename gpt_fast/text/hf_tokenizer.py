"""Hugging Face tokenizer.json checkpoints (the `tokenizers` library): byte-level BPE (GPT-2, SmolLM, Qwen, Llama 3)
and sentencepiece-style Metaspace/byte-fallback BPE (Llama 2, Mistral), with added and special tokens.

The directory holds tokenizer.json, tokenizer_config.json (bos_token, eos_token, add_bos_token, chat_template), an
optional chat_template.jinja and generation_config.json, as transformers' save_pretrained writes them; they are read
as transformers' AutoTokenizer reads them (its generic tokenizer.json path), so the ids are AutoTokenizer's:

- a prompt is plain text: a special token's string in it is its characters (transformers' split_special_tokens=True);
  bos is added when tokenizer_config.json's add_bos_token says so (transformers 4's rule, and llama.cpp's for a
  GGUF's add_bos_token), or, without it, when tokenizer.json's post-processor adds it (transformers 5 reads only
  the post-processor; real checkpoints agree on both). An eos the post-processor would append is not: a prompt to
  continue does not end its text;
- a chat is rendered by the model's template and its special tokens are ids, but a special token's string typed
  inside a message is text (apply_chat_template(..., sanitize_control_tokens=True));
- decoding skips special tokens and does not clean up spaces (clean_up_tokenization_spaces would make a text delta
  depend on the tokens after it).
"""
import json
import re
import threading
from pathlib import Path
from typing import Any, Optional, Union

import tokenizers
from tokenizers import AddedToken, decoders

from .base import Tokenizer
from .chat import ChatTemplate, template_source

# tokenizer_config.json's named special tokens (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Private-use characters wrapped around special tokens' strings typed in messages (transformers' markers).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in a token's string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


BYTE_LEVEL_CHARS = _byte_level_chars()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-F]{2})>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _token_string(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(generation_config: dict) -> list[int]:
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, checkpoint_dir: Union[str, Path]):
        directory = Path(checkpoint_dir)
        self.path = directory / "tokenizer.json"
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise ValueError(f"{self.path}: not a tokenizer.json the tokenizers library reads ({e})") from None
        config = _read_json(directory / "tokenizer_config.json")
        names = {name: _token_string(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self.special_tokens = {name: token for name, token in names.items() if token is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = extra.values() if isinstance(extra, dict) else extra
        # As transformers does: every named special token is a special added token of the backend.
        named = [*self.special_tokens.values(), *filter(None, map(_token_string, extra))]
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        self.bos_id = self._id(names["bos_token"])
        self.eos_id = self._id(names["eos_token"])
        self.add_bos = self.bos_id is not None and self._adds_bos(config)
        stop = [self.eos_id] + _eos_ids(_read_json(directory / "generation_config.json"))
        self.stop_ids = frozenset(i for i in stop if i is not None)
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        self._added_ids = frozenset(self.backend.get_added_tokens_decoder())
        # encode_special_tokens is the backend's switch between a prompt's rule and a chat's.
        self._lock = threading.Lock()

        source = template_source(directory, config)
        if source is not None:
            self.chat_template = ChatTemplate(source[0], self.special_tokens, origin=source[1])
            added = self.backend.get_added_tokens_decoder().values()
            listed = set(config.get("chat_control_tokens") or ())
            literal = self.chat_template.literal_text() if not listed else ""
            # transformers' control tokens: the special ones and the added tokens the template itself writes.
            control = sorted((t.content for t in added if t.special or t.content in listed
                              or (t.content in literal and not t.content.isspace())), key=len, reverse=True)
            self._control = re.compile("|".join(map(re.escape, control)) or "(?!)")
            self._marked = re.compile(f"{MARK_START}({self._control.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def _adds_bos(self, config: dict) -> bool:
        if "add_bos_token" in config:
            return bool(config["add_bos_token"])
        return self.backend.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        ids = self._encode(text, special_tokens=False)
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        token = self.backend.id_to_token(token_id) or ""
        if token_id in self._added_ids:  # added tokens are their own text
            return token.encode()
        if isinstance(self.backend.decoder, decoders.ByteLevel):
            return bytes(BYTE_LEVEL_CHARS[c] for c in token)
        byte = BYTE_FALLBACK.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode()

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The ids of `messages` rendered by the chat template with the assistant's header last (no bos beyond
        what the template writes, as apply_chat_template)."""
        if self.chat_template is None:
            return super().encode_chat(messages)
        text = self.chat_template.render([self._mark(m) for m in messages], add_generation_prompt=True)
        # Split on the marks: [text, marked token, text, marked token, ..., text], None for a lone mark.
        pieces = self._marked.split(text)
        newline = self._encode("\n", special_tokens=True)
        ids = self._encode(pieces[0], special_tokens=True)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            typed = i % 2 == 1
            # After a newline, so a sentencepiece-style tokenizer adds no prefix space mid-text; then drop it.
            piece_ids = self._encode_piece("\n" + piece, typed)
            piece_ids = piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else \
                self._encode_piece(piece, typed)
            if typed and self.backend.token_to_id(piece) in piece_ids:
                raise ValueError(f"cannot encode {piece!r} typed in a message as text: the tokenizer makes it the "
                                 "special token")
            ids += piece_ids
        return ids

    def _mark(self, value: Any) -> Any:
        """Wrap the special tokens' strings in the strings of a message in marks (dropping marks typed there)."""
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self._control.sub(f"{MARK_START}\\g<0>{MARK_END}", value)
        if isinstance(value, dict):
            return {key: self._mark(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._mark(item) for item in value]
        return value

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        """special_tokens: a special token's string is its id (else its characters); no post-processing."""
        with self._lock:
            self.backend.encode_special_tokens = not special_tokens
            return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_piece(self, text: str, typed: bool) -> list[int]:
        if not typed:
            return self._encode(text, special_tokens=True)
        # A special token's string typed by the user: the pipeline without any added tokens.
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [token.id for split in splits for token in backend.model.tokenize(split)]
