"""The CPU decode step's own forms of attention and matmul give what the library ops give."""
import pytest
import torch
import torch.nn.functional as F

from gpt_fast.model import cpu_kernels
from gpt_fast.model.layers import Linear
from gpt_fast.model.matvec import MatvecAsReduction
from gpt_fast.model.transformer import explicit_attention


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
