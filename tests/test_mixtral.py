"""Mixtral (mixture of experts): conversion from transformers' MixtralForCausalLM, logits and greedy tokens match
it; batching, int8 experts and compile change nothing they should not."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import assert_matches_transformers, randomize
from transformers import MixtralConfig, MixtralForCausalLM

from gpt_fast.arch import model_args_from_hf
from gpt_fast.checkpoints.convert import convert
from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.quantize import quantize_checkpoint
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs
from gpt_fast.model.quantized import quantize_model
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.tokenizer import load_tokenizer

# 4 experts, top-2: one or two tokens take the gather path (decode at batch 1 and 2), more the all-experts path.
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
             rms_norm_eps=1e-5)
PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint: Path, tmp_path_factory) -> tuple[MixtralForCausalLM, Path]:
    """A random MixtralForCausalLM saved with save_pretrained in shards (a layer's experts split across files),
    and its conversion."""
    hf_dir, out_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("mixtral")
    tokenizer = (tiny_checkpoint / "tokenizer.model").read_bytes()
    vocab = load_tokenizer(tiny_checkpoint).vocab_size
    hf = MixtralForCausalLM(MixtralConfig(**SMALL, vocab_size=vocab)).eval()
    randomize(hf)
    hf.save_pretrained(hf_dir, max_shard_size="100KB")
    assert len(list(hf_dir.glob("model-*.safetensors"))) >= 3
    (hf_dir / "tokenizer.model").write_bytes(tokenizer)
    convert(hf_dir, out_dir)
    return hf, out_dir


def test_matches_transformers(converted):
    hf, out_dir = converted
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    assert (model.args.num_experts, model.args.num_experts_per_tok) == (4, 2)
    assert_matches_transformers(hf, model, out_dir)


def assert_batched_equals_solo(out_dir: Path) -> None:
    """Four prompts of different lengths batched (padded prefill, decode at batch 4, then 2 and 1 as they finish)
    give each prompt's solo greedy tokens (tests/test_arch.py uses it too)."""
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(out_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 9, 16, 5)]
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)
    solo = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    assert [c.tokens for c in engine.generate(prompts, params)] == solo


def test_batched_equals_solo(converted):
    """Decode at batch 4 runs the all-experts path, at batch 2 and 1 the gather path."""
    assert_batched_equals_solo(converted[1])


def test_int8_experts(converted, tmp_path):
    _, out_dir = converted
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(out_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)

    def greedy(m) -> list[list[int]]:
        engine = Engine(m, tokenizer, max_batch_size=2, max_seq_len=128)
        return [c.tokens for c in engine.generate(prompts, params)]

    reference = greedy(model)
    quantized = quantize_checkpoint(out_dir, "int8", out_dir=tmp_path / "int8")
    state = torch.load(quantized / "model.pth", weights_only=True)
    assert state["layers.0.feed_forward.w1"].dtype == torch.int8
    assert state["layers.0.feed_forward.w1_scales"].shape == (4, 96)
    assert state["layers.0.feed_forward.w2_scales"].shape == (4, 64)
    assert state["layers.0.feed_forward.gate.weight"].dtype == torch.float32  # the router is not quantized
    loaded = load_model(quantized, device="cpu", dtype=torch.float32)
    tokens = greedy(loaded)
    assert tokens == greedy(quantize_model(load_model(out_dir, device="cpu", dtype=torch.float32), "int8"))
    # Random weights have near-ties, so free-running int8 greedy may drift; fed the float model's tokens, int8
    # logits stay within 2% and pick the same next token almost everywhere.
    for prompt, ref_tokens in zip(prompts, reference):
        seq = torch.tensor([prompt + ref_tokens])
        positions = torch.arange(seq.shape[1])[None]
        model_logits = [m(seq, positions, torch.tensor([0])) for m in (model, loaded)]
        ref, ours = model_logits
        assert ((ours - ref).norm() / ref.norm()).item() < 0.02
        agree = ours[0, len(prompt) - 1:-1].argmax(-1) == torch.tensor(ref_tokens)
        assert agree.float().mean() >= 0.9, agree
    with pytest.raises(ValueError, match="int8"):
        quantize_checkpoint(out_dir, "int4", out_dir=tmp_path / "int4")


def test_compiled_equals_eager(converted):
    _, out_dir = converted
    model = quantize_model(load_model(out_dir, device="cpu", dtype=torch.float32), "int8")
    tokenizer = load_tokenizer(out_dir)
    prompts = [tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[2], "Once upon a time")]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (12, 5, 8)]
    # Two graphs: decode at batch 1 (the gather path) and a 16-token prefill (the all-experts path).
    eager = Engine(model, tokenizer, max_batch_size=1, max_seq_len=16)
    expected = [c.tokens for c in eager.generate(prompts, params)]
    compiled = Engine(model, tokenizer, max_batch_size=1, max_seq_len=16, compile=True)
    compiled.warmup()
    assert [c.tokens for c in compiled.generate(prompts, params)] == expected


def test_config_mapping_and_bytes_read():
    config = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
              "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
    args = model_args_from_hf(config)
    assert args == ModelArgs(**NAMED_SHAPES["mixtral-8x7b"])
    # Mixtral 8x7B has 46.7B parameters, 12.9B of them used per token (Mistral AI's figures); weight_bytes
    # leaves out the embedding (a token reads one row of it).
    with torch.device("meta"):
        total = sum(t.numel() for t in Transformer(args).state_dict().values())
    assert round(total / 1e9, 1) == 46.7
    assert round((args.weight_bytes(2) / 2 + args.vocab_size * args.dim) / 1e9, 1) == 12.9


def test_missing_expert_is_named(converted, tiny_checkpoint, tmp_path):
    hf, _ = converted
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    (hf_dir / "tokenizer.model").write_bytes((tiny_checkpoint / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match=r"missing.*layers.1.feed_forward.w3"):
        convert(hf_dir, tmp_path / "out")
