"""A model with more embedding rows than its tokenizer has tokens (Qwen2.5: 151936 rows, 151665 tokens) never emits
an id the tokenizer cannot decode: greedy, sampled, speculative, in the engine and through the serving loop."""
import json

import pytest
import torch
from test_serving import run

from gpt_fast.checkpoints.load import load, load_model
from gpt_fast.checkpoints.tiny import CONST
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import ModelArgs
from gpt_fast.serving.loop import ServingLoop

PAD = 16
PROMPTS = ["The capital of France", "Once upon a time there was a little"]


@pytest.fixture(scope="module")
def padded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model with 16 more embedding and output rows, the output rows made to win every step: they read
    the constant the tiny model keeps in its residual stream, so their logits are far above any real token's."""
    directory = tmp_path_factory.mktemp("padded")
    (directory / "tokenizer.model").symlink_to(tiny_checkpoint / "tokenizer.model")
    state = torch.load(tiny_checkpoint / "model.pth", weights_only=True)
    embedding, output = state["tok_embeddings.weight"], state["output.weight"]
    rows = torch.zeros(PAD, output.shape[1])
    rows[:, CONST] = 100.0 + torch.arange(PAD)
    state["tok_embeddings.weight"] = torch.cat([embedding, embedding[:PAD]])
    state["output.weight"] = torch.cat([output, rows])
    torch.save(state, directory / "model.pth")
    args = ModelArgs.load(tiny_checkpoint / "config.json")
    args.vocab_size += PAD
    args.save(directory / "config.json")
    return directory


@pytest.fixture(scope="module")
def padded(padded_checkpoint):
    return load(padded_checkpoint, device="cpu", dtype=torch.float32)


def test_unmasked_the_padding_rows_would_win(padded):
    model, tokenizer = padded
    model.setup_caches(1, 64)
    ids = tokenizer.encode(PROMPTS[0])
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]))
    assert (logits[0].argmax(-1) >= tokenizer.vocab_size).all()


@pytest.mark.parametrize("speculate", [None, "lookup", "draft"])
def test_engine_never_emits_padding_ids(padded, padded_checkpoint, speculate):
    model, tokenizer = padded
    draft = load_model(padded_checkpoint, device="cpu", dtype=torch.float32) if speculate == "draft" else None
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=128, speculate=speculate, draft_model=draft)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    for params in (SamplingParams(max_new_tokens=16, ignore_eos=True),
                   SamplingParams(max_new_tokens=16, temperature=1.0, seed=1, ignore_eos=True),
                   SamplingParams(max_new_tokens=16, temperature=2.0, top_p=0.99, seed=2, ignore_eos=True)):
        for prompt, out in zip(prompts, engine.generate(prompts, params)):
            assert len(out.tokens) == 16 and max(out.tokens) < tokenizer.vocab_size
            assert out.text == tokenizer.decode(prompt + out.tokens)[len(tokenizer.decode(prompt)):]


def test_serving_loop_stays_up(padded):
    model, tokenizer = padded
    loop = ServingLoop(lambda: Engine(model, tokenizer, max_batch_size=2, max_seq_len=64), SamplingParams())
    replies = run(loop, {"g": {"prompt": PROMPTS[0], "max_new_tokens": 20, "stream": False},
                         "s": {"prompt": PROMPTS[1], "max_new_tokens": 20, "temperature": 1.5, "seed": 3,
                               "stream": False}})
    for rid in replies:
        answer = json.loads(replies[rid][-1].body)
        assert answer["usage"]["completion_tokens"] == 20 and answer["finish_reason"] == "length"


def test_prompt_ids_beyond_the_embedding_are_a_request_error(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint, device="cpu", dtype=torch.float32)
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="outside the model's 515-row embedding"):
        engine.add("x", [1, 600], SamplingParams())
