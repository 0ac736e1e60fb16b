"""The tokenizer of a GGUF file, rebuilt from its metadata (tokenizer.ggml.*) as the files of a Hugging Face
tokenizer.json checkpoint: tokenizer.json (the `tokenizers` library), tokenizer_config.json (bos/eos/unk/pad tokens,
add_bos_token, chat_template) and generation_config.json (every id that ends a generation: eos, eot, eom).

Two vocabulary kinds (tokenizer.ggml.model):
- "gpt2": byte-level BPE with the file's merges, after the split rule llama.cpp names in tokenizer.ggml.pre
  (PRE_TOKENIZERS: GPT-2's, SmolLM/StarCoder's digits-apart, Llama 3's, Qwen2's), as those models' own
  tokenizer.json files do;
- "llama": sentencepiece BPE (Llama 2, Mistral, TinyLlama): the pair whose joined piece scores highest merges
  first, unknown characters fall back to byte tokens, spaces are "▁" with one prepended to the text (ids equal
  sentencepiece's; transformers' GGUF tokenizer differs on text that starts with a space).
Control tokens become special added tokens and user-defined ones plain added tokens, both matched whole. A file
that embeds its original tokenizer.json (tokenizer.huggingface.json) gets that one.
"""
import json
from typing import Optional

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..text.tokenizer import LLAMA3_PATTERN

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2() -> dict:
    return {"pre_tokenizer": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)}


def _digits_apart() -> dict:
    return {"pre_tokenizer": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])}


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _llama3() -> dict:
    # Like tiktoken, a pre-token that is itself in the vocabulary is taken whole.
    return {"pre_tokenizer": _split(LLAMA3_PATTERN), "ignore_merges": True}


def _qwen2() -> dict:
    return {"pre_tokenizer": _split(QWEN2_PATTERN), "normalizer": normalizers.NFC()}


# tokenizer.ggml.pre (llama.cpp's name for a byte-level model's split rule) -> the pieces of its tokenizer.json.
PRE_TOKENIZERS = {
    "default": _gpt2, "gpt-2": _gpt2,
    "smollm": _digits_apart, "starcoder": _digits_apart, "refact": _digits_apart,
    "llama-bpe": _llama3, "llama3": _llama3, "llama-v3": _llama3, "smaug-bpe": _llama3,
    "qwen2": _qwen2, "deepseek-r1-qwen": _qwen2,
}


def _token(metadata: dict, key: str) -> Optional[str]:
    index = metadata.get(f"tokenizer.ggml.{key}")
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice keeps its first id (the later one decodes but is never produced)."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """sentencepiece BPE's merge order: every split of an ordinary piece into two ordinary pieces, the best-scoring
    joined piece first (ties: longer left part, then longer right part, as transformers orders them)."""
    ordinary = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    found = []
    for piece, i in ordinary.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ordinary and right in ordinary:
                found.append((-scores[i], -len(left), -len(right), ordinary[left], ordinary[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _file_merges(metadata: dict) -> Optional[list[tuple[str, str]]]:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, pair in zip(merges, pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"GGUF tokenizer.ggml.merges entries are not 'left right': {bad[:5]}")
    return pairs


def build_tokenizer(metadata: dict) -> Tokenizer:
    """The tokenizer.json tokenizer the metadata describes; ValueError naming what is not supported."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    vocab = _first_ids(tokens)
    if kind == "gpt2":
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                             f"(supported: {', '.join(PRE_TOKENIZERS)})")
        parts = PRE_TOKENIZERS[pre]()
        merges = _file_merges(metadata)
        if merges is None:
            raise ValueError("GGUF byte-level tokenizer without tokenizer.ggml.merges")
        tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=parts.get("ignore_merges", False)))
        tokenizer.normalizer = parts.get("normalizer")
        tokenizer.pre_tokenizer = parts["pre_tokenizer"]
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores")
        merges = _file_merges(metadata)
        if merges is None:
            if scores is None:
                raise ValueError("GGUF sentencepiece tokenizer has neither tokenizer.ggml.scores nor merges")
            merges = _merges_from_scores(tokens, scores, types)
        unk = _token(metadata, "unknown_token_id")
        tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        # As sentencepiece and llama.cpp: "▁" before the text even when it starts with a space (a Metaspace
        # pre-tokenizer would skip it there, as transformers' LlamaTokenizer does).
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        spaces = [normalizers.Prepend("▁")] if prefix else []
        tokenizer.normalizer = normalizers.Sequence(spaces + [normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise ValueError(f"unsupported GGUF tokenizer model tokenizer.ggml.model={kind!r} (supported: gpt2, llama)")

    def whole(token_type: int) -> list[AddedToken]:
        return [AddedToken(t, special=token_type != TokenType.USER_DEFINED, normalized=False)
                for i, t in enumerate(tokens) if types[i] == token_type and vocab[t] == i]

    tokenizer.add_special_tokens(whole(TokenType.CONTROL) + whole(TokenType.UNKNOWN))
    tokenizer.add_tokens(whole(TokenType.USER_DEFINED))
    tokenizer.post_processor = _post_processor(metadata, vocab, byte_level=kind == "gpt2")
    return tokenizer


def _adds(metadata: dict, which: str) -> bool:
    # llama.cpp adds bos to a sentencepiece vocabulary that does not say otherwise.
    default = which == "bos" and metadata.get("tokenizer.ggml.model") == "llama"
    return bool(metadata.get(f"tokenizer.ggml.add_{which}_token", default))


def _post_processor(metadata: dict, vocab: dict[str, int], byte_level: bool) -> Optional[processors.PostProcessor]:
    """bos/eos around an encoded text when the metadata says to add them (what add_special_tokens=True does)."""
    bos, eos = _token(metadata, "bos_token_id"), _token(metadata, "eos_token_id")
    before = [bos] if _adds(metadata, "bos") and bos is not None else []
    after = [eos] if _adds(metadata, "eos") and eos is not None else []
    if not before and not after:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    single = [f"{t}:0" for t in before] + ["$A:0"] + [f"{t}:0" for t in after]
    pair = single + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=[(t, vocab[t]) for t in {*before, *after}])


def generation_config(metadata: dict) -> dict:
    """generation_config.json: bos and every id that ends a turn or the text (eos, eot, eom), as llama.cpp stops."""
    stop = [metadata[f"tokenizer.ggml.{key}"] for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if f"tokenizer.ggml.{key}" in metadata]
    config = {"eos_token_id": list(dict.fromkeys(stop))}
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


def tokenizer_config(metadata: dict, context_length: int) -> dict:
    """tokenizer_config.json, with the fields transformers' save_pretrained writes that a loader reads."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": context_length,
              "add_bos_token": _adds(metadata, "bos"), "add_eos_token": _adds(metadata, "eos")}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token = _token(metadata, key)
        if token is not None:
            config[name] = token
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def tokenizer_files(metadata: dict, context_length: int) -> dict[str, str]:
    """File name -> contents of the checkpoint's tokenizer files."""
    embedded = metadata.get("tokenizer.huggingface.json")
    tokenizer = Tokenizer.from_str(embedded) if embedded else build_tokenizer(metadata)
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config(metadata, context_length), indent=2,
                                            ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation_config(metadata), indent=2) + "\n",
    }
