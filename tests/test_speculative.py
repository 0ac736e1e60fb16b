"""Speculative decoding (draft model and prompt lookup): exact greedy output, the target's sampling distribution,
per-row acceptance in a batch, back-off when drafts do not pay, compiled without recompiles."""
import pytest
import torch

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.tokenizer import load_tokenizer

PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]
K = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture
def target(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def agreeing_draft(tiny_checkpoint) -> Transformer:
    return load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)


def disagreeing_draft(tiny_checkpoint) -> Transformer:
    draft = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        draft.output.weight.copy_(draft.output.weight[torch.randperm(draft.args.vocab_size,
                                                                     generator=torch.Generator().manual_seed(0))])
    return draft


def engine_for(mode, target, tokenizer, draft=None, **kw):
    return Engine(target, tokenizer, max_batch_size=kw.pop("max_batch_size", 4), max_seq_len=kw.pop("max_seq_len", 256),
                  speculate=mode, speculate_k=K, draft_model=draft, **kw)


@pytest.mark.parametrize("mode,make_draft", [("lookup", None), ("draft", agreeing_draft),
                                             ("draft", disagreeing_draft)])
def test_greedy_equals_plain_decoding_solo_and_batched(mode, make_draft, target, tokenizer, tiny_checkpoint):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (60, 23, 41, 7)]
    plain = [c.tokens for c in Engine(target, tokenizer, 4, 256).generate(prompts, params)]
    engine = engine_for(mode, target, tokenizer, make_draft and make_draft(tiny_checkpoint))
    batched = engine.generate(prompts, params)
    assert [c.tokens for c in batched] == plain
    assert [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)] == plain
    drafted, accepted = sum(c.draft_tokens for c in batched), sum(c.accepted_tokens for c in batched)
    if make_draft is agreeing_draft:
        assert accepted == drafted > 0  # the same model as draft: every draft is accepted
    elif make_draft is disagreeing_draft:
        assert accepted < drafted / 4


def test_lookup_accepts_text_the_prompt_already_holds(target, tokenizer):
    """The tiny model's next token depends on the last two only: a prompt that ends the way an earlier passage
    began makes it repeat that passage, which lookup then proposes."""
    start = tokenizer.encode(PROMPTS[1])
    plain = Engine(target, tokenizer, 1, 256)
    passage = plain.generate([start], SamplingParams(max_new_tokens=50, ignore_eos=True))[0].tokens
    prompt = start + passage + start[-2:]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    out = engine_for("lookup", target, tokenizer).generate([prompt], params)[0]
    assert out.tokens == plain.generate([prompt], params)[0].tokens == passage[:40]
    assert out.accepted_tokens >= 0.9 * out.draft_tokens > 0
    assert out.accepted_tokens >= 30  # 40 tokens in a few verify passes


def test_drafts_that_never_land_back_off(target, tokenizer, tiny_checkpoint):
    engine = engine_for("draft", target, tokenizer, disagreeing_draft(tiny_checkpoint), max_seq_len=512)
    out = engine.generate([tokenizer.encode(PROMPTS[0])], SamplingParams(max_new_tokens=300, ignore_eos=True))[0]
    # Back-off grows 4x up to 64 plain steps between attempts: a handful of verify passes, not 300 / (K + 1),
    # and after a failed pass the row probes with one draft (a pass about as cheap as a plain step), not K.
    assert out.accepted_tokens == 0 and out.draft_passes <= 12 and out.draft_tokens == K + out.draft_passes - 1


def test_sampled_requests_reproduce_whatever_shares_the_batch(target, tokenizer, tiny_checkpoint):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    hot = [SamplingParams(max_new_tokens=30, temperature=1.5, seed=s, ignore_eos=True) for s in range(4)]
    engine = engine_for("draft", target, tokenizer, agreeing_draft(tiny_checkpoint))
    batched = [c.tokens for c in engine.generate(prompts, hot)]
    assert [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, hot)] == batched
    assert len({tuple(t) for t in batched}) == 4


def test_opted_out_request_decodes_plainly(target, tokenizer):
    prompt = tokenizer.encode(PROMPTS[1])
    engine = engine_for("lookup", target, tokenizer)
    on, off = engine.generate([prompt] * 2, [SamplingParams(max_new_tokens=80, ignore_eos=True),
                                             SamplingParams(max_new_tokens=80, ignore_eos=True, speculate=False)])
    assert on.tokens == off.tokens and on.draft_tokens > 0 and off.draft_tokens == 0


def test_logprobs_and_penalties_under_speculation(target, tokenizer, tiny_checkpoint):
    """Logprobs come from the verify pass's logits; a penalized request decodes plainly beside drafting ones."""
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=2),
              SamplingParams(max_new_tokens=40, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0),
              SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=5, logprobs=1)]
    plain = Engine(target, tokenizer, 4, 256).generate(prompts[:2], params[:2])
    spec = engine_for("draft", target, tokenizer, agreeing_draft(tiny_checkpoint)).generate(prompts, params)
    assert [c.tokens for c in spec[:2]] == [c.tokens for c in plain]
    assert spec[0].draft_tokens > 0 and spec[1].draft_tokens == 0 and spec[2].draft_tokens > 0
    target.setup_caches(1, 256)
    for prompt, out in ((prompts[0], spec[0]), (prompts[2], spec[2])):
        seq = prompt + out.tokens
        logp = torch.log_softmax(target(torch.tensor([seq]), torch.arange(len(seq))[None], torch.tensor([0]))[0], -1)
        expected = logp[len(prompt) - 1:-1]
        assert [lp.token_id for lp in out.logprobs] == out.tokens
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(
            expected.gather(-1, torch.tensor(out.tokens)[:, None])[:, 0].tolist(), abs=1e-4)
        n = len(out.logprobs[0].top)
        assert [[t for t, _ in lp.top] for lp in out.logprobs] == expected.topk(n).indices.tolist()


class CharTokenizer:
    """Token i is the letter chr(65 + i); nothing stops generation."""
    bos_id, eos_id, stop_ids, vocab_size = None, None, frozenset(), 16

    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)


def small_vocab_model(seed: int, sharpness: float) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layer=1, n_head=2, n_kv_heads=1, head_dim=16, intermediate_size=64,
                                  vocab_size=16, max_position_embeddings=64))
    with torch.no_grad():
        model.output.weight.mul_(sharpness)
    return model.eval()


@pytest.fixture
def one_thread():
    """Thousands of tiny forward passes: a second OpenMP thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampled_tokens_follow_the_target_distribution(one_thread):
    """The first token a verify pass emits (accepted draft, corrected or bonus) is distributed as the target's
    next-token distribution, for a draft that often disagrees."""
    target, draft = small_vocab_model(0, 2.0), small_vocab_model(1, 2.0)
    prompt, n = [1, 2, 3], 4000
    engine = Engine(target, CharTokenizer(), max_batch_size=64, max_seq_len=64, speculate="draft", speculate_k=3,
                    draft_model=draft)
    out = engine.generate([prompt] * n, [SamplingParams(max_new_tokens=5, temperature=1.0, seed=s) for s in range(n)])
    assert sum(c.accepted_tokens for c in out) < 0.5 * sum(c.draft_tokens for c in out)  # it does disagree (~28%)
    # Expected distribution of the second token: the target's p(. | prompt, first token), averaged over samples.
    expected = torch.zeros(16)
    with torch.no_grad():
        target.setup_caches(1, 64)
        for first in {c.tokens[0] for c in out}:
            seq = torch.tensor([prompt + [first]])
            p = torch.softmax(target(seq, torch.arange(4)[None], torch.tensor([0]))[0, -1], dim=-1)
            expected += p * sum(c.tokens[0] == first for c in out)
    expected /= n
    observed = torch.bincount(torch.tensor([c.tokens[1] for c in out]), minlength=16).float() / n
    # Sampling noise alone gives E[TV] ~ sum_v sqrt(p_v (1 - p_v) / (2 pi n)) <= 0.025 for 16 tokens and n = 4000;
    # measured 0.021. Accepting every draft instead gives 0.21.
    assert 0.5 * (observed - expected).abs().sum() < 0.05


def test_compiled_speculation_has_no_recompiles_after_warmup(target, tokenizer, tiny_checkpoint):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (30, 9, 17, 24)]
    plain = [c.tokens for c in Engine(target, tokenizer, 2, 64).generate(prompts, params)]
    engine = engine_for("draft", target, tokenizer, agreeing_draft(tiny_checkpoint), max_batch_size=2,
                        max_seq_len=64, compile=True)
    engine.warmup()
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert [c.tokens for c in engine.generate(prompts, params)] == plain
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before
