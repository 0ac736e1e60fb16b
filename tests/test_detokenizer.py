"""Streamed deltas must add up to the full decode, hold back split characters and keep leading spaces."""
import random

import pytest
from hf_tokenizers import byte_level, llama2_legacy, metaspace
from test_tokenizer import write_tiktoken_file

from gpt_fast.text.detokenizer import IncrementalDetokenizer
from gpt_fast.text.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def sp(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def tt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken")
    write_tiktoken_file(path / "tokenizer.model")
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def bl(tmp_path_factory):
    return load_tokenizer(byte_level(tmp_path_factory.mktemp("byte_level")))


@pytest.fixture(scope="module")
def ms(tmp_path_factory):
    return load_tokenizer(metaspace(tmp_path_factory.mktemp("metaspace")))


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    return load_tokenizer(llama2_legacy(tmp_path_factory.mktemp("llama2_legacy")))


ALL = ["sp", "tt", "bl", "ms", "legacy"]


def stream(tokenizer, generated, prompt=(), chunk=1):
    """The deltas of pushing `generated` `chunk` ids at a time, then the flush."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(generated[i:i + chunk]) for i in range(0, len(generated), chunk)]
    return deltas + [detok.flush()]


def expected(tokenizer, generated, prompt=()):
    return tokenizer.decode(list(prompt) + list(generated))[len(tokenizer.decode(list(prompt))):]


ENGLISH = " The capital of France is Paris.  Two  spaces,\na newline and 123 digits."
MULTIBYTE = "日本語 🎉👍 café, naïve ❤️ 한국어 end"


@pytest.mark.parametrize("name", ALL)
def test_english_keeps_leading_spaces(name, request):
    tok = request.getfixturevalue(name)
    prompt = tok.encode("Q: where?")
    generated = tok.encode(ENGLISH, bos=False)
    for chunk in (1, 2, 5):
        assert "".join(stream(tok, generated, prompt, chunk)) == expected(tok, generated, prompt)
        assert "".join(stream(tok, generated, chunk=chunk)) == tok.decode(generated)
    prompt = tok.encode("The capital of France is")
    full = tok.encode("The capital of France is Paris is big")
    assert full[:len(prompt)] == prompt
    deltas = stream(tok, full[len(prompt):], prompt)
    assert "".join(deltas) == " Paris is big"
    assert deltas[0].startswith(" ")  # sentencepiece alone would decode the first token without its space


@pytest.mark.parametrize("name", ALL)
def test_multibyte_characters_come_out_whole(name, request):
    tok = request.getfixturevalue(name)
    generated = tok.encode(MULTIBYTE, bos=False)
    assert len(generated) > len(MULTIBYTE.encode()) // 2  # mostly byte tokens: characters are split
    for prompt in ((), tok.encode("Say:")):
        deltas = stream(tok, generated, prompt)
        assert "".join(deltas) == expected(tok, generated, prompt)
        assert not any("\ufffd" in d for d in deltas)
        assert "🎉" in deltas and "日" in deltas


def test_sentencepiece_splits_emoji_into_byte_tokens(sp, tiny_checkpoint):
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    ids = sp.encode("🎉", bos=False)
    assert sum(processor.is_byte(i) for i in ids) == 4


def test_incomplete_character_at_the_end_is_flushed_like_decode(sp):
    generated = sp.encode("ok 🎉", bos=False)[:-2]  # cut the emoji's last two bytes
    detok = IncrementalDetokenizer(sp)
    pushed = "".join(detok.push([i]) for i in generated)
    assert "\ufffd" not in pushed
    tail = detok.flush()
    assert tail.endswith("\ufffd") and pushed + tail == sp.decode(generated)
    assert detok.flush() == ""


@pytest.mark.parametrize("name", ALL)
def test_random_token_sequences(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(0)
    prompts = [(), tok.encode("Hello"), tok.encode("日本", bos=False), [tok.bos_id]]
    for trial in range(300):
        if name in BYTE_FALLBACK:
            generated = valid_byte_runs(tok, rng)
        else:
            # Bias towards byte tokens and control tokens: those are where decoding is not compositional.
            pool = range(tok.vocab_size) if trial % 2 else list(range(0, 300)) + [tok.bos_id, tok.eos_id] * 5
            generated = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        prompt = prompts[trial % len(prompts)]
        chunk = rng.choice([1, 1, 2, 3])
        assert "".join(stream(tok, generated, prompt, chunk)) == expected(tok, generated, prompt), (generated, prompt)


# tokenizers' ByteFallback decoder makes a whole run of byte tokens U+FFFDs if one byte is invalid, which no stream
# can follow (it would unsay characters already shown): random sequences for these keep every run valid UTF-8.
BYTE_FALLBACK = ("ms", "legacy")


def valid_byte_runs(tok, rng: random.Random) -> list[int]:
    """Random pieces and special tokens, and characters spelled as byte tokens (runs of them stay valid UTF-8)."""
    byte_ids = [tok.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    pieces = [i for i in range(tok.vocab_size) if i not in byte_ids]
    generated, length = [], rng.randint(1, 40)
    while len(generated) < length:
        if rng.random() < 0.5:
            generated.append(rng.choice(pieces))
        else:
            generated += [byte_ids[b] for b in rng.choice("日本語🎉é❤️한 ").encode()]
    return generated


class CountingTokenizer(Tokenizer):
    """Records the longest id list decoded, to check the per-token cost does not grow with the stream."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.longest = inner, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids)


def test_window_stays_small(sp):
    generated = sp.encode(ENGLISH * 40 + MULTIBYTE * 10, bos=False)
    counting = CountingTokenizer(sp)
    prompt = sp.encode("a prompt " * 50)
    detok = IncrementalDetokenizer(counting, prompt)
    text = "".join(detok.push([i]) for i in generated) + detok.flush()
    assert text == expected(sp, generated, prompt)
    assert len(generated) > 1000 and counting.longest <= 12
