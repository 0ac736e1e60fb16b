"""Qwen2, Qwen3, Gemma 2, Phi-3 and Mistral with a sliding window: tiny random models built with transformers,
saved with save_pretrained and converted with our CLI, match transformers (fp32 logits, 32 greedy tokens); batching,
int8 and compile change nothing they should not."""
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hf_tokenizers import byte_level
from test_convert import assert_matches_transformers, randomize
from test_gguf import write_tiny_gguf
from test_mixtral import PROMPTS, assert_batched_equals_solo
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gpt_fast.arch import model_args_from_hf
from gpt_fast.checkpoints.convert import convert
from gpt_fast.checkpoints.gguf import convert_gguf
from gpt_fast.checkpoints.load import load, load_model
from gpt_fast.checkpoints.quantize import quantize_checkpoint
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs
from gpt_fast.model.quantized import quantize_model
from gpt_fast.text.hf_tokenizer import HuggingFaceTokenizer
from gpt_fast.text.tokenizer import load_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512)
# A window of 8 positions is shorter than every test prompt but the shortest ones. LongRoPE's trained context of
# 8 positions is shorter than the prompt, so transformers uses the long factors, as we do for a cache of more.
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [1.5, 3.0, 6.0, 10.0]}
# case: (model class, config class, config, how save_pretrained writes it)
CASES = {
    "qwen2_gqa": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2), "safetensors"),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True), "sharded"),
    "qwen3_gqa": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=24), "sharded"),
    # Three layers: sliding, full, sliding.
    "gemma2_gqa_window": (Gemma2ForCausalLM, Gemma2Config, dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0), "sharded"),
    "phi3_gqa_longrope": (Phi3ForCausalLM, Phi3Config, dict(
        num_key_value_heads=2, partial_rotary_factor=0.5, original_max_position_embeddings=8, rope_scaling=LONGROPE,
        pad_token_id=0), "sharded"),
    "phi3_window": (Phi3ForCausalLM, Phi3Config, dict(sliding_window=8, pad_token_id=0), "safetensors"),
    "mistral_gqa_window": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=8),
                           "sharded"),
}
# One case per family for the batching, int8 and compile checks.
FAMILIES = ["qwen2_gqa", "qwen3_gqa", "gemma2_gqa_window", "phi3_gqa_longrope", "mistral_gqa_window"]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint: Path, tmp_path_factory) -> dict:
    """case -> (the transformers model, its conversion by `python -m gpt_fast.convert`), built on first use."""
    tokenizer = (tiny_checkpoint / "tokenizer.model").read_bytes()
    vocab = load_tokenizer(tiny_checkpoint).vocab_size
    root = tmp_path_factory.mktemp("arch")
    built = {}

    def get(case: str) -> tuple[torch.nn.Module, Path]:
        if case not in built:
            cls, config_cls, overrides, fmt = CASES[case]
            hf = cls(config_cls(**{**SMALL, **overrides}, vocab_size=vocab)).eval()
            randomize(hf)
            hf_dir, out_dir = root / case / "hf", root / case / "out"
            hf.save_pretrained(hf_dir, max_shard_size="20KB" if fmt == "sharded" else "50GB")
            assert len(list(hf_dir.glob("model-*.safetensors"))) >= 3 if fmt == "sharded" else \
                (hf_dir / "model.safetensors").is_file()
            (hf_dir / "tokenizer.model").write_bytes(tokenizer)
            subprocess.run([sys.executable, "-m", "gpt_fast.convert", str(hf_dir), str(out_dir)], check=True,
                           capture_output=True)
            built[case] = hf, out_dir
        return built[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(converted, case):
    hf, out_dir = converted(case)
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    assert model.args.tie_embeddings == hf.config.tie_word_embeddings
    assert_matches_transformers(hf, model, out_dir)


def test_longrope_short_factors_within_the_trained_context(converted):
    """A cache no longer than original_max_position_embeddings rotates with the short factors, as transformers
    does for a sequence that short."""
    hf, out_dir = converted("phi3_gqa_longrope")
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    with torch.no_grad():
        ref = hf(prompt).logits
        model.setup_caches(1, 8)
        ours = model(prompt, torch.arange(8)[None], torch.tensor([0]))
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("case", FAMILIES)
def test_batched_equals_solo(converted, case):
    assert_batched_equals_solo(converted(case)[1])


@pytest.mark.parametrize("case", FAMILIES)
def test_int8_round_trip(converted, case, tmp_path):
    """An int8 checkpoint loads into what quantizing at load gives, within 3% of the float logits."""
    _, out_dir = converted(case)
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    quantized = quantize_checkpoint(out_dir, "int8", out_dir=tmp_path / "int8")
    assert torch.load(quantized / "model.pth", weights_only=True)["layers.0.attention.wqkv.weight"].dtype == torch.int8
    loaded = load_model(quantized, device="cpu", dtype=torch.float32)
    in_memory = quantize_model(load_model(out_dir, device="cpu", dtype=torch.float32), "int8")
    tokens = torch.tensor([load_tokenizer(out_dir).encode(PROMPTS[3])])
    positions = torch.arange(tokens.shape[1])[None]

    def logits(m) -> torch.Tensor:
        m.setup_caches(1, 64)
        return m(tokens, positions, torch.tensor([0]))

    ref, ours, again = (logits(m) for m in (model, loaded, in_memory))
    assert torch.equal(ours, again)
    # Rows of 64 random inputs: 1-2.5% (LongRoPE's attention factor sharpens attention, so errors grow most there).
    assert ((ours - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("case", FAMILIES)
def test_compiled_equals_eager(converted, case):
    _, out_dir = converted(case)
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(out_dir)
    prompts = [tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[2])]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (7, 12)]
    # Two graphs (decode at batch 1, a 16-token prefill), both past the window of 8.
    eager = Engine(model, tokenizer, max_batch_size=1, max_seq_len=16)
    expected = [c.tokens for c in eager.generate(prompts, params)]
    compiled = Engine(model, tokenizer, max_batch_size=1, max_seq_len=16, compile=True)
    compiled.warmup()
    assert [c.tokens for c in compiled.generate(prompts, params)] == expected


def test_qwen2_gguf_converts_like_its_hugging_face_checkpoint(converted, tmp_path):
    """A Qwen2 GGUF file (q/k rows in Hugging Face's order, q/k/v biases; fp32 tensors) converts to the same weights
    and architecture options as the Hugging Face checkpoint it was written from."""
    _, out_dir = converted("qwen2_gqa")
    write_tiny_gguf(out_dir, tmp_path / "qwen2.gguf", architecture="qwen2", weight_types=(Q.F32,))
    from_gguf = torch.load(convert_gguf(tmp_path / "qwen2.gguf", tmp_path / "out", torch.float32), weights_only=True)
    expected = torch.load(out_dir / "model.pth", weights_only=True)
    assert from_gguf.keys() == expected.keys() and all(torch.equal(from_gguf[k], expected[k]) for k in expected)
    ignored = {"tokenizer": None, "stop_token_ids": None}
    assert replace(ModelArgs.load(tmp_path / "out" / "config.json"), **ignored) == \
        replace(ModelArgs.load(out_dir / "config.json"), **ignored)


def test_qwen2_with_its_tokenizer_json_chats_as_transformers_does(tmp_path):
    """A Qwen2 checkpoint laid out as on the hub: a byte-level BPE tokenizer.json with ChatML and no tokenizer.model,
    an embedding padded past the tokenizer's vocabulary. Converted with the CLI, a chat prompt's ids, 32 greedy tokens
    and their text equal transformers' (told never to pick a padding id, as our engine never does)."""
    tokenizer_dir, hf_dir, out_dir = tmp_path / "tokenizer", tmp_path / "hf", tmp_path / "out"
    hf_tokenizer = AutoTokenizer.from_pretrained(byte_level(tokenizer_dir))
    vocab, padded = len(hf_tokenizer), len(hf_tokenizer) + 15
    config = {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": padded}
    hf = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    randomize(hf)
    hf.save_pretrained(hf_dir)
    shutil.copytree(tokenizer_dir, hf_dir, dirs_exist_ok=True)  # the tokenizer's generation_config.json: eos [2, 0]
    subprocess.run([sys.executable, "-m", "gpt_fast.convert", str(hf_dir), str(out_dir)], check=True,
                   capture_output=True)
    model, tokenizer = load(out_dir, device="cpu", dtype=torch.float32)
    assert isinstance(tokenizer, HuggingFaceTokenizer) and not (out_dir / "tokenizer.model").exists()
    assert (tokenizer.vocab_size, model.args.vocab_size, tokenizer.stop_ids) == (vocab, padded, {2, 0})

    messages = [{"role": "user", "content": "What is the capital of France? Grüße"}]
    prompt = tokenizer.encode_chat(messages)
    assert prompt == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
    hf.generation_config.eos_token_id = None  # exactly 32 tokens, like our ignore_eos run
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                               suppress_tokens=list(range(vocab, padded)))[0, len(prompt):].tolist()
    [completion] = Engine(model, tokenizer, max_batch_size=1, max_seq_len=128).generate(
        [prompt], SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert completion.tokens == expected
    assert completion.text == hf_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("case", ["qwen3_gqa", "gemma2_gqa_window", "mistral_gqa_window"])
def test_single_file_converts_like_shards(converted, case, tmp_path):
    hf, out_dir = converted(case)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes((out_dir / "tokenizer.model").read_bytes())
    single = torch.load(convert(tmp_path / "hf", tmp_path / "out"), weights_only=True)
    sharded = torch.load(out_dir / "model.pth", weights_only=True)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


# The hub's config.json of each family's flagship (the fields that matter; hub configs predate transformers 5).
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
             "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
             "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
             "use_sliding_window": False, "vocab_size": 152064, "eos_token_id": 151645}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
            "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
            "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
             "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 42,
             "num_key_value_heads": 8, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
             "sliding_window": 4096, "vocab_size": 256000}  # no tie_word_embeddings: tied by default
PHI3_MINI_4K = {"architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
                "intermediate_size": 8192, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
                "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
                "vocab_size": 32064}


@pytest.mark.parametrize("config, shape", [(QWEN25_7B, "qwen2.5-7b"), (QWEN3_8B, "qwen3-8b"),
                                           (GEMMA2_9B, "gemma-2-9b"), (PHI3_MINI_4K, "phi-3-mini")])
def test_hub_configs_map_to_the_named_shapes(config, shape):
    args = model_args_from_hf(config)
    assert args == ModelArgs(**NAMED_SHAPES[shape], stop_token_ids=args.stop_token_ids)


def test_longrope_and_sliding_window_mapping():
    # Phi-3.5-mini: 128k context over a trained 4k; its window of 262144 spans the context, so there is none.
    factors = {"long_factor": [1.5] * 48, "short_factor": [1.0] * 48, "type": "longrope"}
    args = model_args_from_hf({**PHI3_MINI_4K, "max_position_embeddings": 131072, "sliding_window": 262144,
                               "rope_scaling": factors})
    assert args.rope_scaling == {"rope_type": "longrope", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48,
                                 "original_max_position_embeddings": 4096,
                                 "attention_factor": pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)}
    assert args.sliding_window is None and args.rotary_dim is None
    # The first Phi-3 128k configs called it "su"; Phi-4-mini rotates three quarters of each head.
    su = model_args_from_hf({**PHI3_MINI_4K, "rope_scaling": {**factors, "type": "su"}, "partial_rotary_factor": 0.75,
                             "max_position_embeddings": 131072})
    assert su.rope_scaling["rope_type"] == "longrope" and su.rotary_dim == 72
    # Qwen2 with use_sliding_window: the layers from max_window_layers on.
    args = model_args_from_hf({**QWEN25_7B, "use_sliding_window": True, "sliding_window": 4096,
                               "max_window_layers": 20})
    assert (args.sliding_window, args.sliding_window_layers) == (4096, list(range(20, 28)))
    # transformers 5 writes layer_types, which win.
    args = model_args_from_hf({**GEMMA2_9B, "layer_types": ["full_attention", "sliding_attention"] * 21})
    assert args.sliding_window_layers == list(range(1, 42, 2))


@pytest.mark.parametrize("overrides, message", [
    ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "attention_bias"),
    ({"architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu"}, "gelu"),
    ({"layer_types": ["chunked_attention"] * 28}, "chunked_attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_args_from_hf({**QWEN25_7B, **overrides})
