"""HF -> gpt_fast conversion: logits and greedy tokens match transformers on tiny random Llama/Mistral models."""
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from hf_tokenizers import byte_level
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from gpt_fast.arch import model_args_from_hf
from gpt_fast.checkpoints.convert import convert, find_tokenizer
from gpt_fast.checkpoints.download import select_files
from gpt_fast.checkpoints.load import load, load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.hf_tokenizer import HuggingFaceTokenizer
from gpt_fast.text.tokenizer import load_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, rms_norm_eps=1e-5)
CASES = {
    "llama2_mha": (LlamaForCausalLM, LlamaConfig, {}, "safetensors"),
    # original_max_position_embeddings=64 with theta 5e5 and head_dim 16 puts rotary pairs in all three
    # llama3 bands (kept, interpolated, divided by factor).
    "llama31_gqa_rope_scaling": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}), "sharded_safetensors"),
    "tied_embeddings": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True), "bin"),
    "head_dim_24_linear_rope": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=2, head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0}), "sharded_bin"),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=1, sliding_window=None), "safetensors"),
}


@pytest.fixture(scope="session")
def sp_model_bytes(tiny_checkpoint: Path) -> bytes:
    return (tiny_checkpoint / "tokenizer.model").read_bytes()


def randomize(model: torch.nn.Module) -> None:
    """Weights big enough that greedy argmax margins are wide, and norms not all ones so a swap shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def save_bin(model: torch.nn.Module, hf_dir: Path, n_shards: int) -> None:
    # transformers 5 only writes safetensors; write the legacy pytorch_model*.bin layout by hand.
    for f in hf_dir.glob("model*.safetensors*"):
        f.unlink()
    state = model.state_dict()
    if n_shards == 1:
        torch.save(state, hf_dir / "pytorch_model.bin")
        return
    # Round-robin puts a layer's q, k and v in different shards.
    names = list(state)
    files = [f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin" for i in range(n_shards)]
    for i, file in enumerate(files):
        torch.save({n: state[n] for n in names[i::n_shards]}, hf_dir / file)
    weight_map = {n: files[j % n_shards] for j, n in enumerate(names)}
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def make_hf_checkpoint(case: str, hf_dir: Path, sp_model: bytes) -> torch.nn.Module:
    cls, config_cls, overrides, fmt = CASES[case]
    vocab = spm.SentencePieceProcessor(model_proto=sp_model).vocab_size()
    model = cls(config_cls(**SMALL, **overrides, vocab_size=vocab)).eval()
    randomize(model)
    model.save_pretrained(hf_dir, max_shard_size="100KB" if fmt == "sharded_safetensors" else "50GB")
    if fmt == "sharded_safetensors":
        assert len(list(hf_dir.glob("model-*.safetensors"))) >= 3
        # Hub configs (e.g. Llama 3.1) use the pre-transformers-5 keys rope_theta + rope_scaling.
        cfg = json.loads((hf_dir / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        (hf_dir / "config.json").write_text(json.dumps(cfg))
    elif fmt in ("bin", "sharded_bin"):
        save_bin(model, hf_dir, 1 if fmt == "bin" else 3)
    (hf_dir / "tokenizer.model").write_bytes(sp_model)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case: str, tmp_path: Path, sp_model_bytes: bytes) -> None:
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    hf = make_hf_checkpoint(case, hf_dir, sp_model_bytes)
    assert convert(hf_dir, out_dir) == out_dir / "model.pth"
    model = load_model(out_dir, device="cpu", dtype=torch.float32)
    assert model.args.tie_embeddings == hf.config.tie_word_embeddings
    assert model.args.tokenizer == "sentencepiece"
    assert (out_dir / "tokenizer.model").read_bytes() == sp_model_bytes

    assert_matches_transformers(hf, model, out_dir)


def assert_matches_transformers(hf, model: Transformer, out_dir: Path) -> None:
    """fp32 logits of a random prompt within 1e-4 relative error of hf's, and 32 greedy tokens identical to
    hf.generate (tests/test_mixtral.py uses it too)."""
    prompt = torch.randint(3, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits
        model.setup_caches(1, 256)
        ours = model(torch.tensor([prompt]), positions=torch.arange(len(prompt))[None], slots=torch.tensor([0]))
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4

    # Without an eos id HF generates exactly max_new_tokens (never stopping early), like our ignore_eos run.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)[0, len(prompt):]
    assert len(hf_tokens) == 32
    tokenizer = load_tokenizer(out_dir, model.args.tokenizer, model.args.stop_token_ids)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=256, compile=False)
    [completion] = engine.generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True))
    assert completion.tokens == hf_tokens.tolist()


def test_bf16_is_kept(tmp_path: Path, sp_model_bytes: bytes) -> None:
    hf_dir = tmp_path / "hf"
    make_hf_checkpoint("llama2_mha", hf_dir, sp_model_bytes)
    path = hf_dir / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    state = torch.load(convert(hf_dir, tmp_path / "out"), weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def llama31_config(**overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 128001,
              "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    return {**config, **overrides}


def test_config_mapping() -> None:
    args = model_args_from_hf(llama31_config(), {"eos_token_id": [128001, 128008, 128009]})
    expected = ModelArgs(**{**NAMED_SHAPES["llama-3.1-8b"], "tokenizer": "sentencepiece"},
                         stop_token_ids=[128001, 128008, 128009])
    assert args == expected
    assert model_args_from_hf(llama31_config()).stop_token_ids == [128001]
    assert model_args_from_hf(llama31_config(rope_scaling=None)).rope_scaling is None

    mistral = llama31_config(architectures=["MistralForCausalLM"], sliding_window=4096, max_position_embeddings=32768,
                             num_key_value_heads=None, head_dim=None, rope_scaling={"type": "linear", "factor": 2.0})
    args = model_args_from_hf(mistral)
    # The whole context, every layer sliding over the last 4096 positions (the mask does it, the cache keeps all).
    assert (args.max_position_embeddings, args.sliding_window, args.sliding_window_layers) == (32768, 4096, None)
    assert args.n_kv_heads == 32 and args.head_dim == 128
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("overrides, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
     "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Phi3ForCausalLM"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_config(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_args_from_hf(llama31_config(**overrides))


def test_missing_inputs(tmp_path: Path, sp_model_bytes: bytes) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        convert(tmp_path / "nope", tmp_path / "out")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(hf_dir, tmp_path / "out")
    config = {**SMALL, "vocab_size": 320, "architectures": ["LlamaForCausalLM"]}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        convert(hf_dir, tmp_path / "out")
    (hf_dir / "tokenizer.model").write_bytes(sp_model_bytes)
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_weight_name(tmp_path: Path, sp_model_bytes: bytes) -> None:
    hf_dir = tmp_path / "hf"
    make_hf_checkpoint("llama2_mha", hf_dir, sp_model_bytes)
    path = hf_dir / "model.safetensors"
    save_file({**load_file(path), "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, path,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unknown weight names \['model.layers.0.self_attn.q_norm.weight'\]"):
        convert(hf_dir, tmp_path / "out")


def test_missing_weight(tmp_path: Path, sp_model_bytes: bytes) -> None:
    hf_dir = tmp_path / "hf"
    make_hf_checkpoint("llama2_mha", hf_dir, sp_model_bytes)
    path = hf_dir / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*layers.1.attention.wqkv.weight"):
        convert(hf_dir, tmp_path / "out")


def test_find_tokenizer(tmp_path: Path) -> None:
    # Llama 3 repos keep the tiktoken BPE file (lines of `base64 rank`) in original/.
    (tmp_path / "original").mkdir()
    path = tmp_path / "original" / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    assert find_tokenizer(tmp_path) == (path, "tiktoken")
    (tmp_path / "tokenizer.model").write_text("not a tokenizer\n")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken"):
        find_tokenizer(tmp_path)


def test_download_selects_only_needed_files() -> None:
    # tokenizer.json (with its config and chat template) when the repo has one, as the converter prefers it.
    mistral = ["config.json", "generation_config.json", "consolidated.safetensors", "params.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "tokenizer.model", "tokenizer.model.v3", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"]
    assert select_files(mistral) == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                     "tokenizer.json", "tokenizer_config.json"]
    llama3 = ["config.json", "model.safetensors", "original/consolidated.00.pth", "original/params.json",
              "original/tokenizer.model", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert select_files(llama3) == ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"]
    llama3_meta = ["config.json", "model.safetensors", "original/tokenizer.model"]
    assert select_files(llama3_meta) == llama3_meta
    old = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
           "pytorch_model.bin.index.json", "tokenizer.model"]
    assert select_files(old) == old
    with pytest.raises(ValueError, match="no weights"):
        select_files(["config.json", "tokenizer.model", "consolidated.safetensors"])


def test_tokenizer_json_checkpoint(tmp_path: Path, sp_model_bytes: bytes) -> None:
    # SmolLM2, Qwen, Llama 3 repos: tokenizer.json (+ its config, chat template, generation config), here next to a
    # tokenizer.model too: tokenizer.json wins, as AutoTokenizer reads it.
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    make_hf_checkpoint("llama2_mha", hf_dir, sp_model_bytes)
    byte_level(hf_dir, vocab_size=300)
    (hf_dir / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}")
    convert(hf_dir, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["chat_template.jinja", "config.json",
                                                         "generation_config.json", "model.pth", "tokenizer.json",
                                                         "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out_dir / name).read_bytes() == (hf_dir / name).read_bytes()
    model, tokenizer = load(out_dir, device="cpu", dtype=torch.float32)
    assert model.args.tokenizer == "huggingface" and isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.stop_ids == {2, 0} and not tokenizer.add_bos
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == [1] + tokenizer.encode("hi")
    (hf_dir / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        convert(hf_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
