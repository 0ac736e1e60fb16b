"""Text <-> token ids: the two families of a tokenizer.model file (sentencepiece, tiktoken), and which tokenizer a
checkpoint directory has (tokenizer.json ones: hf_tokenizer.py; the interface they share: base.py).

The rule, for a Hugging Face download and a converted checkpoint alike: tokenizer.json when the directory has one (it
is what transformers' AutoTokenizer reads, with the special tokens and chat template of tokenizer_config.json), else
tokenizer.model (sentencepiece, or Llama 3's tiktoken file, which Meta's repos keep under original/).
"""
import base64
import re
from pathlib import Path
from typing import Iterable, Optional, Union

import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .base import Tokenizer
from .hf_tokenizer import HuggingFaceTokenizer


class SentencePieceTokenizer(Tokenizer):
    """Llama 2, Mistral and the embedded tiny model."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        self.bos_id = self.processor.bos_id()
        self.eos_id = self.processor.eos_id()
        self.stop_ids = frozenset({self.eos_id})
        self.vocab_size = self.processor.vocab_size()

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        ids = self.processor.encode(text)
        return [self.bos_id] + ids if (self.add_bos if bos is None else bos) else ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.processor.id_to_piece(token_id)
        if self.processor.is_byte(token_id):  # <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.encode() if self.processor.is_control(token_id) else piece.replace("\u2581", " ").encode()


# Meta's Llama 3 split pattern and special tokens (llama-models' numbering, as in the 3.1 release).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>"
                          for i in range(NUM_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))]

# tiktoken's regex runs out of backtracking stack on whitespace runs of ~1M chars; cut runs at this length.
_MAX_WHITESPACE_RUN = 10_000
_LONG_WHITESPACE = re.compile(r"(\s{%d})" % _MAX_WHITESPACE_RUN)


class TiktokenTokenizer(Tokenizer):
    """Llama 3: byte-level BPE from the `base64 rank` lines of tokenizer.model, then 256 special tokens."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        ranks = load_tiktoken_bpe(str(self.path))
        num_base = len(ranks)  # 128000 for Meta's file; the special ids follow the base ranks
        self.special = {token: num_base + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.stop_ids = frozenset({self.eos_id, self.special["<|eot_id|>"], self.special["<|eom_id|>"]})
        self.vocab_size = num_base + NUM_SPECIAL_TOKENS

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) else []
        for piece in _LONG_WHITESPACE.split(text):
            # User text is plain text: "<|eot_id|>" typed by a user is encoded as its characters, never as the id.
            ids += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.decode_single_token_bytes(token_id)


KINDS = ("sentencepiece", "tiktoken", "huggingface")
# A "huggingface" tokenizer's files (tokenizer.json is required), as transformers' save_pretrained writes them.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def detect_kind(path: Path) -> Optional[str]:
    """The kind of a tokenizer.model: "tiktoken" (`base64 rank` lines), "sentencepiece" (a ModelProto) or None."""
    with path.open("rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and first[1].isdigit():
        try:
            base64.b64decode(first[0], validate=True)
            return "tiktoken"
        except ValueError:
            pass
    # A serialized ModelProto starts with field 1 (the pieces), length-delimited: tag byte 0x0a.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    return None


def find_tokenizer(directory: Union[str, Path]) -> tuple[Path, str]:
    """The tokenizer file of a checkpoint directory and its kind, by the rule above."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return directory / "tokenizer.json", "huggingface"
    for path in (directory / "tokenizer.model", directory / "original" / "tokenizer.model"):
        if path.is_file():
            kind = detect_kind(path)
            if kind is None:
                raise ValueError(f"{path}: neither a sentencepiece model nor a tiktoken BPE file")
            return path, kind
    raise FileNotFoundError(f"no tokenizer in {directory} (expected tokenizer.json or tokenizer.model)")


def tokenizer_files(directory: Union[str, Path]) -> list[Path]:
    """The files of a checkpoint directory's tokenizer, by the rule above: what a copy of the checkpoint takes."""
    path, kind = find_tokenizer(directory)
    if kind != "huggingface":
        return [path]
    return [p for p in (Path(directory) / name for name in HF_TOKENIZER_FILES) if p.is_file()]


def load_tokenizer(checkpoint_dir: Union[str, Path], kind: Optional[str] = None,
                   extra_stop_ids: Iterable[int] = ()) -> Tokenizer:
    """The tokenizer of a checkpoint directory; kind is config.json's `tokenizer` field, or None to find it.
    extra_stop_ids (config.json's stop_token_ids) end a generation besides the tokenizer's own."""
    directory = Path(checkpoint_dir)
    if kind is None:
        path, kind = find_tokenizer(directory)
    elif kind in KINDS:
        path = directory / ("tokenizer.json" if kind == "huggingface" else "tokenizer.model")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
    else:
        raise ValueError(f"{directory}: unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "huggingface":
        tokenizer = HuggingFaceTokenizer(directory)
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer(path)
    else:
        tokenizer = TiktokenTokenizer(path)
    tokenizer.stop_ids = tokenizer.stop_ids | frozenset(extra_stop_ids)
    return tokenizer
