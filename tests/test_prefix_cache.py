"""Serving under load in the engine: prefix cache hits and evictions, chunked prefill beside running streams,
no recompiles after warm-up."""
import pytest
import torch

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import PREFILL_TOKENS_PER_STEP, Engine
from gpt_fast.engine.prefix_cache import BLOCK_SIZE
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.text.tokenizer import load_tokenizer

SYSTEM = ("You are a helpful assistant. Answer briefly and politely, and say so when you do not know. "
          "The river ran past the old mill and the children watched the water turn the wheel.")
QUESTIONS = ["What is the capital of France?", "Tell me a story", "A", "Why is the sky blue on a clear day?"]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    return model, load_tokenizer(tiny_checkpoint, model.args.tokenizer)


def make_engine(parts, prefix_cache_bytes=0, **kw) -> Engine:
    model, tokenizer = parts
    return Engine(model, tokenizer, max_batch_size=kw.pop("max_batch_size", 4),
                  max_seq_len=kw.pop("max_seq_len", 256), prefix_cache_bytes=prefix_cache_bytes, **kw)


def block_bytes(model) -> int:
    """Bytes one cached block takes (keys and values of every layer)."""
    args = model.args
    return 2 * args.n_layer * args.n_kv_heads * BLOCK_SIZE * args.head_dim * 4


def requests(tokenizer):
    """Prompts sharing a long system prefix, one of them exactly one token past a block boundary; greedy and
    sampled (sampling reads the whole distribution, so it notices keys and values that are only slightly off)."""
    prompts = [tokenizer.encode(SYSTEM + " " + q) for q in QUESTIONS]
    prompts.append(prompts[0][:3 * BLOCK_SIZE + 1])
    params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 20, 9)]
    params.append(SamplingParams(max_new_tokens=15, temperature=1.0, seed=7))
    return prompts, params


def test_prefix_hits_give_the_same_output(parts):
    model, tokenizer = parts
    prompts, params = requests(tokenizer)
    uncached = make_engine(parts)
    expected = [uncached.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine = make_engine(parts, prefix_cache_bytes=64 * block_bytes(model))
    one_by_one = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [c.tokens for c in one_by_one] == expected
    shared = len(tokenizer.encode(SYSTEM)) // BLOCK_SIZE * BLOCK_SIZE
    assert one_by_one[0].cached_tokens == 0
    assert all(c.cached_tokens >= shared for c in one_by_one[1:4])
    assert one_by_one[4].cached_tokens == 3 * BLOCK_SIZE  # a whole cached prompt still prefills its last token
    together = engine.generate(prompts, params)  # batched, every prompt cached now
    assert [c.tokens for c in together] == expected
    assert [c.cached_tokens for c in together] == [(len(p) - 1) // BLOCK_SIZE * BLOCK_SIZE for p in prompts]
    stats = engine.prefix_cache.stats
    assert stats.hit_blocks * BLOCK_SIZE == stats.saved_tokens == sum(c.cached_tokens for c in one_by_one + together)
    assert stats.evicted_blocks == 0


def test_eviction_under_a_tiny_budget_keeps_outputs_right(parts):
    model, tokenizer = parts
    prompts, params = requests(tokenizer)
    prompts += [tokenizer.encode(q + " " + SYSTEM) for q in QUESTIONS]  # other prefixes compete for the room
    params += params[:4]
    expected = [make_engine(parts).generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine = make_engine(parts, prefix_cache_bytes=5 * block_bytes(model))
    assert engine.prefix_cache.num_blocks == 5
    for _ in range(2):
        assert [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)] == expected
        assert [c.tokens for c in engine.generate(prompts, params)] == expected
    stats = engine.prefix_cache.stats
    assert stats.evicted_blocks > 0 and stats.hit_blocks > 0
    assert len(engine.prefix_cache.blocks) + len(engine.prefix_cache.free) == 5


def test_long_prompt_is_prefilled_between_decode_steps(parts):
    _, tokenizer = parts
    streams = [tokenizer.encode(q) for q in QUESTIONS]
    long_prompt = tokenizer.encode(" ".join([SYSTEM] * 30))[:3 * PREFILL_TOKENS_PER_STEP - 50]
    params = SamplingParams(max_new_tokens=40)
    engine = make_engine(parts, max_batch_size=5, max_seq_len=1024)
    expected = [engine.generate([p], params)[0].tokens for p in streams + [long_prompt]]
    for i, prompt in enumerate(streams):
        engine.add(f"s{i}", prompt, params)
    got = {rid: [] for rid in ["s0", "s1", "s2", "s3", "long"]}
    per_step = []
    while engine.num_active:
        if len(per_step) == 3:  # the streams are decoding
            engine.add("long", long_prompt, params)
        outputs = engine.step()
        for out in outputs:
            got[out.request_id] += out.token_ids
        per_step.append({out.request_id: len(out.token_ids) for out in outputs})
    # Each step during the long prefill gave every stream its token; the prefill took 3 steps.
    prefill_steps = per_step[3:6]
    assert prefill_steps[:2] == [{"s0": 1, "s1": 1, "s2": 1, "s3": 1}] * 2
    assert prefill_steps[2] == {"s0": 1, "s1": 1, "s2": 1, "s3": 1, "long": 1}
    assert list(got.values()) == expected


def test_no_recompiles_after_warmup(parts):
    model, tokenizer = parts
    prompts, params = requests(tokenizer)
    prompts += [tokenizer.encode(q) for q in QUESTIONS] + [prompts[0] * 2]
    params += [SamplingParams(max_new_tokens=n) for n in (3, 17, 8, 1)] + [SamplingParams(max_new_tokens=6)]
    assert len(prompts) == 10 and len(prompts[-1]) > 64
    eager = make_engine(parts)
    expected = [c.tokens for c in eager.generate(prompts, params)]
    engine = make_engine(parts, prefix_cache_bytes=16 * block_bytes(model), compile=True)
    engine.warmup()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    # 20 requests: every batch size, prompts of every prefill bucket, prefix hits, slots refilled and moved.
    assert [c.tokens for c in engine.generate(prompts, params)] == expected
    assert [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts[:4], params)] == expected[:4]
    assert [c.tokens for c in engine.generate(prompts[4:7], params[4:7])] == expected[4:7]
    assert [c.tokens for c in engine.generate(prompts[7:], params[7:])] == expected[7:]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_prefix_hits_fill_the_draft_models_cache_too(parts, tiny_checkpoint):
    """Under speculation the cached blocks carry the draft's keys and values as well: with the model itself as
    draft, every draft is still accepted after a hit (stale draft entries would make it disagree)."""
    model, tokenizer = parts
    prompts, params = requests(tokenizer)
    draft = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    # Sampled tokens under speculation follow the same distribution, not the same draws: compare like with like.
    uncached = make_engine(parts, speculate="draft", draft_model=draft)
    expected = [uncached.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    engine = make_engine(parts, prefix_cache_bytes=128 * block_bytes(model), speculate="draft", draft_model=draft)
    greedy = [i for i, sp in enumerate(params) if sp.greedy]
    for _ in range(2):  # the second round hits every prompt
        out = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
        assert [c.tokens for c in out] == expected
        assert all(out[i].accepted_tokens == out[i].draft_tokens for i in greedy)
    assert all(c.cached_tokens > 0 for c in out)
