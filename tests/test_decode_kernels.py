"""The CPU decode step's own forms of attention and matmul give what the library ops give."""
import copy

import pytest
import torch
import torch.nn.functional as F

from gpt_fast.engine.runner import ModelRunner
from gpt_fast.model import cpu_kernels
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.layers import Linear
from gpt_fast.model.matvec import MatvecAsReduction
from gpt_fast.model.quantized import pack_for_device
from gpt_fast.model.transformer import Transformer, explicit_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_explicit_attention_equals_sdpa(dtype, rows):
    """Few-row CPU steps skip SDPA: same output with grouped kv heads, two batch rows at different lengths, and
    cache positions beyond a row's length masked out."""
    torch.manual_seed(0)
    batch, n_head, n_kv, head_dim, n_keys = 2, 6, 2, 16, 40
    q = torch.randn(batch, n_head, rows, head_dim, dtype=dtype)
    keys, values = (torch.randn(batch, n_kv, n_keys, head_dim, dtype=dtype) for _ in range(2))
    last = torch.tensor([[30 + t for t in range(rows)], [5 + t for t in range(rows)]])  # each query's position
    mask = (torch.arange(n_keys) <= last[..., None]).unsqueeze(1)
    expected = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=0.25,
                                              enable_gqa=True)
    got = explicit_attention(q, keys, values, mask, 0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=0)))


def test_few_row_mm_and_bmm_compile_to_reductions_with_the_same_result():
    """The compile pass rewrites mm and bmm of up to 4 rows (and leaves wider ones to oneDNN): results equal eager."""
    torch.manual_seed(0)

    def step(x, w, q, k):
        return x @ w, q @ k

    compiled = torch.compile(step, fullgraph=True, options={"post_grad_custom_pre_pass": MatvecAsReduction()})
    for rows in (1, 3, 6):
        x, w = torch.randn(rows, 64), torch.randn(64, 48)
        q, k = torch.randn(4, rows, 16), torch.randn(4, 16, 24)
        for got, expected in zip(compiled(x, w, q, k), step(x, w, q, k)):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not cpu_kernels.bf16_available(), reason="no AVX-512 BF16 CPU or no C++ compiler")
def test_bf16_decode_kernel_gives_the_library_products():
    """The bf16 kernel of few-row steps rounds the same fp32 sums as F.linear (in one pass over the weights or two:
    9 rows); a packed Linear uses it, bias added, for steps of up to MAX_ROWS rows, eager or compiled, and F.linear
    beyond."""
    torch.manual_seed(0)
    n, k = 200, 576
    weight = torch.randn(n, k).to(torch.bfloat16)
    for rows in range(1, 10):
        x = torch.randn(rows, k).to(torch.bfloat16)
        got = torch.ops.gpt_fast.bf16_matvec(x, weight)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        torch.testing.assert_close(got, F.linear(x.float(), weight.float()).to(torch.bfloat16))
    module = Linear(k, n, bias=True, dtype=torch.bfloat16)
    module.pack()
    assert module.bf16_decode
    x = torch.randn(2, 3, cpu_kernels.MAX_ROWS + 1, k).to(torch.bfloat16)
    kernel = lambda rows: torch.ops.gpt_fast.bf16_matvec(rows, module.weight) + module.bias  # noqa: E731
    assert torch.equal(module(x[0, :, :2]), kernel(x[0, :, :2].reshape(6, k)).view(3, 2, n))
    assert torch.equal(module(x[0]), F.linear(x[0], module.weight, module.bias))
    compiled = torch.compile(module, fullgraph=True)
    assert torch.equal(compiled(x[1, :2, :3]), kernel(x[1, :2, :3].reshape(6, k)).view(2, 3, n))
    assert torch.equal(compiled(x[1, 0]), F.linear(x[1, 0], module.weight, module.bias))


@pytest.mark.skipif(not cpu_kernels.bf16_available(), reason="no AVX-512 BF16 CPU or no C++ compiler")
@pytest.mark.parametrize("n_head, n_kv, head_dim, rows, n_keys", [(9, 3, 64, 1, 200), (9, 3, 64, 5, 37),
                                                                  (4, 4, 96, 1, 5), (4, 4, 96, 8, 20),
                                                                  (8, 2, 128, 2, 300)])
def test_decode_attention_kernel_rounds_as_explicit_attention(n_head, n_kv, head_dim, rows, n_keys):
    """The CPU attention kernel of few-row bf16 steps (GQA or not, cache prefixes shorter than a pass of 8 keys or
    not a multiple of 16, head sizes of 2 or 3 vectors a half) reads keys and values in place from a longer cache
    and gives explicit_attention's bf16 outputs: bit for bit but for a rare last-place difference."""
    torch.manual_seed(0)
    batch = 2
    cache = torch.randn(2, batch + 1, n_kv, n_keys + 20, head_dim).to(torch.bfloat16)
    keys, values = cache[0, :batch, :, :n_keys], cache[1, :batch, :, :n_keys]
    q = torch.randn(batch, rows, n_head, head_dim).mul(3).to(torch.bfloat16).transpose(1, 2)
    last = torch.tensor([n_keys - 1, n_keys // 2])[:, None] - torch.arange(rows - 1, -1, -1)  # each query's position
    mask = (torch.arange(n_keys) <= last[..., None]).unsqueeze(1)
    got = torch.ops.gpt_fast.decode_attention(q, keys, values, mask, head_dim ** -0.5)
    expected = explicit_attention(q, keys, values, mask, head_dim ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    assert (got == expected).float().mean() > 0.999


@pytest.mark.skipif(not cpu_kernels.bf16_available(), reason="no AVX-512 BF16 CPU or no C++ compiler")
def test_cpu_steps_attend_through_the_kernel_eager_and_compiled():
    """A bf16 model packed on a CPU with AVX-512 BF16 runs its few-row steps' attention in the kernel, eager and
    compiled: decode and 4-token steps of two sequences at different lengths give the logits and greedy tokens of
    the written-out attention."""
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layer=2, n_head=4, n_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=512)
    reference = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    packed = copy.deepcopy(reference)
    pack_for_device(packed)
    assert all(layer.attention.decode_kernel for layer in packed.layers)
    runners = [ModelRunner(reference, 2, 64), ModelRunner(packed, 2, 64),
               ModelRunner(copy.deepcopy(packed), 2, 64, compile=True)]
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (20, 33)]
    for runner in runners:
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt, 0)
    start = torch.tensor([len(p) for p in prompts])[:, None]  # each sequence's next position
    for width in (1, 1, 4):
        tokens, positions = torch.randint(0, 512, (2, width)), start + torch.arange(width)
        expected, *got = [runner.rows(tokens, positions, 64) for runner in runners]
        for logits in got:
            torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        start = start + width
