"""An inductor graph pass for compiled CPU decode: one-row matmuls become fused multiply-and-sum reductions.

A batch-1 decode step multiplies a single activation row by every weight matrix, so it is bound by how fast the
weights stream from memory. Compiled as calls to oneDNN's GEMV, the stories110M step is ~80% matmul and takes
~1.7-1.9x as long as with each matmul lowered as inductor's own fused, vectorized reduction (BENCHMARKS.md).
Inductor makes that rewrite itself on CUDA (coordinate descent tuning) but not on CPU, where its decompose_mm_pass
option covers matrices up to 2048 wide only and reads its limits once, at import. Matmuls with more rows (prefill,
batched decode, speculative verification) reuse each weight across rows and stay on oneDNN.
"""
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten, prims = torch.ops.aten, torch.ops.prims


def _call(graph: torch.fx.Graph, op: Any, *args: Any) -> torch.fx.Node:
    """A new node op(*args), with the fake value that inductor's lowering reads."""
    node = graph.call_function(op, args)
    node.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
    return node


class MatvecAsReduction(CustomGraphPass):
    """mm(x [1, K], w [K, N]) on CPU -> sum(x[:, :, None] * w[None], dim=1) in fp32, cast back to x's dtype (the
    rewrite inductor's own mm decomposition makes). Set as inductor's `post_grad_custom_pre_pass`."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.find_nodes(op="call_function", target=aten.mm.default):
            x, w = node.args
            dtype = x.meta["val"].dtype
            if x.meta["val"].device.type != "cpu" or not statically_known_true(x.meta["val"].shape[0] == 1):
                continue
            with graph.inserting_before(node):
                x32 = _call(graph, prims.convert_element_type.default, x, torch.float32)
                w32 = _call(graph, prims.convert_element_type.default, w, torch.float32)
                product = _call(graph, aten.mul.Tensor, _call(graph, aten.unsqueeze.default, x32, 2),
                                _call(graph, aten.unsqueeze.default, w32, 0))
                row = _call(graph, aten.sum.dim_IntList, product, [1])
                node.replace_all_uses_with(_call(graph, prims.convert_element_type.default, row, dtype))
            graph.erase_node(node)

    def uuid(self) -> Any:
        # Part of the compile cache key: a cached graph compiled without (or with an older) pass is not reused.
        return get_hash_for_files((__file__,))
