"""Benchmark speculative decoding against plain decoding, side by side in one run (batch 1, greedy).

    python scripts/bench_speculative.py                 # CPU: planted-rule target of the stories110M size
    python scripts/bench_speculative.py --device cuda --shape llama-3.1-8b   # random weights, int4 draft

Speedup needs a draft that agrees with the target, and random weights do not agree with anything. So the CPU
target is the tiny model's planted rule (gpt_fast/tiny.py) at the stories110M size: 12 layers, dim 768 (24 heads
of 32), the tiny tokenizer's 515 tokens, unplanted matrices random. Its next token is decided in layer 0, so a
draft made of the target's own first two layers and output head (self-speculative, as in LayerSkip) agrees
almost always. Rows:
  draft (agrees)     the first 2 layers of the target as draft
  draft (disagrees)  the same with its output rows shuffled: nearly every draft is rejected, back-off limits the cost
  lookup (repeats)   prompt lookup on a prompt whose answer repeats a passage of the prompt
  lookup (no match)  prompt lookup on an ordinary prompt
"""
import argparse
import json
import platform
import sys
import tempfile
from dataclasses import replace
import time
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import NoTextTokenizer, random_model, sync  # noqa: E402
from gpt_fast.config import NAMED_SHAPES, ModelArgs  # noqa: E402
from gpt_fast.engine import Engine  # noqa: E402
from gpt_fast.model import Transformer  # noqa: E402
from gpt_fast.quantized import quantize_model  # noqa: E402
from gpt_fast.sampling import SamplingParams  # noqa: E402
from gpt_fast.tiny import ordinary_pieces, planted_weights, train_tokenizer  # noqa: E402
from gpt_fast.tokenizer import SentencePieceTokenizer  # noqa: E402

DRAFT_LAYERS = 2


def planted_target(tokenizer_path: Path, dtype: torch.dtype, device: torch.device) -> Transformer:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    args = ModelArgs(dim=768, n_layer=12, n_head=24, n_kv_heads=24, head_dim=32, intermediate_size=2048,
                     vocab_size=sp.vocab_size(), max_position_embeddings=2048, tokenizer="sentencepiece")
    model = Transformer(args)
    model.load_state_dict(planted_weights(args, ordinary_pieces(sp)), assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def first_layers(target: Transformer, n_layer: int, shuffle_output: bool = False) -> Transformer:
    """A draft made of the target's first n_layer layers, final norm and output head (the same tensors)."""
    args = replace(target.args, n_layer=n_layer)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layer}
    if shuffle_output:
        order = torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(0))
        state["output.weight"] = state["output.weight"][order.to(state["output.weight"].device)]
    with torch.device("meta"):
        draft = Transformer(args)
    draft.load_state_dict(state, assign=True)
    return draft.eval()


def run(engine: Engine, prompt: list[int], new_tokens: int, device: torch.device) -> dict:
    """Best of 3: decode tokens/s after the first token, and the mean accepted length."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    best = None
    for _ in range(3):
        engine.add("bench", prompt, params)
        engine.step()  # prefill and the first token
        sync(device)
        t0 = time.perf_counter()
        while engine.num_active:
            outs = engine.step()
        sync(device)
        tps = (new_tokens - 1) / (time.perf_counter() - t0)
        out = outs[-1]
        if best is None or tps > best["tokens_per_s"]:
            best = {"tokens_per_s": tps, "tokens": out.completion_tokens, "draft_tokens": out.draft_tokens,
                    "accepted_tokens": out.accepted_tokens,
                    "mean_accepted": out.accepted_tokens / max(out.draft_passes, 1)}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(NAMED_SHAPES),
                    help="random weights of a named shape with its own int4 as draft (GPU); default: planted target")
    ap.add_argument("--speculate-k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--eager", action="store_true", help="skip torch.compile")
    ap.add_argument("--json", type=Path, default=Path("bench_results/speculative.json"))
    a = ap.parse_args()
    device, dtype, compile = torch.device(a.device), torch.bfloat16, not a.eager
    max_seq_len = 512

    if a.shape:
        target = random_model(ModelArgs(**NAMED_SHAPES[a.shape]), device, dtype)
        draft = random_model(ModelArgs(**NAMED_SHAPES[a.shape]), device, dtype)
        quantize_model(draft, "int4", 128)
        tokenizer, prompt = NoTextTokenizer(), [1] + list(range(3, 40))
        drafts = {"draft (int4 of target)": draft}
        lookups = {}
    else:
        tmp = Path(tempfile.mkdtemp())
        train_tokenizer(tmp / "tokenizer.model")
        tokenizer = SentencePieceTokenizer(tmp / "tokenizer.model")
        target = planted_target(tmp / "tokenizer.model", dtype, device)
        prompt = tokenizer.encode("Once upon a time there was a little")
        drafts = {"draft (agrees)": first_layers(target, DRAFT_LAYERS),
                  "draft (disagrees)": first_layers(target, DRAFT_LAYERS, shuffle_output=True)}
        # A passage the target itself wrote, then the passage's opening again: the answer repeats the passage.
        plain = Engine(target, tokenizer, 1, max_seq_len)
        passage = plain.generate([prompt], SamplingParams(max_new_tokens=a.new_tokens + 20, ignore_eos=True))[0]
        lookups = {"lookup (repeats)": prompt + passage.tokens + prompt[-2:], "lookup (no match)": prompt}

    rows = []

    def measure(name: str, engine: Engine, p: list[int]) -> None:
        t0 = time.perf_counter()
        engine.warmup()
        r = run(engine, p, a.new_tokens, device)
        r.update(name=name, warmup_s=time.perf_counter() - t0)
        rows.append(r)
        print(f"  {name:24s} {r['tokens_per_s']:7.1f} tok/s, mean accepted {r['mean_accepted']:.2f}", file=sys.stderr)

    plain_tps = {}
    for p in {tuple(prompt), *(tuple(p) for p in lookups.values())}:
        engine = Engine(target, tokenizer, 1, max_seq_len, compile=compile)
        measure(f"plain ({len(p)}-token prompt)", engine, list(p))
        plain_tps[p] = rows[-1]["tokens_per_s"]
    for name, draft in drafts.items():
        engine = Engine(target, tokenizer, 1, max_seq_len, compile=compile, speculate="draft",
                        speculate_k=a.speculate_k, draft_model=draft)
        measure(name, engine, prompt)
        rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / plain_tps[tuple(prompt)]
    for name, p in lookups.items():
        engine = Engine(target, tokenizer, 1, max_seq_len, compile=compile, speculate="lookup",
                        speculate_k=a.speculate_k)
        measure(name, engine, p)
        rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / plain_tps[tuple(p)]

    print(f"\n{a.shape or 'planted stories110M-size target'} on {device} "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, bf16, "
          f"{'compiled' if compile else 'eager'}, batch 1, k={a.speculate_k}, {a.new_tokens} new tokens, greedy")
    print("| decoding                  | tok/s  | vs plain | mean accepted | accepted/drafted |")
    print("|---------------------------|--------|----------|---------------|------------------|")
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
        print(f"| {r['name']:25s} | {r['tokens_per_s']:6.1f} | {speedup:>8s} | {r['mean_accepted']:13.2f} | "
              f"{r['accepted_tokens']:>7d}/{r['draft_tokens']:<8d} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "k": a.speculate_k,
                                  "compiled": compile, "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
