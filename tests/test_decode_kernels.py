"""The CPU decode step's own forms of attention and matmul give what the library ops give."""
import pytest
import torch
import torch.nn.functional as F

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
