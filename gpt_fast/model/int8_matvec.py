"""The CPU int8 decode matmul (int8_matvec.cpp), built on first use with torch's C++ extension loader.

At a few rows, `aten._weight_int8pack_mm` converts every int8 weight to float before multiplying: it is bound by
that arithmetic (14-16 GB/s of int8 on one core of the dev VM, barely faster than bf16 weights at twice the bytes).
The kernel here quantizes the few activation rows to int8 in blocks of 32 (llama.cpp's Q8_0 activations) and
multiplies with AVX-512 VNNI: ~1.5x the library kernel's speed at one row, ~1.2x at eight. Its products differ from the library's by
the activations' rounding (~0.6% of the output's norm on random data), as llama.cpp's Q8_0 do. It is used for
steps of up to MAX_ROWS rows (decode, speculative verification) on CPUs with AVX-512 VNNI, for matrices whose
input width is a multiple of 64; prefill keeps the library kernel.

torch caches the build (TORCH_EXTENSIONS_DIR, ~6 s the first time); a CPU without VNNI, or a machine where the
build fails (no C++ compiler: inductor needs one too), keeps the library kernel and logs why.
"""
import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
# Decode of batches up to 8 and speculative verification: one pass over the weights for all rows. Per 1536 x 576 matrix
# out of cache, 2 threads: 22 / 27 / 50 us at 1 / 4 / 8 rows vs the library's 32 / 33 / 60; prefill keeps the library.
MAX_ROWS = 8
CHUNK = 64  # the kernel's input width unit (two blocks of 32)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@functools.cache
def available() -> bool:
    """Whether torch.ops.gpt_fast.int8_matvec can run here (builds and loads it the first time)."""
    missing = [flag for flag in CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        logger.info("int8 decode: this CPU lacks %s, using aten._weight_int8pack_mm", ", ".join(missing))
        return False
    from torch.utils.cpp_extension import load
    try:
        load(name="gpt_fast_int8_matvec", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp"] + [f"-m{flag.replace('_', '')}" for flag in CPU_FLAGS],
             extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 (a compiler's many ways to fail all mean: use the library kernel)
        logger.warning("int8 decode: building %s failed (%s), using aten._weight_int8pack_mm", SOURCE.name, e)
        return False
    torch.library.register_fake("gpt_fast::int8_matvec")(
        lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0]))
    return True
