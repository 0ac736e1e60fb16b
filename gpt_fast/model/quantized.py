"""Weight-only quantized Linear layers (int8, grouped int4) and the pass that swaps them into a Transformer.

At batch 1, decode reads every weight once per token, so tokens/s is bounded by bandwidth / bytes of weights:
int8 halves those bytes and int4 quarters them. Activations stay in the model dtype, except inside int4 matmuls,
which run in bf16 on both devices, and cpu_kernels.py's int8 and int4 kernels, which round them to int8 in blocks
of 32 (as llama.cpp does).

Kernels: int8 uses cpu_kernels.py's VNNI kernel on CPUs with AVX-512 VNNI in bf16, else aten._weight_int8pack_mm
on CPU in bf16, and dequantize+matmul otherwise (gpt-fast's form, fused by inductor); int4 uses
_weight_int4pack_mm (CUDA tinygemm) or, on CPU, cpu_kernels.py's VNNI kernel (any number of rows) where the CPU has
it and else the kernel behind _weight_int4pack_mm_for_cpu (quantized::int4mm_packed_weight_cpu, which takes its
group size as a tensor).

Every nn.Linear is quantized: the attention and MLP projections and the output layer (the largest matrix of a
128k-vocabulary model). The embedding stays in the model dtype: a token reads one row of it, not the matrix.
With tied embeddings the output layer gets its own quantized copy and the embedding keeps the original.
Mixture-of-experts layers get int8 experts (int4 experts are not implemented) and keep their router unquantized:
it is tiny, and rounding it would change which experts run.

int4 weights are stored device-neutral (two 4-bit codes per byte, row-major, the even column in the high
nibble: the layout CUDA's packing op takes) and packed for the device's kernel by pack_for_device().

A Linear's bias, if it has one, stays in the model dtype and is added after the quantized matmul.
"""
import sys
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels
from .args import quantization_scheme
from .layers import Linear, ShardableLinear
from .transformer import Attention, MoEFeedForward, Transformer

INT8_PAD_IN = 16  # the CPU int8 kernel in bf16 reads K in blocks of 16: other K read past the end (torch 2.13)
INT4_PAD_OUT = 16  # the library's CPU int4 kernel needs N % 16 == 0, tinygemm (CUDA) N % 8 == 0
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # MoEFeedForward's stacked expert matrices


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _nonzero(scales: Tensor) -> Tensor:
    # An all-zero row or group would divide by 0; any scale reproduces its zeros.
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _int8_per_row(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes for w [..., out, in] and their scales [..., out], in w's dtype."""
    # Round the scales to the model dtype first, so the codes are computed against the scales actually used.
    scales = _nonzero((w.detach().float().abs().amax(dim=-1) / 127).to(w.dtype))
    codes = (w.detach().float() / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scales


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] times int8 weight [N, K] (transposed) times scales [N] -> [M, N] in x's dtype."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[-1] % INT8_PAD_IN == 0:
        # The CPU kernel reads int8 directly. Compiled in bf16, inductor lowers the form below to it anyway;
        # called directly it is fast in eager too. In fp32 it is 3x slower than the form below at batch 1 and
        # 20x at prefill (measurements in BENCHMARKS.md).
        return torch.ops.aten._weight_int8pack_mm(x, weight, scales)
    # gpt-fast's form: inductor fuses the conversion and the scaling into the matmul.
    return F.linear(x, weight.to(x.dtype)) * scales


def _flat_padded(x: Tensor, size: int) -> Tensor:
    """x [..., k] as [M, size], zero-padded: padded weight columns then add nothing."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _int4_op(name: str) -> Callable:
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        raise RuntimeError(f"int4 needs torch.ops.aten.{name}, which torch {torch.__version__} does not have "
                           "(CPU needs torch >= 2.6, CUDA torch >= 2.5); use int8 or upgrade torch")
    return op


def _empty_bias(module: nn.Module, bias: bool, out_features: int, dtype: Optional[torch.dtype],
                device: Optional[torch.device]) -> None:
    module.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)


def _add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return y if bias is None else y + bias


class WeightOnlyInt8Linear(ShardableLinear, nn.Module):
    """Symmetric int8 weights with one scale per output channel, in the model dtype.

    `weight` is [out, in_padded] with in_features padded to a multiple of 16 by zero columns.
    """
    ROW_DIMS = {"weight": 0, "scales": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.padded_in = _round_up(in_features, INT8_PAD_IN)
        self.register_buffer("weight", torch.empty(out_features, self.padded_in, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        _empty_bias(self, bias, out_features, dtype, device)
        self.vnni_kernel = False  # through cpu_kernels' int8 kernel (pack decides, called by pack_for_device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "WeightOnlyInt8Linear":
        module = cls(linear.in_features, linear.out_features, device="meta")
        padded = F.pad(linear.weight, (0, module.padded_in - linear.in_features))
        module.weight, module.scales = _int8_per_row(padded)
        module.bias = None if linear.bias is None else linear.bias.detach()
        return module

    def resized(self, in_features: int, out_features: int) -> "WeightOnlyInt8Linear":
        return WeightOnlyInt8Linear(in_features, out_features, self.scales.dtype, "meta", self.bias is not None)

    def slice_columns(self, state: dict[str, Tensor], prefix: str, start: int, size: int) -> None:
        # Each output row keeps its scale: the partial sums of all ranks add up under the same scale.
        weight = state[prefix + "weight"][:, start:start + size]
        state[prefix + "weight"] = F.pad(weight, (0, _round_up(size, INT8_PAD_IN) - size))

    def pack(self) -> None:
        """Choose the kernel: cpu_kernels' where this CPU, the width and the dtype allow it."""
        self.vnni_kernel = (self.weight.device.type == "cpu" and self.scales.dtype == torch.bfloat16
                            and self.padded_in % cpu_kernels.INT8_CHUNK == 0 and self.weight.is_contiguous()
                            and cpu_kernels.available())

    def forward(self, x: Tensor) -> Tensor:
        x2 = _flat_padded(x, self.padded_in)
        if self.vnni_kernel:
            y = torch.ops.gpt_fast.int8_matmul(x2, self.weight, self.scales)
        else:
            y = int8_linear(x2, self.weight, self.scales)
        return _add_bias(y.reshape(*x.shape[:-1], self.out_features), self.bias)


class WeightOnlyInt8MoEFeedForward(MoEFeedForward):
    """MoEFeedForward with int8 experts: w1, w3 [E, I, D] and w2 [E, D, I] as int8 codes with one scale per
    expert output channel (w1_scales, w3_scales [E, I], w2_scales [E, D]). The router is the float one.

    Decode gathers the chosen experts' int8 codes and scales (2 of 8 experts' bytes at batch 1); prefill runs
    each expert through int8_linear.
    """
    # w2's scales are per output channel: the partial sums of all ranks add up under the same scale.
    SHARDED_DIMS = {**MoEFeedForward.SHARDED_DIMS, "w1_scales": 1, "w3_scales": 1}

    def __init__(self, moe: MoEFeedForward, device: Optional[torch.device] = None):
        """Uninitialized int8 experts of `moe`'s shapes (on `device`, default moe's), sharing its router."""
        nn.Module.__init__(self)  # not MoEFeedForward's: its float expert parameters would be allocated
        self.top_k, self.gate = moe.top_k, moe.gate
        for name in EXPERT_WEIGHTS:
            w = getattr(moe, name)
            device = device or w.device
            self.register_buffer(name, torch.empty(w.shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scales", torch.empty(w.shape[:2], dtype=w.dtype, device=device))

    @classmethod
    def from_moe(cls, moe: MoEFeedForward) -> "WeightOnlyInt8MoEFeedForward":
        module = cls(moe, device="meta")
        for name in EXPERT_WEIGHTS:
            codes, scales = _int8_per_row(getattr(moe, name))
            setattr(module, name, codes)
            setattr(module, f"{name}_scales", scales)
        return module

    def expert_linear(self, name: str, x: Tensor, expert: int) -> Tensor:
        return int8_linear(x, getattr(self, name)[expert], getattr(self, f"{name}_scales")[expert])

    def gathered_linear(self, name: str, x: Tensor, experts: Tensor) -> Tensor:
        codes, scales = getattr(self, name), getattr(self, f"{name}_scales")
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager on CPU: index the experts with Python ints (views, where a gather copies and converts them;
            # reading the indices is no sync on CPU) and run int8_linear: ~6x faster per layer (BENCHMARKS.md).
            n, k = experts.shape
            x = x.expand(n, k, x.shape[-1])
            ids = experts.tolist()
            rows = [int8_linear(x[i, j, None], codes[ids[i][j]], scales[ids[i][j]])
                    for i in range(n) for j in range(k)]
            return torch.cat(rows).view(n, k, -1)
        # gpt-fast's form: compiled, the gather, conversion and scaling fuse into the matrix-vector products.
        return (codes[experts].to(x.dtype) @ x.unsqueeze(-1)).squeeze(-1) * scales[experts]


class WeightOnlyInt4Linear(ShardableLinear, nn.Module):
    """Asymmetric grouped int4: w = (code - 8) * scale + zero per group of `groupsize` input features.

    in_features is padded to a multiple of groupsize (inputs are zero-padded to match), and when packing to a
    multiple of 64 for cpu_kernels' kernel or out_features to a multiple of 16 for the library's; outputs are
    sliced back. `weight` is [out, in_padded / 2] uint8 code pairs and
    `scales_and_zeros` [in_padded / groupsize, out, 2] in the model dtype; packed, they are bf16 like the matmul.
    """
    ROW_DIMS = {"weight": 0, "scales_and_zeros": 1, "bias": 0}

    def __init__(self, in_features: int, out_features: int, groupsize: int, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in = _round_up(in_features, groupsize)
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales_and_zeros", torch.empty(self.padded_in // groupsize, out_features, 2,
                                                             dtype=dtype, device=device))
        _empty_bias(self, bias, out_features, dtype, device)
        self.packed_for = None  # the device type whose kernel layout the packed buffers are in
        self.kernel_in = self.padded_in  # the input width the packed kernel takes
        self.vnni_kernel = False  # packed for cpu_kernels' int4 kernel (pack decides)

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int) -> "WeightOnlyInt4Linear":
        module = cls(linear.in_features, linear.out_features, groupsize, device="meta")
        n, dtype = linear.out_features, linear.weight.dtype
        w = F.pad(linear.weight.detach().float(), (0, module.padded_in - linear.in_features))
        w = w.view(n, -1, groupsize)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = _nonzero(((hi - lo) / 15).to(dtype))
        zeros = (lo + 8 * scales.float()).to(dtype)  # the value of the middle code 8
        codes = ((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).round().clamp(0, 15)
        codes = codes.to(torch.uint8).view(n, -1)
        module.weight = codes[:, ::2] << 4 | codes[:, 1::2]
        module.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        module.bias = None if linear.bias is None else linear.bias.detach()
        return module

    def resized(self, in_features: int, out_features: int) -> "WeightOnlyInt4Linear":
        return WeightOnlyInt4Linear(in_features, out_features, self.groupsize, self.scales_and_zeros.dtype, "meta",
                                    self.bias is not None)

    def slice_columns(self, state: dict[str, Tensor], prefix: str, start: int, size: int) -> None:
        groupsize = self.groupsize
        if start % groupsize or size % groupsize:
            raise ValueError(f"{prefix}weight: int4 groups of {groupsize} inputs do not split into shards of "
                             f"{size} inputs; quantize with a group size dividing {size}, or use int8")
        state[prefix + "weight"] = state[prefix + "weight"][:, start // 2:(start + size) // 2].contiguous()
        groups = state[prefix + "scales_and_zeros"]
        state[prefix + "scales_and_zeros"] = groups[start // groupsize:(start + size) // groupsize].contiguous()

    def pack(self) -> None:
        """Convert the neutral buffers (on their device, in the model dtype) into that device's kernel layout.

        The packed buffers are not persistent: a packed model's state_dict has no int4 weights, so a
        device-specific layout can never be saved as if it were the neutral one.
        """
        device = self.weight.device
        if device.type == "cpu" and cpu_kernels.available():
            self._pack_for_vnni()
        elif device.type in ("cpu", "cuda"):
            self._pack_for_library()
        else:
            raise RuntimeError(f"int4 runs on cpu and cuda, not {device.type}; use int8")
        del self.weight, self.scales_and_zeros
        self.packed_for = device.type

    def _codes(self) -> Tensor:
        """The codes [out, in_padded], one a byte."""
        return torch.stack([self.weight >> 4, self.weight & 15], dim=-1).view(self.out_features, -1)

    def _pack_for_library(self) -> None:
        pad = _round_up(self.out_features, INT4_PAD_OUT) - self.out_features
        if self.weight.device.type == "cuda":
            # tinygemm: k must be a multiple of inner_k_tiles * 16; padded_in is a multiple of 32 at least.
            inner_k_tiles = next(t for t in (8, 4, 2) if self.padded_in % (t * 16) == 0)
            pairs = F.pad(self.weight, (0, 0, 0, pad)).contiguous()
            packed = _int4_op("_convert_weight_to_int4pack")(pairs, inner_k_tiles)
        else:
            codes = F.pad(self._codes(), (0, 0, 0, pad)).to(torch.int32)
            packed = _int4_op("_convert_weight_to_int4pack_for_cpu")(codes, 1)  # inner_k_tiles unused on CPU
        scales_and_zeros = F.pad(self.scales_and_zeros, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("packed_scales_and_zeros", scales_and_zeros, persistent=False)
        # The CPU kernel's group size as the tensor its op takes: inductor's lowering of _weight_int4pack_mm_for_cpu
        # makes it a graph constant, which torch 2.13 cannot pass inside a layer graph that all layers share.
        self.register_buffer("packed_groupsize", torch.tensor(self.groupsize), persistent=False)

    def _pack_for_vnni(self) -> None:
        """cpu_kernels' layout (int4_matmul.cpp): inputs padded to a multiple of 64 and cut into parts of 16 lanes
        (superblocks of 16 blocks of 32 inputs, one lane a block; what remains as parts of 8, 4 and 2 blocks with
        2, 4 and 8 lanes a block), a scale and a zero per block."""
        n, k = self.out_features, _round_up(self.padded_in, cpu_kernels.INT4_CHUNK)
        codes = F.pad(self._codes(), (0, k - self.padded_in))
        parts, start = [], 0
        for lanes in [1] * (k // 512) + [lanes for lanes in (2, 4, 8) if k % 512 // 32 & 16 // lanes]:
            blocks = 16 // lanes
            part = codes[:, start:start + blocks * 32].reshape(n, blocks, 8 // lanes, lanes, 4)
            vectors = part.transpose(1, 2).reshape(n, -1, 2, 64 if lanes < 8 else 32)  # vector t, lane l: block l // L
            parts.append((vectors[:, :, 0] | vectors[:, :, 1] << 4).reshape(n, -1))  # pairs of vectors (halves for L 8)
            start += blocks * 32
        scales, zeros = (F.pad(part.T.repeat_interleave(self.groupsize // 32, dim=1), (0, (k - self.padded_in) // 32))
                         .to(torch.bfloat16).contiguous() for part in self.scales_and_zeros.unbind(-1))
        self.register_buffer("packed_weight", torch.cat(parts, 1).contiguous(), persistent=False)
        self.register_buffer("packed_scales", scales, persistent=False)
        self.register_buffer("packed_zeros", zeros, persistent=False)
        self.kernel_in, self.vnni_kernel = k, True

    def forward(self, x: Tensor) -> Tensor:
        if self.packed_for != x.device.type:
            raise RuntimeError(f"int4 weights packed for {self.packed_for}, input on {x.device.type}: move the "
                               "model before quantizing or loading it (pack_for_device runs last)")
        # bf16 on both devices: tinygemm takes nothing else (and a contiguous input); the library's CPU kernel is
        # 25x slower in fp32.
        x2 = _flat_padded(x, self.kernel_in).to(torch.bfloat16).contiguous()
        if self.packed_for == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed_weight, self.groupsize,
                                                   self.packed_scales_and_zeros)
        elif self.vnni_kernel:
            y = torch.ops.gpt_fast.int4_matmul(x2, self.packed_weight, self.packed_scales, self.packed_zeros)
        else:
            y = torch.ops.quantized.int4mm_packed_weight_cpu(x2, self.packed_weight, self.packed_groupsize,
                                                             self.packed_scales_and_zeros)
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return _add_bias(y, self.bias)


def _replace_linears(model: Transformer, make: Callable[[nn.Linear], nn.Module],
                     make_moe: Callable[[MoEFeedForward], nn.Module], progress: bool = False) -> None:
    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, MoEFeedForward):
                setattr(module, name, make_moe(child))  # its router stays a float Linear
            elif isinstance(child, nn.Linear):
                setattr(module, name, make(child))
            else:
                walk(child)

    for i, layer in enumerate(model.layers):
        walk(layer)
        if progress:
            print(f"quantized layer {i + 1}/{len(model.layers)}", file=sys.stderr, flush=True)
    model.output = make(model.output)


def empty_quantized_linears(model: Transformer, scheme: dict) -> None:
    """Swap every Linear for an uninitialized quantized one of the same shape (for loading on meta)."""
    def make(linear: nn.Linear) -> nn.Module:
        dtype, device, bias = linear.weight.dtype, linear.weight.device, linear.bias is not None
        if scheme["mode"] == "int8":
            return WeightOnlyInt8Linear(linear.in_features, linear.out_features, dtype, device, bias)
        return WeightOnlyInt4Linear(linear.in_features, linear.out_features, scheme["groupsize"], dtype, device,
                                    bias)

    _replace_linears(model, make, WeightOnlyInt8MoEFeedForward)


def pack_for_device(model: nn.Module) -> None:
    """Pack int4 weights for the device they are on and pick the bf16 and int8 layers' and the attention's decode
    kernels (call after the model's last .to())."""
    for module in model.modules():
        if isinstance(module, (Linear, WeightOnlyInt8Linear, Attention)) or (
                isinstance(module, WeightOnlyInt4Linear) and module.packed_for is None):
            module.pack()


def quantize_model(model: Transformer, mode: str, groupsize: Optional[int] = None, pack: bool = True,
                   progress: bool = False) -> Transformer:
    """Quantize every Linear of `model` in place, on its device; records the scheme in model.args.

    pack=False keeps int4 weights in the neutral layout (for saving); loading packs them.
    """
    if model.args.quantization:
        raise ValueError(f"model is already quantized ({model.args.quantization}); start from the unquantized one")
    scheme = quantization_scheme(mode, groupsize)
    args = replace(model.args, quantization=scheme)  # validates the scheme for this model before the slow part
    if scheme["mode"] == "int8":
        make = WeightOnlyInt8Linear.from_linear
    else:
        make = lambda linear: WeightOnlyInt4Linear.from_linear(linear, scheme["groupsize"])  # noqa: E731
    with torch.no_grad():
        _replace_linears(model, make, WeightOnlyInt8MoEFeedForward.from_moe, progress)
    model.args = args
    if pack:
        pack_for_device(model)
    return model
