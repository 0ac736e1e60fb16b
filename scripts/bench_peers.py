"""CPU decode side by side with llama.cpp on the same weights: SmolLM2-135M-Instruct and a larger random shape.

    pip install llama-cpp-python==0.3.36      # benchmark only: builds llama.cpp from source (minutes on 2 cores)
    python scripts/bench_peers.py --json bench_results/peers.json
    python scripts/bench_peers.py --models smollm2 --ours bf16 int8 --no-hf --rounds 3

For each model, llama.cpp (through llama-cpp-python) runs GGUF files at three widths: F16, Q8_0 and 4 bits
(SmolLM2's shipped Q4_1; Q8_0 and F16 are written from its dequantized tensors with the `gguf` package), and we run
the same weights converted from the GGUF in bf16, int8 and int4 (group sizes 32 and 64), compiled, next to
transformers eager bf16. The larger shape is SmolLM2-360M's (32 layers, dim 960) with random weights, written to
GGUF by the same writer, so the ratios are not only about a 135M model's per-layer overheads.

Every runner is built and warmed up first, then measured in interleaved rounds (A B C A B C ...): batch 1, greedy,
--threads threads, a chat prompt and --new-tokens new tokens (decode tok/s, time to first token), and a
--prefill-tokens prompt (prefill tok/s). Reported: best and median over the rounds, GB/s of weights read per
decoded token against the read bandwidth measured in the same run, ours / llama.cpp at equal bits (bf16 vs F16,
int8 vs Q8_0, int4 vs Q4_1), the greedy agreement length of each row with its family's 16-bit row (the number of
leading tokens equal), and with --streams N the aggregate decode tok/s of N concurrent streams in our engine
(measured in every round next to the single streams; tokens after every stream's first, per second).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import NoTextTokenizer, read_bandwidth  # noqa: E402

from gpt_fast.checkpoints import default_model  # noqa: E402
from gpt_fast.checkpoints.gguf import convert_gguf, dequantize  # noqa: E402
from gpt_fast.checkpoints.load import load_model  # noqa: E402
from gpt_fast.engine.engine import Engine  # noqa: E402
from gpt_fast.engine.sampling import SamplingParams  # noqa: E402
from gpt_fast.model.args import ModelArgs  # noqa: E402

# SmolLM2-360M's shape (same tokenizer and vocabulary), random weights.
LARGER_SHAPE = {"block_count": 32, "embedding_length": 960, "feed_forward_length": 2560, "attention.head_count": 15,
                "attention.head_count_kv": 5}  # GGUF metadata keys, under "llama."
CHAT_PROMPT = "Write a long story about a robot who learns to paint, with many details about its first paintings."
OUR_ROWS = {"bf16": (None, None), "int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64),
            "int4-g128": ("int4", 128)}
# Bits of a row, for the ours / llama.cpp ratios at equal bits.
BITS = {"bf16": 16, "F16": 16, "int8": 8, "Q8_0": 8, "int4-g32": 4, "int4-g64": 4, "int4-g128": 4, "Q4_1": 4}


# ---------------------------------------------------------------- GGUF files

def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to fp32 as the converter does, in GGUF's (row-major) shape."""
    import gguf
    return {t.name: dequantize(t, torch.float32).numpy() for t in gguf.GGUFReader(path).tensors}


def gguf_weight_bytes(path: Path) -> float:
    """Bytes a llama.cpp decode step reads: every tensor (a tied embedding is read whole as the output layer)."""
    import gguf
    return float(sum(t.n_bytes for t in gguf.GGUFReader(path).tensors))


def write_gguf(path: Path, source: Path, tensors: dict[str, np.ndarray], weight_type: str,
               metadata: Optional[dict] = None) -> Path:
    """A GGUF with `source`'s metadata (overridden by `metadata`: name -> value) and `tensors`, matrices stored as
    weight_type (F16, Q8_0 or Q4_1; the token embedding Q8_0 under Q4_1, as in the shipped file), vectors F32."""
    import gguf
    qtype = gguf.GGMLQuantizationType[weight_type]
    file_type = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[weight_type]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, arch="llama")
    metadata = {**(metadata or {}), "general.file_type": int(file_type)}
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, metadata.get(field.name, field.contents()), value_type, sub_type=sub_type)
    for name, data in tensors.items():
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q4_1 and name == "token_embd.weight":
            kind = gguf.GGMLQuantizationType.Q8_0
        stored = data.astype(np.float16) if kind == gguf.GGMLQuantizationType.F16 else (
            data if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, kind))
        writer.add_tensor(name, stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_larger_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """LARGER_SHAPE's tensors with GGUF's names and shapes: N(0, 0.02) matrices, unit norms."""
    rng = np.random.default_rng(seed)
    s = LARGER_SHAPE
    dim, ffn = s["embedding_length"], s["feed_forward_length"]
    head_dim = dim // s["attention.head_count"]
    kv = s["attention.head_count_kv"] * head_dim
    shapes = {"attn_q.weight": (dim, dim), "attn_k.weight": (kv, dim), "attn_v.weight": (kv, dim),
              "attn_output.weight": (dim, dim), "ffn_gate.weight": (ffn, dim), "ffn_up.weight": (ffn, dim),
              "ffn_down.weight": (dim, ffn)}
    out = {"token_embd.weight": rng.normal(0, 0.02, (49152, dim)).astype(np.float32),
           "output_norm.weight": np.ones(dim, np.float32)}
    for i in range(s["block_count"]):
        out[f"blk.{i}.attn_norm.weight"] = np.ones(dim, np.float32)
        out[f"blk.{i}.ffn_norm.weight"] = np.ones(dim, np.float32)
        for name, shape in shapes.items():
            out[f"blk.{i}.{name}"] = rng.normal(0, 0.02, shape).astype(np.float32)
    return out


def prepare_ggufs(model: str, workdir: Path) -> dict[str, Path]:
    """{"F16": path, "Q8_0": path, "Q4_1": path} for `model` ("smollm2" or "larger"), written once into workdir."""
    shipped = default_model.gguf_path()
    paths = {kind: workdir / f"{model}.{kind}.gguf" for kind in ("F16", "Q8_0", "Q4_1")}
    if model == "smollm2":
        paths["Q4_1"] = shipped
    if all(p.is_file() for p in paths.values()):
        return paths
    if model == "smollm2":
        tensors = gguf_tensors(shipped)
        metadata = None
    else:
        tensors = random_larger_tensors()
        prefix = "llama."
        metadata = {prefix + k: v for k, v in LARGER_SHAPE.items()}
        head_dim = LARGER_SHAPE["embedding_length"] // LARGER_SHAPE["attention.head_count"]
        metadata.update({"general.name": "SmolLM2-360M shape, random weights", "general.size_label": "360M",
                         prefix + "rope.dimension_count": head_dim})
    for kind, path in paths.items():
        if not path.is_file():
            print(f"writing {path}", file=sys.stderr, flush=True)
            write_gguf(path, shipped, tensors, kind, metadata)
    return paths


def our_checkpoint(gguf_path: Path, out_dir: Path) -> Path:
    """Our checkpoint of a GGUF's weights (`python -m gpt_fast.convert FILE.gguf OUT`), dequantized to bf16."""
    if not (out_dir / "model.pth").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir


# ---------------------------------------------------------------- runners

class Runner:
    """One row: decode(prompt, n) -> (tokens, ttft_s, decode tok/s); prefill(prompt) -> seconds."""
    name: str
    family: str  # "ours", "llama.cpp", "transformers"
    bits: int
    weight_bytes: float  # bytes read per decoded token
    setup_s: float = 0.0  # load + compile/warm-up

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> float:
        raise NotImplementedError


class Ours(Runner):
    def __init__(self, name: str, checkpoint: Path, max_seq_len: int, compile: bool, streams: int):
        t0 = time.perf_counter()
        quantize, groupsize = OUR_ROWS[name]
        self.model = load_model(checkpoint, "cpu", torch.bfloat16, quantize=quantize, groupsize=groupsize)
        self.name, self.family, self.bits = name, "ours", BITS[name]
        self.weight_bytes = self.model.args.weight_bytes(2)
        self.engine = Engine(self.model, NoTextTokenizer(), max_batch_size=streams, max_seq_len=max_seq_len,
                             compile=compile)
        self.engine.warmup()
        self.setup_s = time.perf_counter() - t0

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        out = self.streams([prompt], n)
        return out["tokens"][0], out["ttft_s"], out["decode_tok_s"]

    def streams(self, prompts: list[list[int]], n: int) -> dict:
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            self.engine.add(f"r{i}", prompt, params)
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        t0 = time.perf_counter()
        first = None
        while self.engine.num_active:
            for out in self.engine.step():
                tokens[out.request_id] += out.token_ids
            if first is None and all(tokens.values()):
                first = time.perf_counter()
        end = time.perf_counter()
        decoded = sum(len(t) - 1 for t in tokens.values())
        return {"tokens": list(tokens.values()), "ttft_s": first - t0, "decode_tok_s": decoded / (end - first)}

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self.engine.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
        return time.perf_counter() - t0


class LlamaCpp(Runner):
    def __init__(self, kind: str, path: Path, threads: int, n_ctx: int, weight_bytes: float):
        from llama_cpp import Llama
        t0 = time.perf_counter()
        self.name, self.family, self.bits, self.weight_bytes = kind, "llama.cpp", BITS[kind], weight_bytes
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.decode([1, 2, 3], 4)  # first-call allocations
        self.setup_s = time.perf_counter() - t0

    def _next(self) -> int:
        """Greedy: the argmax of the last evaluated token's logits (the only row llama.cpp computed)."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        tokens = [self._next()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval(tokens[-1:])
            tokens.append(self._next())
        return tokens, t1 - t0, (n - 1) / (time.perf_counter() - t1)

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        self._next()
        return time.perf_counter() - t0


class Transformers(Runner):
    def __init__(self, gguf_path: Path, weight_bytes: float):
        from transformers import AutoModelForCausalLM
        t0 = time.perf_counter()
        self.name, self.family, self.bits, self.weight_bytes = "bf16 eager", "transformers", 16, weight_bytes
        self.model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.bfloat16).eval()
        self.setup_s = time.perf_counter() - t0

    def _generate(self, prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        self._generate(prompt, 1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = self._generate(prompt, n)
        return tokens, ttft, (n - 1) / (time.perf_counter() - t0 - ttft)

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self._generate(prompt, 1)
        return time.perf_counter() - t0


# ---------------------------------------------------------------- measuring

def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_model(model: str, a: argparse.Namespace, tokenizer) -> dict:
    workdir = a.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ggufs = prepare_ggufs(model, workdir)
    source = ggufs["Q4_1"] if model == "smollm2" else ggufs["F16"]  # the weights every row shares
    checkpoint = our_checkpoint(source, workdir / f"{model}-ours")
    args = ModelArgs.load(checkpoint / "config.json")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    long_text = tokenizer.encode(" ".join([CHAT_PROMPT] * 200))
    prefill_prompt = long_text[:a.prefill_tokens]
    max_seq_len = max(len(chat) + a.new_tokens, a.prefill_tokens + 1) + 8

    builders: list[tuple[str, Callable[[], Runner]]] = []
    for kind in ("F16", "Q8_0", "Q4_1"):
        if not a.no_llama_cpp:
            builders.append((kind, lambda k=kind: LlamaCpp(k, ggufs[k], a.threads, max_seq_len + 8,
                                                           gguf_weight_bytes(ggufs[k]))))
    for name in a.ours:
        builders.append((name, lambda n=name: Ours(n, checkpoint, max_seq_len, not a.eager, a.streams)))
    if not a.no_hf:
        builders.append(("transformers", lambda: Transformers(source, args.weight_bytes(2))))
    runners = []
    for label, build in builders:
        print(f"[{model}] setting up {label}", file=sys.stderr, flush=True)
        runners.append(build())
    limit = read_bandwidth(torch.device("cpu"))
    results = {r: {"decode_tok_s": [], "ttft_s": [], "prefill_tok_s": [], "streams_tok_s": [], "load": []}
               for r in range(len(runners))}
    tokens: dict[int, list[int]] = {}
    for round_ in range(a.rounds):
        for i, runner in enumerate(runners):
            out, ttft, tps = runner.decode(chat, a.new_tokens)
            prefill_s = runner.prefill(prefill_prompt)
            res = results[i]
            if a.streams > 1 and runner.family == "ours":
                streams = runner.streams([list(chat) for _ in range(a.streams)], a.new_tokens)
                res["streams_tok_s"].append(streams["decode_tok_s"])
            res["decode_tok_s"].append(tps)
            res["ttft_s"].append(ttft)
            res["prefill_tok_s"].append(len(prefill_prompt) / prefill_s)
            res["load"].append(os.getloadavg()[0])
            tokens[i] = out
            print(f"[{model}] round {round_ + 1} {runner.family:12s} {runner.name:10s} {tps:7.1f} tok/s  "
                  f"prefill {res['prefill_tok_s'][-1]:7.1f} tok/s  load {res['load'][-1]:.1f}",
                  file=sys.stderr, flush=True)
    rows = []
    reference = {family: next((i for i, r in enumerate(runners) if r.family == family and r.bits == 16), None)
                 for family in ("ours", "llama.cpp", "transformers")}
    ours_bf16 = reference["ours"]
    for i, runner in enumerate(runners):
        res = results[i]
        best, median = max(res["decode_tok_s"]), statistics.median(res["decode_tok_s"])
        ref = reference[runner.family]
        row = {"family": runner.family, "name": runner.name, "bits": runner.bits, "setup_s": runner.setup_s,
               "decode_tok_s_best": best, "decode_tok_s_median": median,
               "ttft_ms_best": 1e3 * min(res["ttft_s"]), "prefill_tok_s_best": max(res["prefill_tok_s"]),
               "prefill_tok_s_median": statistics.median(res["prefill_tok_s"]),
               "weight_mb": runner.weight_bytes / 1e6, "gb_s": runner.weight_bytes * best / 1e9,
               "of_limit": runner.weight_bytes * best / limit, "load": res["load"],
               "agree_with_16bit": None if ref is None or ref == i else agreement(tokens[i], tokens[ref]),
               "agree_with_ours_bf16": None if ours_bf16 is None or ours_bf16 == i else
               agreement(tokens[i], tokens[ours_bf16])}
        rows.append(row)
    peers = {r["bits"]: r for r in rows if r["family"] == "llama.cpp"}
    for i, row in enumerate(rows):
        peer = peers.get(row["bits"])
        if row["family"] == "ours" and peer:
            row["vs_llama_cpp_best"] = row["decode_tok_s_best"] / peer["decode_tok_s_best"]
            row["vs_llama_cpp_median"] = row["decode_tok_s_median"] / peer["decode_tok_s_median"]
            row["prefill_vs_llama_cpp"] = row["prefill_tok_s_best"] / peer["prefill_tok_s_best"]
            if results[i]["streams_tok_s"]:
                row["streams_decode_tok_s_median"] = statistics.median(results[i]["streams_tok_s"])
                row["streams_vs_llama_cpp_single"] = row["streams_decode_tok_s_median"] / peer["decode_tok_s_median"]
    return {"model": model, "read_bandwidth_gbs": limit / 1e9, "chat_prompt_tokens": len(chat), "streams": a.streams,
            "prefill_tokens": len(prefill_prompt), "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}: read limit {result['read_bandwidth_gbs']:.1f} GB/s, chat prompt "
          f"{result['chat_prompt_tokens']} tokens, prefill {result['prefill_tokens']} tokens")
    print("| runner | weights | decode tok/s best / median | vs llama.cpp | TTFT ms | prefill tok/s | vs llama.cpp "
          "| GB/s | of limit | agree (16-bit / ours bf16) | setup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        vs = f"{r['vs_llama_cpp_best']:.2f}x / {r['vs_llama_cpp_median']:.2f}x" if "vs_llama_cpp_best" in r else ""
        pvs = f"{r['prefill_vs_llama_cpp']:.2f}x" if "prefill_vs_llama_cpp" in r else ""
        agree = f"{r['agree_with_16bit'] if r['agree_with_16bit'] is not None else '-'} / " \
                f"{r['agree_with_ours_bf16'] if r['agree_with_ours_bf16'] is not None else '-'}"
        print(f"| {r['family']} | {r['name']} | {r['decode_tok_s_best']:.1f} / {r['decode_tok_s_median']:.1f} | {vs} "
              f"| {r['ttft_ms_best']:.0f} | {r['prefill_tok_s_best']:.0f} | {pvs} | {r['gb_s']:.1f} "
              f"| {r['of_limit']:.0%} | {agree} | {r['setup_s']:.0f} |")
    for r in result["rows"]:
        if "streams_decode_tok_s_median" in r:
            print(f"{r['name']}: {result['streams']} streams decode {r['streams_decode_tok_s_median']:.1f} tok/s "
                  f"in all (median), {r['streams_vs_llama_cpp_single']:.2f}x llama.cpp's single stream at equal bits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "larger"], choices=["smollm2", "larger"])
    ap.add_argument("--ours", nargs="*", default=["bf16", "int8", "int4-g32", "int4-g64"], choices=sorted(OUR_ROWS))
    ap.add_argument("--eager", action="store_true", help="our rows without torch.compile")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers eager")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--streams", type=int, default=1, help="also measure N concurrent streams in our engine")
    ap.add_argument("--workdir", type=Path, default=Path("bench_results/peers"),
                    help="where the derived GGUF files and our converted checkpoints are kept between runs")
    ap.add_argument("--json", type=Path, default=Path("bench_results/peers.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    try:
        shipped = default_model.gguf_path()
    except FileNotFoundError as e:
        sys.exit(str(e))
    tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
    results = [bench_model(m, a, tokenizer) for m in a.models]
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads, batch 1, "
          f"greedy, {a.new_tokens} new tokens, {a.rounds} interleaved rounds")
    for result in results:
        print_table(result)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"torch": torch.__version__, "threads": a.threads, "rounds": a.rounds,
                                  "new_tokens": a.new_tokens, "models": results}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
