"""The embedded tiny model: deterministic build, loadable weights, and greedy decoding that no dtype flips."""
import sys

import pytest
import torch

from gpt_fast.checkpoints import tiny
from gpt_fast.checkpoints.load import load_model
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.layers import rope_inv_freq, rotate_half
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.tokenizer import load_tokenizer

PROMPTS = ["The capital of France is", "Once upon a time", "日本語 🎉", "Q: What do bees make?\nA:"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def greedy(model, prompt, steps=48):
    """Greedy tokens and the top-1 minus top-2 logit of each step, one sequence in slot 0."""
    model.setup_caches(max_batch_size=1, max_seq_len=256)
    n = len(prompt)
    logits = model(torch.tensor([prompt]), torch.arange(n)[None], slots=torch.tensor([0]),
                   logit_index=torch.tensor([n - 1]))
    tokens, margins = [], []
    for t in range(n, n + steps):
        top = logits[0].topk(2).values
        margins.append((top[0] - top[1]).item())
        tokens.append(logits[0].argmax().item())
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([[t]]))[:, -1]
    return tokens, margins


def test_build_is_deterministic(tiny_checkpoint, tmp_path):
    again = tiny.build_tiny(tmp_path / "again")
    for name in ("tokenizer.model", "model.pth", "config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_checkpoint_layout(tiny_checkpoint, tokenizer):
    args = ModelArgs.load(tiny_checkpoint / "config.json")
    assert (args.dim, args.n_layer, args.n_head, args.n_kv_heads, args.head_dim) == (128, 2, 4, 2, 32)
    assert args.vocab_size == tokenizer.vocab_size == tiny.VOCAB_SIZE and args.tokenizer == "sentencepiece"
    state = torch.load(tiny_checkpoint / "model.pth", weights_only=True)
    expected = Transformer(args).state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == v.shape and state[k].dtype == torch.float32 for k, v in expected.items())


def test_tokenizer_uses_byte_fallback_for_rare_characters(tokenizer):
    assert tokenizer.decode(tokenizer.encode("The capital of France is Paris.")) == "The capital of France is Paris."
    byte_ids = range(3, 3 + 256)  # <0x00>..<0xFF> follow unk, bos, eos
    for text in ("🎉", "日", "é"):
        ids = tokenizer.encode(text, bos=False)
        assert len(text.encode()) == sum(i in byte_ids for i in ids)


def test_greedy_is_identical_in_fp32_and_bf16_with_large_margins(tiny_checkpoint, tokenizer, fp32):
    bf16 = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    all_margins = []
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        tokens, margins = greedy(fp32, prompt)
        assert greedy(bf16, prompt)[0] == tokens, text
        assert not set(tokens) & (tokenizer.stop_ids | {tokenizer.bos_id})
        all_margins += margins
    assert sum(all_margins) / len(all_margins) > 2.5
    assert min(all_margins) > 1.5


def test_batched_padded_bf16_matches_solo_fp32(tiny_checkpoint, tokenizer, fp32):
    bf16 = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    solo = [greedy(fp32, p, steps=32)[0] for p in prompts]
    # One padded prefill (position -1 marks padding), then batched decode with rows at different positions.
    bsz, width = len(prompts), max(map(len, prompts))
    bf16.setup_caches(max_batch_size=bsz, max_seq_len=256)
    tokens = torch.zeros(bsz, width, dtype=torch.long)
    positions = torch.full((bsz, width), -1)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
        positions[b, :len(p)] = torch.arange(len(p))
    lengths = torch.tensor([len(p) for p in prompts])
    logits = bf16(tokens, positions, slots=torch.arange(bsz), logit_index=lengths - 1)
    out = []
    for step in range(32):
        out.append(logits.argmax(-1))
        logits = bf16(out[-1][:, None], (lengths + step)[:, None])[:, -1]
    assert torch.stack(out, 1).tolist() == solo


def test_previous_token_head_peaks_at_distance_one():
    args = ModelArgs(dim=128, n_layer=2, n_head=4, n_kv_heads=2, head_dim=32, intermediate_size=344,
                     vocab_size=tiny.VOCAB_SIZE, max_position_embeddings=2048)
    q, k = tiny._positional_query_key(args)
    angles = torch.arange(args.max_position_embeddings)[:, None] * rope_inv_freq(args)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    t = args.max_position_embeddings - 1
    query = q * cos[t] + rotate_half(q) * sin[t]
    keys = k * cos + rotate_half(k) * sin
    scores = (keys @ query) / args.head_dim ** 0.5
    assert scores.argmax().item() == t - 1
    others = torch.cat([scores[:t - 1], scores[t:]])
    assert (scores[t - 1] - others.max()).item() > 15  # nats: the softmax puts ~all weight on t - 1


def test_prediction_depends_on_the_last_two_tokens_only(fp32):
    gen = torch.Generator().manual_seed(0)
    fp32.setup_caches(max_batch_size=1, max_seq_len=2048)
    for length in (3, 50, 700, 2000):
        seq = torch.randint(0, tiny.VOCAB_SIZE, (length,), generator=gen)
        long = fp32(seq[None], torch.arange(length)[None], slots=torch.tensor([0]),
                    logit_index=torch.tensor([length - 1]))
        short = fp32(seq[None, -2:], torch.arange(2)[None], slots=torch.tensor([0]), logit_index=torch.tensor([1]))
        assert long.argmax() == short.argmax(), length
    # ... and on the previous token, not just the current one: the KV cache matters.
    cur = 300
    predictions = {fp32(torch.tensor([[prev, cur]]), torch.arange(2)[None], slots=torch.tensor([0]),
                        logit_index=torch.tensor([1])).argmax().item() for prev in range(259, 300)}
    assert len(predictions) > 8


def test_main_prints_what_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpt_fast.tiny", str(tmp_path)])
    tiny.main()
    out = capsys.readouterr().out
    for name in ("tokenizer.model", "model.pth", "config.json"):
        assert str(tmp_path / name) in out and (tmp_path / name).is_file()
