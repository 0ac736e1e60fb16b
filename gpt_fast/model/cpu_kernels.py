"""The CPU matmuls of quantized layers and of bf16 decode steps, in C++, built on first use with torch's C++
extension loader.

- int8_matmul.cpp: `aten._weight_int8pack_mm` converts every int8 weight to float before multiplying and is bound
  by that arithmetic. This kernel quantizes the activation rows to int8 in blocks of 32 (llama.cpp's Q8_0
  activations) and multiplies with AVX-512 VNNI: ~1.5x the library kernel's speed at one row, ~1.3-1.4x at 8 to
  512. Its products differ from the library's by the activations' rounding (~0.6% of the output's norm on random
  data), as llama.cpp's Q8_0 do. Used by int8 layers whose input width is a multiple of 64, at every step.
- int4_matmul.cpp: grouped int4 weights times activations rounded the same way (llama.cpp's Q4_1 x Q8_1), at every
  step too. Its layout puts blocks of 32 inputs side by side in the 16 lanes of a vector (16 blocks of one lane
  each, or 8, 4, 2 blocks of 2, 4, 8 lanes for what remains of K after the 512-input superblocks), so each block's
  products stay in int32 until its part is done: 1.2-2.3x the library kernel (int4mm_packed_weight_cpu) per
  matrix, whole SmolLM2 steps ~1.3x. Its products differ from the dequantized matmul's by the activations'
  rounding times the weights (~1% of the output's norm on random data).
- bf16_matvec.cpp: bf16 x bf16 with AVX-512 BF16 dot products, ~1.8x oneDNN at 1-8 rows and faster than the
  compile pass's fused reductions (model/matvec.py) in whole compiled steps too (SmolLM2 at batch 1 / 2 / 4: 2-3% /
  4-8% / 11%). Used by bf16 layers for steps of up to MAX_ROWS rows, eager or compiled; same products as oneDNN's
  up to the order of the fp32 sums.
- decode_attention.cpp: the attention of steps of up to 8 tokens a sequence in bf16, each kv head's query rows one
  task: written out (transformer.explicit_attention), compiled steps ran it as one inductor kernel a layer with ~10
  barriers and ~14 scratch buffers, ~20 us a SmolLM2 layer; this is 7 us in cache, 12-14 us from memory, with the
  same roundings (SmolLM2 steps ~0.7 ms faster). Used by Attention layers packed on CPUs with AVX-512 BF16.
int8_activations.h rounds activation rows for the int8 and int4 kernels; row_passes.h is how the matmuls walk the
rows (tiles of weight rows, passes of up to 8 activation rows, their lane sums; the attention sums 8 keys' dot
products with the same lane sums). All need AVX-512 VNNI (bf16 and the attention also AVX-512 BF16). torch caches
the build (TORCH_EXTENSIONS_DIR, ~15 s the first time); another CPU, or a machine where the build fails (no C++
compiler: inductor needs one too), keeps the library kernels and logs why.
"""
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("int8_matmul.cpp", "int4_matmul.cpp", "bf16_matvec.cpp", "decode_attention.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("int8_activations.h", "row_passes.h")]
# bf16 layers' steps of up to MAX_ROWS rows (decode of batches up to 8, speculative verification) take one pass
# over the weights for all rows: per 1536 x 576 matrix out of cache, 2 threads, 38 / 41 / 46 us at 1 / 4 / 8 rows vs
# oneDNN's 76 / 77 / 84; their prefill keeps oneDNN.
MAX_ROWS = 8
INT8_CHUNK = 64  # the int8 kernel's input width unit (two blocks of 32)
INT4_CHUNK = 64  # the int4 kernel's: inputs are padded to a multiple of it
BF16_CHUNK = 32
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _build_directory() -> Path:
    """Where the kernels are built, named after their sources' contents and the Python and torch versions.

    TorchServe unpacks the model archive, this file's .cpp included, to a new temporary folder at each start, and
    torch's loader rebuilds whenever the sources' paths change: from a copy here they stay the same, and a server's
    second start reuses the first one's build (~15 s)."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS)).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"gpt_fast_cpu_kernels-{python}-torch{torch.__version__}-{digest}"


def _stable_sources(directory: Path) -> list[str]:
    """Copies the sources and their headers into `directory`; returns the copied sources' paths."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in SOURCES + HEADERS:
        target = directory / source.name
        if not target.exists():  # written whole, then renamed: another process may be copying it too
            partial = target.with_name(f"{target.name}.{os.getpid()}")
            partial.write_bytes(source.read_bytes())
            os.replace(partial, target)
    return [str(directory / source.name) for source in SOURCES]


@functools.cache
def available() -> bool:
    """Whether torch.ops.gpt_fast.int8_matmul and int4_matmul can run here (builds and loads the kernels the first
    time)."""
    missing = [flag for flag in CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        logger.info("CPU decode kernels: this CPU lacks %s, using the library kernels", ", ".join(missing))
        return False
    from torch.utils.cpp_extension import load
    try:
        directory = _build_directory()
        load(name="gpt_fast_cpu_kernels", sources=_stable_sources(directory), build_directory=str(directory),
             is_python_module=False, extra_ldflags=["-fopenmp"],
             extra_cflags=["-O3", "-fopenmp"] + [f"-m{flag.replace('_', '')}" for flag in CPU_FLAGS])
    except Exception as e:  # noqa: BLE001 (a compiler's many ways to fail all mean: use the library kernels)
        logger.warning("CPU decode kernels: building %s failed (%s), using the library kernels",
                       ", ".join(source.name for source in SOURCES), e)
        return False
    for op in ("int8_matmul", "int4_matmul", "bf16_matvec"):
        torch.library.register_fake(f"gpt_fast::{op}")(_output_like)
    torch.library.register_fake("gpt_fast::decode_attention")(_attention_output_like)
    return True


def _output_like(x: torch.Tensor, w: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
    """Every kernel's output for tracing: y [M, N] for x [M, K] and weights w [N, ...], in x's dtype."""
    return x.new_empty(x.shape[0], w.shape[0])


def _attention_output_like(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """decode_attention's output for tracing: [B, H, T, D] like q, contiguous."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@functools.cache
def bf16_available() -> bool:
    """Whether torch.ops.gpt_fast.bf16_matvec and decode_attention can run here."""
    return "avx512_bf16" in _cpu_flags() and available()
