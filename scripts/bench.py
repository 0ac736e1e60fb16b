"""Benchmark batch-1 decode in process: tokens/s, time to first token, bandwidth achieved vs the machine's limit.

    python scripts/bench.py --shape stories110M --device cpu --dtype bfloat16 float32 --compile both
    python scripts/bench.py --shape stories110M --dtype bfloat16 --quantize none int8 int4 --compile compiled
    python scripts/bench.py --checkpoint checkpoints/tiny --json bench_results/tiny.json
    torchrun --standalone --nproc-per-node 2 scripts/bench.py --shape stories110M --no-hf  # tensor parallel
    python scripts/bench.py --shape qwen3-0.6b --dtype bfloat16 --new-tokens 20 --rounds 3  # A B A B on a busy CPU

Runs Hugging Face transformers eager on the same shape too (when installed) as the side-by-side reference.
With --rounds N the runners take turns N times (peers interleaved); a row keeps each runner's best round, and the
JSON keeps every round with the 1-minute load average at its end.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt_fast.checkpoints.load import DTYPES, load, load_model  # noqa: E402
from gpt_fast.engine.engine import Engine  # noqa: E402
from gpt_fast.engine.sampling import SamplingParams  # noqa: E402
from gpt_fast.model import tp  # noqa: E402
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs, scheme_name  # noqa: E402
from gpt_fast.model.quantized import pack_for_device, quantize_model  # noqa: E402
from gpt_fast.model.transformer import Transformer  # noqa: E402


class NoTextTokenizer:
    """Random weights have no tokenizer: ids only, no stop ids, no text."""
    bos_id, eos_id, stop_ids = 1, 2, frozenset()
    vocab_size = 1 << 31  # any id the model emits "decodes"

    def decode(self, ids: list[int]) -> str:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device) -> float:
    """The physical limit, in bytes/s: CPU sums a large tensor; CUDA copies one (read + write counted)."""
    n = (1 << 28) if device.type == "cpu" else (1 << 30)
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x) if device.type == "cuda" else None
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        if y is None:
            x.sum()
        else:
            y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() * (1 if y is None else 2) / best


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    # Allocated in dtype directly: a float32 build first would need 187 GB for Mixtral 8x7B.
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def quantize_on(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> torch.device:
    """Where to build and quantize a quantized row's random weights: on the device (seconds on a GPU) when its
    unquantized weights take at most half of the free memory there, else on the CPU, then moved (Mixtral 8x7B:
    93 GB in bf16, 47 GB in int8; quantizing Llama 3.1 8B on 16 CPU cores takes minutes)."""
    if device.type != "cuda":
        return device
    with torch.device("meta"):
        size = sum(p.numel() for p in Transformer(args).parameters()) * torch.finfo(dtype).bits // 8
    return device if 2 * size <= torch.cuda.mem_get_info(device)[0] else torch.device("cpu")


def sharded_random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Under torchrun: rank 0 saves the random model as a checkpoint, and each rank loads its shard of it."""
    directory = Path(tp.rank0_object(tempfile.mkdtemp(prefix="bench-tp-") if tp.rank() == 0 else None))
    if tp.rank() == 0:
        state = random_model(args, torch.device("cpu"), dtype).state_dict()
        torch.save({k: v for k, v in state.items() if not (args.tie_embeddings and k == "output.weight")},
                   directory / "model.pth")
        args.save(directory / "config.json")
    tp.rank0_object(None)  # the files are written
    model = load_model(directory, device, dtype, tp.rank(), tp.world_size())
    tp.rank0_object(None)  # every rank has mapped them
    if tp.rank() == 0:
        shutil.rmtree(directory)
    return model


def bench_engine(model: Transformer, tokenizer, prompt_len: int, new_tokens: int, compile: bool,
                 device: torch.device, warmup: str = "all") -> dict:
    """warmup "all": the engine's warm-up (every shape bucket, as a server starts; compile_s is its time); "used":
    an untimed first request compiles only the shapes the timed ones run (compile_s is its time)."""
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=prompt_len + new_tokens + 8, compile=compile)
    t0 = time.perf_counter()
    if warmup == "all":
        engine.warmup()
    prompt = [1] + [(7 * i) % 100 + 3 for i in range(prompt_len - 1)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    if warmup == "used":
        engine.generate([prompt], params)
        sync(device)
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        engine.add("bench", prompt, params)
        sync(device)
        t0 = time.perf_counter()
        engine.step()
        sync(device)
        t1 = time.perf_counter()
        steps = 0
        while engine.num_active:
            engine.step()
            steps += 1
        sync(device)
        runs.append((t1 - t0, steps / (time.perf_counter() - t1)))
    ttft, tps = min(r[0] for r in runs), max(r[1] for r in runs)
    return {"ttft_s": ttft, "tokens_per_s": tps, "compile_s": compile_s}


def hf_model_class(args: ModelArgs):
    """The transformers model and config of args' family, and the config fields beyond the shape."""
    import transformers as tf
    if args.num_experts:
        return tf.MixtralForCausalLM, tf.MixtralConfig, dict(num_local_experts=args.num_experts,
                                                             num_experts_per_tok=args.num_experts_per_tok)
    if args.post_norms:
        return tf.Gemma2ForCausalLM, tf.Gemma2Config, dict(
            query_pre_attn_scalar=round(args.attn_scale ** -2), attn_logit_softcapping=args.attn_softcap,
            final_logit_softcapping=args.final_softcap, sliding_window=args.sliding_window)
    if args.qk_norm:
        return tf.Qwen3ForCausalLM, tf.Qwen3Config, {}
    if args.qkv_bias:
        return tf.Qwen2ForCausalLM, tf.Qwen2Config, {}
    if args.sliding_window:  # Phi-3's shapes; Mistral's would run the same
        return tf.Phi3ForCausalLM, tf.Phi3Config, dict(sliding_window=args.sliding_window, pad_token_id=0)
    return tf.LlamaForCausalLM, tf.LlamaConfig, {}


def hf_runner(args: ModelArgs, prompt_len: int, new_tokens: int, device: torch.device,
              dtype: torch.dtype) -> Callable[[], dict]:
    """Builds transformers' model of args' shape once; each call of the result times one round of generate."""
    shape = dict(hidden_size=args.dim, num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                 num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                 intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                 max_position_embeddings=args.max_position_embeddings, rope_theta=args.rope_base,
                 tie_word_embeddings=args.tie_embeddings)
    model_cls, config_cls, options = hf_model_class(args)
    config = config_cls(**shape, **options)
    torch.manual_seed(0)
    with torch.device(device):  # built in dtype directly: no fp32 copy of a large model first
        model = model_cls._from_config(config, dtype=dtype).eval()
    ids = torch.tensor([[1] + [(7 * i) % 100 + 3 for i in range(prompt_len - 1)]], device=device)

    def timed(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    timed(2)

    def run() -> dict:
        ttft = min(timed(1) for _ in range(2))
        total = min(timed(new_tokens) for _ in range(2))
        return {"ttft_s": ttft, "tokens_per_s": (new_tokens - 1) / (total - ttft), "compile_s": 0.0}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=sorted(NAMED_SHAPES))
    src.add_argument("--checkpoint", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    ap.add_argument("--compile", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4"],
                    help="weights: unquantized and/or quantized in memory at load (one row each)")
    ap.add_argument("--groupsize", type=int, default=128, help="int4 group size")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--rounds", type=int, default=1, help="runners take turns this many times; best round kept")
    ap.add_argument("--warmup", choices=["all", "used"], default="all",
                    help="compile every shape bucket first (all, as a server does), or only those the timed runs use")
    ap.add_argument("--json", type=Path, default=Path("bench_results/bench.json"))
    a = ap.parse_args()
    device = tp.setup(torch.device(a.device))
    ranks = f", {tp.world_size()} ranks" if tp.world_size() > 1 else ""
    limit = read_bandwidth(device)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[a.compile]
    rows = []
    for dtype_name in a.dtype:
        dtype = DTYPES[dtype_name]
        for quant in a.quantize:
            if a.checkpoint:
                model, tokenizer = load(a.checkpoint, device, dtype, None if quant == "none" else quant,
                                        a.groupsize if quant == "int4" else None, tp.rank(), tp.world_size())
            elif ranks:
                model = sharded_random_model(ModelArgs(**NAMED_SHAPES[a.shape]), device, dtype)
                tokenizer = NoTextTokenizer()
            else:
                args = ModelArgs(**NAMED_SHAPES[a.shape])
                model = random_model(args, device if quant == "none" else quantize_on(args, dtype, device), dtype)
                tokenizer = NoTextTokenizer()
            if quant != "none" and not a.checkpoint:
                quantize_model(model, quant, a.groupsize if quant == "int4" else None, pack=False)
                model.to(device)
                pack_for_device(model)
            weights = scheme_name(model.args.quantization)
            bytes_per_token = model.args.weight_bytes(torch.finfo(dtype).bits / 8)
            # Ours builds its engine each round (the KV cache lives on the model: one engine at a time).
            runners = [(f"gpt-fast-serve {'compiled' if c else 'eager'}{ranks}",
                        lambda c=c: bench_engine(model, tokenizer, a.prompt_len, a.new_tokens, c, device,
                                                     a.warmup))
                       for c in modes]
            if not a.no_hf and a.shape and quant == "none" and not ranks:
                try:
                    import transformers  # noqa: F401
                    runners.append(("transformers eager",
                                    hf_runner(model.args, a.prompt_len, a.new_tokens, device, dtype)))
                except ImportError:
                    pass
            rounds = {name: [] for name, _ in runners}
            for i in range(a.rounds):
                for name, run in runners:  # A B A B: a load change hits every runner alike
                    r = run()
                    r["load_avg"] = os.getloadavg()[0]
                    rounds[name].append(r)
                    if tp.rank() == 0:
                        print(f"  round {i + 1} {name:28s} {dtype_name:9s} {weights:11s} "
                              f"{r['tokens_per_s']:8.1f} tok/s  load {r['load_avg']:.1f}", file=sys.stderr)
            for name, runs in rounds.items():
                r = dict(max(runs, key=lambda x: x["tokens_per_s"]), ttft_s=min(x["ttft_s"] for x in runs),
                         compile_s=runs[0]["compile_s"], rounds=runs, runner=name, dtype=dtype_name,
                         weights=weights)
                r["bandwidth_gbs"] = bytes_per_token * r["tokens_per_s"] / 1e9
                r["of_limit"] = r["bandwidth_gbs"] * 1e9 / limit
                rows.append(r)
            model = runners = None  # frees the weights before the next load (the runners close over `model`)
    if tp.rank() != 0:  # every rank ran the same steps; rank 0 reports
        return
    print(f"\n{a.shape or a.checkpoint} on {device} ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__}, batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens; "
          f"read bandwidth limit {limit / 1e9:.1f} GB/s")
    print(f"| {'runner':28s} | dtype    | weights     | tok/s  | TTFT ms | GB/s  | of limit | compile s |")
    print("|" + "|".join("-" * w for w in (30, 10, 13, 8, 9, 7, 10, 11)) + "|")
    for r in rows:
        print(f"| {r['runner']:28s} | {r['dtype']:8s} | {r['weights']:11s} | {r['tokens_per_s']:6.1f} | "
              f"{r['ttft_s'] * 1e3:7.1f} | "
              f"{r['bandwidth_gbs']:5.1f} | {r['of_limit']:8.0%} | {r['compile_s']:9.1f} |")
    if a.rounds > 1:
        print("tok/s per round (1-minute load average at its end):")
        for r in rows:
            print(f"  {r['runner']:28s} {r['dtype']:8s} {r['weights']:11s} " +
                  "  ".join(f"{x['tokens_per_s']:6.1f} ({x['load_avg']:.1f})" for x in r["rounds"]))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"model": str(a.shape or a.checkpoint), "device": str(device),
                                  "torch": torch.__version__, "read_bandwidth_gbs": limit / 1e9,
                                  "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    try:
        main()
    finally:
        tp.teardown()
