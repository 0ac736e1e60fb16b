"""An inductor graph pass for compiled CPU decode: matmuls of a few rows become fused multiply-and-sum reductions.

A decode step multiplies one activation row per request by every weight matrix, so it is bound by how fast the
weights stream from memory. Compiled as calls to oneDNN, the stories110M batch-1 step is ~80% matmul and takes
~1.7-1.9x as long as with each matmul lowered as inductor's own fused, vectorized reduction, and a 2-row step
(batch 2, or a draft model's first speculative step) cost 1.6 batch-1 steps (BENCHMARKS.md). Inductor makes the
one-row rewrite itself on CUDA (coordinate descent tuning) but not on CPU, where its decompose_mm_pass option
covers matrices up to 2048 wide only and reads its limits once, at import. Here each of the M rows is its own
reduction over the same weight, and inductor fuses them into one loop that reads each weight element once for
all M rows. Matmuls with more rows (prefill, larger batches, speculative verification of 5 tokens) stay on oneDNN.
On CPUs with AVX-512 BF16, bf16 layers call their own kernel instead (cpu_kernels.py: faster still), and the pass
keeps attention's few-row bmm and every other case.
"""
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._prims_common import make_contiguous_strides_for
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten, prims = torch.ops.aten, torch.ops.prims

# Stories110M-shaped compiled steps on 2 AVX-512 cores: fused loops beat oneDNN 1.7x at 2 rows, 1.2x at 3, tie at 4
# and lose at 5, where each row's multiply-adds, not memory, bound the loop (BENCHMARKS.md).
MAX_ROWS = 4


def _call(graph: torch.fx.Graph, op: Any, *args: Any) -> torch.fx.Node:
    """A new node op(*args), with the fake value that inductor's lowering reads."""
    node = graph.call_function(op, args)
    node.meta["val"] = op(*torch.fx.node.map_arg(args, lambda a: a.meta["val"]))
    return node


class MatvecAsReduction(CustomGraphPass):
    """mm(x [M, K], w [K, N]) on CPU with M <= MAX_ROWS -> the M rows sum(x[m, :, None] * w, dim=0) in fp32, cast
    back to x's dtype (per row, the rewrite inductor's own mm decomposition makes); bmm likewise per batch entry
    (attention's few query rows per kv head). Set as inductor's `post_grad_custom_pre_pass`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in [*graph.find_nodes(op="call_function", target=aten.mm.default),
                     *graph.find_nodes(op="call_function", target=aten.bmm.default)]:
            x, w = node.args
            x_val = x.meta["val"]
            rows_dim = x_val.dim() - 2  # mm: x [M, K] @ w [K, N]; bmm: x [B, M, K] @ w [B, K, N]
            if x_val.device.type != "cpu" or not statically_known_true(x_val.shape[rows_dim] <= MAX_ROWS):
                continue
            with graph.inserting_before(node):
                x32, w32 = (_call(graph, prims.convert_element_type.default, t, torch.float32) for t in (x, w))
                # The rows are written to memory once: inlined, whatever produced them (a norm) would be recomputed
                # for every output of the matmul (0.5 ms of SmolLM2's 1.7 ms logits layer). Static shapes only: a
                # dynamic size cannot be a stride argument.
                if all(isinstance(size, int) for size in x_val.shape):
                    x32 = _call(graph, prims.inductor_force_stride_order.default, x32,
                                make_contiguous_strides_for(x_val.shape))
                rows = []
                for m in range(int(x_val.shape[rows_dim])):
                    x_m = _call(graph, aten.select.int, x32, rows_dim, m)
                    product = _call(graph, aten.mul.Tensor, _call(graph, aten.unsqueeze.default, x_m, -1), w32)
                    row = _call(graph, aten.sum.dim_IntList, product, [rows_dim])
                    rows.append(_call(graph, aten.unsqueeze.default, row, rows_dim))
                out = _call(graph, aten.cat.default, rows, rows_dim)
                node.replace_all_uses_with(_call(graph, prims.convert_element_type.default, out, x_val.dtype))
            graph.erase_node(node)

    def uuid(self) -> Any:
        # Part of the compile cache key: a cached graph compiled without (or with an older) pass is not reused.
        return get_hash_for_files((__file__,))
