"""Generation behaviour on the tiny model: batching, slots, sampling, stop conditions, errors, compile."""
import json
import subprocess
import sys

import pytest
import torch

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine, PromptTooLongError
from gpt_fast.engine.sampling import InvalidParam, SamplingParams
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.tokenizer import load_tokenizer

PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def make_engine(model, tokenizer, **kw) -> Engine:
    return Engine(model, tokenizer, max_batch_size=kw.pop("max_batch_size", 4), max_seq_len=kw.pop("max_seq_len", 256),
                  **kw)


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no incremental cache use)."""
    model.setup_caches(1, 256)
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_full_recompute(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    out = make_engine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    assert out.tokens == reference_greedy(model, prompt, 24)
    assert out.text == tokenizer.decode(prompt + out.tokens)[len(tokenizer.decode(prompt)):]
    assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_decode_crosses_cache_length_buckets(model, tokenizer):
    engine = make_engine(model, tokenizer, max_seq_len=600)
    assert engine.kv_buckets == [64, 128, 192, 256, 320, 384, 448, 512, 576, 600]
    prompt = tokenizer.encode(" ".join(PROMPTS * 8))[:240]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    model.setup_caches(1, 600)
    logits = model(torch.tensor([prompt + out.tokens]), torch.arange(len(prompt) + 30)[None], torch.tensor([0]))
    assert out.tokens == logits[0, len(prompt) - 1:-1].argmax(-1).tolist()


def test_batched_equals_solo_and_slots_are_reused(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS * 2]  # 8 prompts through 4 slots
    params = [SamplingParams(max_new_tokens=n) for n in (5, 30, 12, 20, 7, 3, 25, 16)]
    engine = make_engine(model, tokenizer)
    solo = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    batched = engine.generate(prompts, params)
    assert [c.tokens for c in batched] == solo
    assert [len(c.tokens) for c in batched] == [sp.max_new_tokens for sp in params]
    assert engine.num_active == 0


def test_sampling_top_k_1_is_greedy_and_seeds_reproduce(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engine = make_engine(model, tokenizer)
    greedy = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=16))]
    top1 = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.9, top_k=1))]
    assert top1 == greedy
    hot = SamplingParams(max_new_tokens=16, temperature=5.0, top_p=0.95, seed=1234)
    first = [c.tokens for c in engine.generate(prompts, hot)]
    # Same seed, other batch composition and order: same tokens per request.
    again = [engine.generate([p], hot)[0].tokens for p in reversed(prompts)][::-1]
    assert first == again
    other = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=5.0,
                                                                        top_p=0.95, seed=99))]
    assert other != first and first != greedy


def test_sampling_mixed_batch_keeps_greedy_rows(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engine = make_engine(model, tokenizer)
    greedy = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=12))]
    mixed = engine.generate(prompts, [SamplingParams(max_new_tokens=12),
                                      SamplingParams(max_new_tokens=12, temperature=3.0, seed=1)] * 2)
    assert mixed[0].tokens == greedy[0] and mixed[2].tokens == greedy[2]


def test_top_k_restricts_choices(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1])
    model.setup_caches(1, 64)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([0]))[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    engine = make_engine(model, tokenizer)
    firsts = {engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=50.0, top_k=3, seed=s))[0]
              .tokens[0] for s in range(40)}
    assert firsts <= allowed and len(firsts) > 1


def test_stop_token_ends_generation(model, tokenizer, tiny_checkpoint):
    prompt = tokenizer.encode(PROMPTS[0])
    free = make_engine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=20))[0].tokens
    stop_id = free[6]
    first = free.index(stop_id)
    stopping = load_tokenizer(tiny_checkpoint, extra_stop_ids=[stop_id])
    out = make_engine(model, stopping).generate([prompt], SamplingParams(max_new_tokens=20))[0]
    assert out.finish_reason == "stop"
    assert out.tokens == free[:first + 1]
    assert out.text == tokenizer.decode(prompt + free[:first])[len(tokenizer.decode(prompt)):]
    ignored = make_engine(model, stopping).generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert ignored.tokens == free


def test_stop_string_is_cut_and_not_returned(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1])
    engine = make_engine(model, tokenizer)
    full = engine.generate([prompt], SamplingParams(max_new_tokens=40))[0].text
    stop = full[10:13]
    assert stop.strip(), full
    out = engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=("zzzz-never", stop)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]
    # The same through streamed step outputs: deltas never show any part of the stop string.
    engine.add("s", prompt, SamplingParams(max_new_tokens=40, stop=(stop,)))
    deltas = []
    while engine.num_active:
        deltas += [o.text for o in engine.step()]
    assert "".join(deltas) == full[:full.index(stop)]


def test_prompt_too_long_and_bad_params(model, tokenizer):
    engine = make_engine(model, tokenizer, max_seq_len=32)
    with pytest.raises(PromptTooLongError, match="32"):
        engine.add("x", list(range(5, 37)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add("x", [], SamplingParams())
    for field, kw in [("temperature", dict(temperature=-1.0)), ("top_p", dict(top_p=0.0)),
                      ("top_k", dict(top_k=-2)), ("max_new_tokens", dict(max_new_tokens=0))]:
        with pytest.raises(InvalidParam) as err:
            SamplingParams(**kw)
        assert err.value.field == field
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_engine(model, tokenizer, max_seq_len=10**6)


def test_generation_stops_at_end_of_context(model, tokenizer):
    engine = make_engine(model, tokenizer, max_seq_len=64)
    prompt = tokenizer.encode(PROMPTS[3])
    out = engine.generate([prompt], SamplingParams(max_new_tokens=100))[0]
    assert out.finish_reason == "length" and len(prompt) + len(out.tokens) == 64


def test_long_prompt_is_prefilled_in_chunks(model, tokenizer):
    prompt = tokenizer.encode(" ".join(PROMPTS * 30))[:1500]
    engine = make_engine(model, tokenizer, max_seq_len=2048)
    assert len(prompt) > engine.runner.prefill_buckets[-1]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8))[0]
    model.setup_caches(1, 2048)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([0]))
    assert out.tokens[0] == int(logits[0, -1].argmax())


def test_cancel_frees_slot(model, tokenizer):
    engine = make_engine(model, tokenizer, max_batch_size=2)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    solo = [engine.generate([p], SamplingParams(max_new_tokens=10))[0].tokens for p in prompts]
    engine.add("a", prompts[0], SamplingParams(max_new_tokens=50))
    engine.add("b", prompts[1], SamplingParams(max_new_tokens=10))
    got = {"b": [], "c": []}
    for o in engine.step():
        got.setdefault(o.request_id, []).extend(o.token_ids)
    engine.cancel("a")
    engine.add("c", prompts[2], SamplingParams(max_new_tokens=10))
    while engine.num_active:
        for o in engine.step():
            got[o.request_id] += o.token_ids
    assert got["b"] == solo[1] and got["c"] == solo[2]


def test_cli_json(tiny_checkpoint, tokenizer):
    out = subprocess.run([sys.executable, "-m", "gpt_fast.generate", "--checkpoint", str(tiny_checkpoint / "model.pth"),
                          "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["prompt_tokens"] == tokenizer.encode(PROMPTS[0])
    assert len(result["tokens"]) == 12 and result["tokens_per_s"] > 0
    assert result["text"] == tokenizer.decode(result["prompt_tokens"] + result["tokens"])[len(tokenizer.decode(
        result["prompt_tokens"])):]


def test_cli_errors_are_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpt_fast.generate", "--checkpoint", str(tmp_path / "nope"),
                          "--prompt", "x"], capture_output=True, text=True)
    assert out.returncode != 0 and "checkpoint not found" in out.stderr


def test_compiled_small_batch_decode_equals_eager(tiny_checkpoint, tokenizer):
    """Compiled decode on CPU lowers matmuls of up to 4 rows as fused reductions (gpt_fast/matvec.py): batch 1 and 2
    give the same greedy tokens as eager."""
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    eager = make_engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    expected = [[c.tokens for c in eager.generate(batch, params)] for batch in (prompts, prompts[:1])]
    compiled = make_engine(model, tokenizer, max_batch_size=2, max_seq_len=64, compile=True)
    assert [[c.tokens for c in compiled.generate(batch, params)] for batch in (prompts, prompts[:1])] == expected


def reference_penalized_greedy(model: Transformer, prompt: list[int], n: int, presence: float,
                               frequency: float) -> list[int]:
    """Greedy with OpenAI's penalties over the generated tokens, by full recompute."""
    model.setup_caches(1, 256)
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]))[0, -1]
        counts = torch.bincount(torch.tensor(seq[len(prompt):], dtype=torch.long), minlength=logits.shape[-1])
        seq.append(int((logits - frequency * counts - presence * (counts > 0)).argmax()))
    return seq[len(prompt):]


def test_penalties_apply_per_row(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    engine = make_engine(model, tokenizer)
    plain = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=60, ignore_eos=True))]
    params = [SamplingParams(max_new_tokens=60, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0),
              SamplingParams(max_new_tokens=60, ignore_eos=True),
              SamplingParams(max_new_tokens=60, ignore_eos=True, presence_penalty=2.0, frequency_penalty=0.5),
              SamplingParams(max_new_tokens=60, ignore_eos=True)]
    out = [c.tokens for c in engine.generate(prompts, params)]
    assert out[1] == plain[1] and out[3] == plain[3]  # rows without penalties are untouched
    for i in (0, 2):
        expected = reference_penalized_greedy(model, prompts[i], 60, params[i].presence_penalty,
                                              params[i].frequency_penalty)
        assert out[i] == expected and out[i] != plain[i]
    assert len(set(out[0])) > len(set(plain[0]))  # fewer repeats
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(InvalidParam) as err:
            SamplingParams(**{name: 2.5})
        assert err.value.field == name


def test_logprobs_are_the_models_and_only_for_those_asking(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1])
    engine = make_engine(model, tokenizer)
    asked, not_asked, sampled = engine.generate([prompt] * 3, [
        SamplingParams(max_new_tokens=12, logprobs=3), SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logprobs=0)])
    assert not_asked.logprobs == [] and asked.tokens == not_asked.tokens
    model.setup_caches(1, 256)
    for out in (asked, sampled):
        seq = prompt + out.tokens
        logp = torch.log_softmax(model(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]))[0], -1)
        assert [lp.token_id for lp in out.logprobs] == out.tokens
        for j, lp in enumerate(out.logprobs):
            expected = logp[len(prompt) - 1 + j]
            assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=1e-4)
            top = expected.topk(len(lp.top))
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [len(lp.top) for lp in asked.logprobs] == [3] * 12 and all(not lp.top for lp in sampled.logprobs)
    assert asked.logprobs[0].top[0][0] == asked.tokens[0]  # greedy takes the most likely token
