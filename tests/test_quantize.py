"""Weight-only int8 / int4: accuracy against the unquantized model, quantized checkpoints, errors, eval."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.quantize import quantize_checkpoint
from gpt_fast.checkpoints.tiny import CORPUS
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.eval import perplexity
from gpt_fast.model import cpu_kernels
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.quantized import WeightOnlyInt4Linear, WeightOnlyInt8Linear, quantize_model
from gpt_fast.model.transformer import Transformer
from gpt_fast.text.tokenizer import load_tokenizer

PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]
# Shapes the kernels cannot take as they are: 688 is no multiple of 32 (w2's input is padded), nor 1000 of 16
# (the output layer's rows are padded).
RANDOM_ARGS = dict(dim=256, n_layer=2, n_head=4, n_kv_heads=2, head_dim=64, intermediate_size=688, vocab_size=1000)


def random_model(**overrides) -> Transformer:
    # PyTorch's default init: as in trained models, the embedding dominates the residual stream, so the error
    # is mostly each matrix's own (for Gaussian weights ~0.7% for int8, ~8% for int4 g32).
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**RANDOM_ARGS, **overrides}))
    model.tie_weights()
    return model.eval().requires_grad_(False)


def logits(model: Transformer) -> torch.Tensor:
    torch.manual_seed(1)
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    model.setup_caches(2, 32)
    return model(tokens, torch.arange(24).expand(2, 24), torch.arange(2))


def dequantized_int4(pairs: torch.Tensor, scales_and_zeros: torch.Tensor, groupsize: int = 32) -> torch.Tensor:
    """The weights [out, in_padded] that device-neutral int4 buffers stand for: two codes a byte, high nibble first,
    and w = (code - 8) * scale + zero per group of inputs."""
    codes = torch.stack([pairs >> 4, pairs & 15], dim=-1).flatten(1).float()
    scales, zeros = (scales_and_zeros[..., i].float().t().repeat_interleave(groupsize, dim=1) for i in (0, 1))
    return (codes - 8) * scales + zeros


def relative_error(model: Transformer, mode: str, groupsize=None) -> float:
    ref = logits(model)
    out = logits(quantize_model(copy.deepcopy(model), mode, groupsize))
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def greedy(model: Transformer, tokenizer, prompts=PROMPTS, n: int = 64) -> list[list[int]]:
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)
    ids = [tokenizer.encode(p) for p in prompts]
    return [c.tokens for c in engine.generate(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))]


def test_int8_logits_within_2_percent():
    assert relative_error(random_model(), "int8") < 0.02


def test_int4_g32_logits_within_10_percent():
    model = random_model()
    err = relative_error(model, "int4", 32)
    assert err < 0.10
    assert relative_error(model, "int8") < err < relative_error(model, "int4", 256)  # coarser groups, more error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compute_the_dequantized_matmul(dtype, monkeypatch):
    """The kernels against x @ dequantized(W).T written out from the stored codes, at shapes they cannot take
    as they are (in_features 200: bf16 int8 on CPU reads past the end unless padded to 208; int4 pads to 224, or
    to 256 for cpu_kernels' int4 kernel, which is checked beside the library's one that CPUs without it use)."""
    torch.manual_seed(0)
    linear = nn.Linear(200, 100, bias=False).to(dtype).requires_grad_(False)
    x = torch.randn(3, 5, 200, dtype=dtype)
    q8 = WeightOnlyInt8Linear.from_linear(linear)
    assert q8.weight.shape == (100, 208)
    w8 = q8.weight[:, :200].float() * q8.scales.float()[:, None]
    torch.testing.assert_close(q8(x).float(), x.float() @ w8.T, rtol=1e-2, atol=1e-2)

    q4 = WeightOnlyInt4Linear.from_linear(linear, 32)
    expected = x.float() @ dequantized_int4(q4.weight, q4.scales_and_zeros)[:, :200].T
    for vnni in sorted({False, cpu_kernels.available()}):
        packed = copy.deepcopy(q4)
        with monkeypatch.context() as patch:
            patch.setattr(cpu_kernels, "available", lambda: vnni)
            packed.pack()
        assert packed.vnni_kernel == vnni and packed(x).shape == (3, 5, 100)
        if vnni:  # it rounds the activations to int8, as llama.cpp does: ~1% of the output's norm
            assert (packed(x).float() - expected).norm() / expected.norm() < 0.015
        else:
            torch.testing.assert_close(packed(x).float(), expected, rtol=1e-2, atol=1e-2)


def test_greedy_tokens_agree_on_tiny_model(tiny_checkpoint, tokenizer):
    """The tiny model's planted rule keeps top-1 >= ~2.2 logits above top-2 on these continuations, while int4
    g32 moves a logit by at most ~0.65 (int8 ~0.1): a flip needs the two errors to cover the margin, so all
    64 tokens agree (measured 1.0). 0.95 leaves room for other torch versions' kernels, not for a broken scheme:
    one flipped token changes the context, and a wrong kernel scrambles nearly every token after it."""
    model = lambda: load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)  # noqa: E731
    ref = greedy(model(), tokenizer)
    for mode, groupsize in [("int8", None), ("int4", 32)]:
        out = greedy(quantize_model(model(), mode, groupsize), tokenizer)
        agree = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o)) / (64 * len(ref))
        assert agree >= 0.95, (mode, agree)


def test_int4_file_loads_and_matches_in_memory(tiny_checkpoint, tokenizer, tmp_path):
    out = quantize_checkpoint(tiny_checkpoint, "int4", 32, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"mode": "int4", "groupsize": 32}
    assert (out / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    state = torch.load(out / "model.pth", weights_only=True)
    # Device-neutral codes (two per byte), w2's input padded 344 -> 352; the embedding is not quantized.
    assert state["layers.0.feed_forward.w2.weight"].dtype == torch.uint8
    assert state["layers.0.feed_forward.w2.weight"].shape == (128, 352 // 2)
    assert state["tok_embeddings.weight"].dtype == torch.float32
    loaded = load_model(out / "model.pth", device="cpu", dtype=torch.float32)
    assert loaded.args.quantization == {"mode": "int4", "groupsize": 32}
    in_memory = quantize_model(load_model(tiny_checkpoint, device="cpu", dtype=torch.float32), "int4", 32)
    assert greedy(loaded, tokenizer) == greedy(in_memory, tokenizer)
    # Packed weights are device-specific and never saved: a packed model's state_dict has none.
    assert "output.weight" not in loaded.state_dict()


def test_quantized_copy_keeps_a_tokenizer_json_tokenizer(chat_checkpoint, tmp_path):
    out = quantize_checkpoint(chat_checkpoint, "int8", out_dir=tmp_path / "q")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (chat_checkpoint / name).read_bytes()
    assert load_tokenizer(out).chat_template is not None


def test_tied_embeddings_quantize_a_separate_output(tmp_path, tiny_checkpoint):
    model = random_model(tie_embeddings=True)
    src = tmp_path / "tied"
    src.mkdir()
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    torch.save(state, src / "model.pth")
    model.args.save(src / "config.json")
    (src / "tokenizer.model").write_bytes((tiny_checkpoint / "tokenizer.model").read_bytes())
    out = quantize_checkpoint(src, "int8")
    assert out == tmp_path / "tied-int8"
    loaded = load_model(out, device="cpu", dtype=torch.float32)
    assert isinstance(loaded.output, WeightOnlyInt8Linear)
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)
    ref = logits(model)
    assert float((logits(loaded) - ref).norm() / ref.norm()) < 0.02


def test_engine_batched_equals_solo_quantized(tiny_checkpoint, tokenizer):
    for mode, groupsize in [("int8", None), ("int4", 64)]:
        model = quantize_model(load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16), mode, groupsize)
        engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        params = [SamplingParams(max_new_tokens=n, temperature=t, seed=7) for n, t in
                  [(12, 0.0), (20, 0.8), (5, 0.0), (16, 1.2)]]
        solo = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
        assert [c.tokens for c in engine.generate(prompts, params)] == solo


def rounded_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the CPU kernels see it: each block of 32 values rounded to int8 steps of its largest / 127."""
    blocks = x.float().view(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.where(step > 0, (blocks / step).round(), 0) * step).view(x.shape)


def assert_rounded_products(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A packed layer's outputs are the int8-rounded activations times `weight` plus `bias`, to the bf16 output's
    rounding, at 1-9 rows (one pass over the weights, two) and 70 (tiles), with a block of zero activations and an
    outlier; compiled equals eager."""
    compiled = torch.compile(module, fullgraph=True)
    for rows in [*range(1, 10), 70]:
        x = torch.randn(rows, module.in_features).to(torch.bfloat16)
        x[0, :64] = 0
        x[-1, 100] = 40.0
        expected = rounded_to_int8_blocks(x) @ weight.T + bias.float()
        got = module(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, module.out_features)
        errors = (got.float() - expected).norm(dim=1) / expected.norm(dim=1)
        assert errors.max() < 6e-3, errors
        if rows in (3, 70):
            assert torch.equal(compiled(x), got)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX-512 VNNI CPU or no C++ compiler")
def test_int8_kernel_rounds_only_the_activations():
    """The int8 kernel: int8-rounded activations times the int8 weights and their scales, at every row count."""
    torch.manual_seed(0)
    module = WeightOnlyInt8Linear.from_linear(nn.Linear(576, 200, bias=True).to(torch.bfloat16))
    weight = module.weight.float() * module.scales.float()[:, None]
    module.pack()
    assert module.vnni_kernel
    assert_rounded_products(module, weight, module.bias)


@pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX-512 VNNI CPU or no C++ compiler")
@pytest.mark.parametrize("k", [576, 960])
def test_int4_kernel_rounds_only_the_activations(k):
    """The int4 kernel: int8-rounded activations times the dequantized weights, at every row count, for 576 inputs
    (a superblock of 512 and a part of 2 blocks x 8 lanes) and 960 (a superblock and parts of 8 x 2, 4 x 4 and
    2 x 8 lanes); a weight row of zeros gives exactly 0 (its groups are stored as code 0, scale 1, zero 8)."""
    torch.manual_seed(0)
    n = 200
    linear = nn.Linear(k, n, bias=True).to(torch.bfloat16).requires_grad_(False)
    linear.weight[7] = 0
    module = WeightOnlyInt4Linear.from_linear(linear, 32)
    weight = dequantized_int4(module.weight, module.scales_and_zeros)
    module.pack()
    assert module.vnni_kernel
    assert_rounded_products(module, weight, linear.bias)
    assert torch.equal(module(torch.randn(70, k).to(torch.bfloat16))[:, 7], linear.bias[7].expand(70))


def test_bad_input_is_rejected_clearly(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        quantize_model(random_model(), "int3")
    with pytest.raises(ValueError, match="groupsize must be one of 32, 64, 128, 256, got 48"):
        quantize_checkpoint(tiny_checkpoint, "int4", 48, tmp_path / "x")
    with pytest.raises(ValueError, match="groupsize applies to int4 only"):
        quantize_model(random_model(), "int8", 32)
    done = quantize_checkpoint(tiny_checkpoint, "int8", out_dir=tmp_path / "q8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(done, "int4", 32, tmp_path / "twice")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(load_model(done, device="cpu"), "int8")
    config = json.loads((done / "config.json").read_text())
    (done / "config.json").write_text(json.dumps({**config, "quantization": {"mode": "int2"}}))
    with pytest.raises(ValueError, match="unknown quantization mode 'int2'"):
        load_model(done, device="cpu")
    assert not (tmp_path / "x").exists() and not (tmp_path / "twice").exists()


def test_cli_progress_and_errors(tiny_checkpoint, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt_fast.quantize", str(tiny_checkpoint), *args],
                              capture_output=True, text=True)

    ok = run("--mode", "int4", "--groupsize", "64", "--out", str(tmp_path / "q"))
    assert ok.returncode == 0, ok.stderr
    assert "quantized layer 1/2" in ok.stderr and "quantized layer 2/2" in ok.stderr
    bad = run("--mode", "int4", "--groupsize", "100", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "groupsize must be one of" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("--mode", "fp8")
    assert bad.returncode != 0 and "invalid choice: 'fp8'" in bad.stderr


def test_weight_bytes_count_quantized_widths():
    args = ModelArgs(**RANDOM_ARGS)
    bf16 = args.weight_bytes(2)
    assert ModelArgs(**RANDOM_ARGS, quantization={"mode": "int8"}).weight_bytes(2) == bf16 / 2
    assert ModelArgs(**RANDOM_ARGS, quantization={"mode": "int4", "groupsize": 32}).weight_bytes(4) == bf16 * 0.3125


def test_perplexity_scores_every_token_once_and_quantization_moves_it_little(tiny_checkpoint, tokenizer):
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8")[:4000])
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    ppl, count = perplexity(model, ids, 256)
    assert count == len(ids) - 1 and perplexity(model, ids, 100)[1] == len(ids) - 1
    ppl8, _ = perplexity(quantize_model(model, "int8"), ids, 256)
    assert abs(ppl8 / ppl - 1) < 0.01


def test_eval_cli(tiny_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "gpt_fast.eval", str(tiny_checkpoint), "--text", str(text),
                          "--device", "cpu", "--max-seq-len", "128", "--quantize", "int4", "--groupsize", "32"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("perplexity ") and "int4-g32" in out.stdout
