"""Where a CPU decode step's time goes: the whole compiled step vs its matmuls alone, per weight width.

    python scripts/bench_step_parts.py --models smollm2 larger --rounds 5

For each model (the same weights as bench_peers.py: SmolLM2-135M-Instruct converted from its shipped GGUF, and the
larger random shape) and each of our rows (bf16, int8, int4-g32 ...), interleaved in rounds (A B C A B C):
- step: one compiled batch-1 decode step (ModelRunner.rows, one token, kv_len cached positions), no sampling;
- matmuls: the step's matmul kernels alone, called one after the other on one activation row in model order (every
  Linear of every layer and the output layer), weights read from memory as in a step.
The difference is what every width pays alike: attention over the cache, norms, the compiled graph's Python and
dynamo's call overhead. Ratios over our bf16 row, of whole steps and of matmuls alone, show how far a quantized
width's speed-up over bf16 can go while that shared part stays. Best and median of the rounds, ms; JSON out.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_peers import OUR_ROWS, our_checkpoint, prepare_ggufs  # noqa: E402 (scripts/ is sys.path[0])

from gpt_fast.checkpoints.load import load_model  # noqa: E402
from gpt_fast.engine.runner import ModelRunner  # noqa: E402
from gpt_fast.model.layers import Linear  # noqa: E402
from gpt_fast.model.quantized import WeightOnlyInt4Linear, WeightOnlyInt8Linear  # noqa: E402


def matmul_calls(model: torch.nn.Module) -> list[Callable[[], torch.Tensor]]:
    """The kernel call of every Linear, in model order, on one random activation row: cpu_kernels' op where the
    layer uses it, else the layer's forward (with its Python)."""
    ops, calls = torch.ops.gpt_fast, []
    for module in model.modules():
        if isinstance(module, WeightOnlyInt4Linear) and module.vnni_kernel:
            x = torch.randn(1, module.kernel_in, dtype=torch.bfloat16)
            args = (x, module.packed_weight, module.packed_scales, module.packed_zeros)
            calls.append(lambda a=args: ops.int4_matmul.default(*a))
        elif isinstance(module, WeightOnlyInt8Linear) and module.vnni_kernel:
            args = (torch.randn(1, module.padded_in, dtype=torch.bfloat16), module.weight, module.scales)
            calls.append(lambda a=args: ops.int8_matmul.default(*a))
        elif isinstance(module, Linear) and module.bf16_decode:
            args = (torch.randn(1, module.in_features, dtype=torch.bfloat16), module.weight)
            calls.append(lambda a=args: ops.bf16_matvec.default(*a))
        elif isinstance(module, (Linear, WeightOnlyInt8Linear, WeightOnlyInt4Linear)):
            x = torch.randn(1, module.in_features, dtype=torch.bfloat16)
            calls.append(lambda m=module, x=x: m(x))
    return calls


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of fn, the mean over `repeats` back-to-back calls (after one unmeasured call)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench_model(model_name: str, a: argparse.Namespace) -> dict:
    ggufs = prepare_ggufs(model_name, a.workdir)
    checkpoint = our_checkpoint(ggufs["Q4_1"] if model_name == "smollm2" else ggufs["F16"],
                                a.workdir / f"{model_name}-ours")
    rows = {}
    for name in a.ours:
        print(f"[{model_name}] setting up {name}", file=sys.stderr, flush=True)
        quantize, groupsize = OUR_ROWS[name]
        model = load_model(checkpoint, "cpu", torch.bfloat16, quantize=quantize, groupsize=groupsize)
        runner = ModelRunner(model, 1, a.kv_len + 64, compile=True)
        tokens = torch.zeros(1, 1, dtype=torch.long)
        positions = torch.full_like(tokens, a.kv_len - 1)
        calls = matmul_calls(model)

        def matmuls(calls: list = calls) -> None:
            for call in calls:
                call()

        rows[name] = {"step": lambda r=runner, t=tokens, p=positions: r.rows(t, p, a.kv_len), "matmuls": matmuls,
                      "step_s": [], "matmuls_s": []}
    with torch.no_grad():
        for round_ in range(a.rounds):
            for name, row in rows.items():
                row["step_s"].append(seconds_per_call(row["step"], a.steps))
                row["matmuls_s"].append(seconds_per_call(row["matmuls"], a.steps))
                print(f"[{model_name}] round {round_ + 1} {name:9s} step {1e3 * row['step_s'][-1]:6.2f} ms  "
                      f"matmuls {1e3 * row['matmuls_s'][-1]:6.2f} ms", file=sys.stderr, flush=True)
    out = []
    base = rows.get("bf16")
    for name, row in rows.items():
        step, mm = statistics.median(row["step_s"]), statistics.median(row["matmuls_s"])
        entry = {"name": name, "step_ms_best": 1e3 * min(row["step_s"]), "step_ms_median": 1e3 * step,
                 "matmuls_ms_best": 1e3 * min(row["matmuls_s"]), "matmuls_ms_median": 1e3 * mm,
                 "rest_ms_median": 1e3 * (step - mm), "matmuls_share": mm / step}
        if base is not None:
            entry["step_speedup_over_bf16"] = statistics.median(base["step_s"]) / step
            entry["matmuls_speedup_over_bf16"] = statistics.median(base["matmuls_s"]) / mm
        out.append(entry)
    return {"model": model_name, "kv_len": a.kv_len, "rows": out}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: one decode step at batch 1 over {result['kv_len']} cached positions (ms)")
    print("| row | step best / median | matmuls alone best / median | rest (median) | matmuls' share "
          "| step / bf16's | matmuls / bf16's |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        speedups = (f"{r['step_speedup_over_bf16']:.2f}x | {r['matmuls_speedup_over_bf16']:.2f}x"
                    if "step_speedup_over_bf16" in r else "| ")
        print(f"| {r['name']} | {r['step_ms_best']:.2f} / {r['step_ms_median']:.2f} | {r['matmuls_ms_best']:.2f} / "
              f"{r['matmuls_ms_median']:.2f} | {r['rest_ms_median']:.2f} | {r['matmuls_share']:.0%} | {speedups} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "larger"], choices=["smollm2", "larger"])
    ap.add_argument("--ours", nargs="+", default=["bf16", "int8", "int4-g32"], choices=sorted(OUR_ROWS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="steps (or matmul sweeps) per measurement")
    ap.add_argument("--kv-len", type=int, default=192, help="cached positions each step attends to")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("bench_results/peers"),
                    help="bench_peers.py's: the GGUF files and our converted checkpoints")
    ap.add_argument("--json", type=Path, default=Path("bench_results/step_parts.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = [bench_model(m, a) for m in a.models]
    print(f"\ntorch {torch.__version__}, {a.threads} threads, {a.rounds} interleaved rounds of {a.steps} steps")
    for result in results:
        print_table(result)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"torch": torch.__version__, "threads": a.threads, "rounds": a.rounds,
                                  "models": results}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
