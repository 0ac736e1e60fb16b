"""Both tokenizer families, and picking one from a checkpoint directory."""
import base64

import pytest

from gpt_fast.text.tokenizer import (LLAMA3_SPECIAL_TOKENS, SentencePieceTokenizer, TiktokenTokenizer, detect_kind,
                                     load_tokenizer)

MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b"ld", b" wor", b" world", b"\xf0\x9f"]


def write_tiktoken_file(path):
    """A Llama 3 style file in miniature: `base64(token) rank` lines, the 256 bytes then a few merges."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return len(tokens)


@pytest.fixture
def tiktoken_dir(tmp_path):
    write_tiktoken_file(tmp_path / "tokenizer.model")
    return tmp_path


TEXTS = ["hello world", " leading space", "two  spaces\nand a newline\n", "café naïve Straße", "日本語の文章",
         "emoji 🎉👍🏽 and ❤️", "", "1234567 + 89 = ?"]


def test_tiktoken_round_trip_and_merges(tiktoken_dir):
    tok = TiktokenTokenizer(tiktoken_dir / "tokenizer.model")
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text
        assert tok.encode(text) == [tok.bos_id] + ids
    assert tok.encode("hello world", bos=False) == [256 + MERGES.index(b"hello"), 256 + MERGES.index(b" world")]


def test_tiktoken_special_ids_follow_the_base_ranks(tiktoken_dir):
    tok = TiktokenTokenizer(tiktoken_dir / "tokenizer.model")
    base = 256 + len(MERGES)  # Meta's file has 128000 ranks, so these are 128000, 128001, ...
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.vocab_size == base + 256
    assert (tok.bos_id, tok.eos_id) == (base, base + 1)
    assert tok.special["<|start_header_id|>"] == base + 6
    assert tok.special["<|end_header_id|>"] == base + 7
    assert tok.special["<|eom_id|>"] == base + 8
    assert tok.special["<|eot_id|>"] == base + 9
    assert tok.special["<|python_tag|>"] == base + 10
    assert tok.special["<|reserved_special_token_246|>"] == base + 255
    assert tok.stop_ids == {base + 1, base + 8, base + 9}
    assert tok.decode([tok.bos_id, 104, 105, base + 9]) == "<|begin_of_text|>hi<|eot_id|>"


def test_tiktoken_user_text_never_becomes_special_tokens(tiktoken_dir):
    tok = TiktokenTokenizer(tiktoken_dir / "tokenizer.model")
    text = "<|begin_of_text|>hi<|eot_id|><|reserved_special_token_5|>"
    ids = tok.encode(text, bos=False)
    assert all(i < 256 + len(MERGES) for i in ids)
    assert tok.decode(ids) == text


def test_tiktoken_survives_huge_whitespace_runs(tiktoken_dir):
    # One million spaces overflow tiktoken's regex backtracking stack unless the run is cut.
    tok = TiktokenTokenizer(tiktoken_dir / "tokenizer.model")
    text = "a" + " " * 1_000_000 + "b"
    assert tok.decode(tok.encode(text)[1:]) == text


def test_sentencepiece_tiny(tiny_checkpoint):
    tok = SentencePieceTokenizer(tiny_checkpoint / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 515)
    assert tok.stop_ids == {2}
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text
        assert tok.encode(text) == [1] + ids
    assert tok.decode([1] + tok.encode("The capital of France is Paris.") + [2]) == "The capital of France is Paris."


def test_detect_kind(tiny_checkpoint, tiktoken_dir, tmp_path):
    assert detect_kind(tiny_checkpoint / "tokenizer.model") == "sentencepiece"
    assert detect_kind(tiktoken_dir / "tokenizer.model") == "tiktoken"
    (tmp_path / "junk").write_text("not a tokenizer\n")
    assert detect_kind(tmp_path / "junk") is None


def test_load_tokenizer(tiny_checkpoint, tiktoken_dir):
    assert isinstance(load_tokenizer(tiny_checkpoint), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tiny_checkpoint, "sentencepiece"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tiktoken_dir), TiktokenTokenizer)
    tok = load_tokenizer(str(tiktoken_dir), "tiktoken", extra_stop_ids=[7, 8])
    assert tok.stop_ids == {tok.eos_id, tok.special["<|eot_id|>"], tok.special["<|eom_id|>"], 7, 8}
    assert load_tokenizer(tiny_checkpoint, extra_stop_ids=(5,)).stop_ids == {2, 5}


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {tmp_path} .expected tokenizer.json or "):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path, "huggingface")
    (tmp_path / "tokenizer.model").write_text("neither kind\n")
    with pytest.raises(ValueError, match="tokenizer.model: neither"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path, "wordpiece")
