"""Benchmark speculative decoding against plain decoding, side by side in one run (batch 1, greedy).

    python scripts/bench_speculative.py                 # CPU: planted-rule target of the stories110M size
    python scripts/bench_speculative.py --device cuda --shape llama-3.1-8b   # random weights, int4 draft

Speedup needs a draft that agrees with the target, and random weights do not agree with anything. So the CPU
target is the tiny model's planted rule (gpt_fast/checkpoints/tiny.py) at the stories110M size: 12 layers, dim 768 (24 heads
of 32), the tiny tokenizer's 515 tokens, unplanted matrices random (small). Its next token is decided in layer 0,
so a draft made of the target's own first two layers and output head (self-speculative, as in LayerSkip) agrees
almost always. Rows, each against the plain decoding of the same model and prompt, all engines compiled first
and then run round-robin:
  draft (agrees)           the first 2 layers of the target as draft
  draft (disagrees)        the same with its output rows shuffled: every draft is rejected, back-off limits the cost
  lookup (repeats)         prompt lookup on a prompt whose answer repeats a passage of the prompt
  lookup (random weights)  prompt lookup where the text does not repeat: low acceptance
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import NoTextTokenizer, random_model, sync  # noqa: E402

from gpt_fast.checkpoints.tiny import ordinary_pieces, planted_weights, train_tokenizer  # noqa: E402
from gpt_fast.engine.engine import Engine  # noqa: E402
from gpt_fast.engine.sampling import SamplingParams  # noqa: E402
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs  # noqa: E402
from gpt_fast.model.quantized import quantize_model  # noqa: E402
from gpt_fast.model.transformer import Transformer  # noqa: E402
from gpt_fast.text.tokenizer import SentencePieceTokenizer  # noqa: E402

DRAFT_LAYERS = 2


PLANTED_RANDOM_SCALE = 0.1  # unplanted matrices at 0.1x PyTorch's init: the rule decides through all 12 layers


def planted_target(args: ModelArgs, ordinary: list[int], dtype: torch.dtype, device: torch.device) -> Transformer:
    model = Transformer(args)
    model.load_state_dict(planted_weights(args, ordinary, PLANTED_RANDOM_SCALE), assign=True)
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
    """Decode tokens/s after the first token, and the mean accepted length, for one request."""
    engine.add("bench", prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    engine.step()  # prefill and the first token
    sync(device)
    t0 = time.perf_counter()
    while engine.num_active:
        out = engine.step()[-1]
    sync(device)
    return {"tokens_per_s": (new_tokens - 1) / (time.perf_counter() - t0), "draft_tokens": out.draft_tokens,
            "accepted_tokens": out.accepted_tokens, "mean_accepted": out.accepted_tokens / max(out.draft_passes, 1)}


def planted_scenarios(a, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[list, object]:
    """(name, baseline name, engine factory, prompt) rows on the planted target, and the tokenizer."""
    tmp = Path(tempfile.mkdtemp())
    train_tokenizer(tmp / "tokenizer.model")
    tokenizer = SentencePieceTokenizer(tmp / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "tokenizer.model"))
    args = ModelArgs(dim=768, n_layer=12, n_head=24, n_kv_heads=24, head_dim=32, intermediate_size=2048,
                     vocab_size=sp.vocab_size(), max_position_embeddings=2048, tokenizer="sentencepiece")
    target = lambda: planted_target(args, ordinary_pieces(sp), dtype, device)  # one per engine: its own caches
    rand = lambda: random_model(args, device, dtype)
    prompt = tokenizer.encode("Once upon a time there was a little")
    # A passage the target itself wrote, then the passage's opening again: the answer repeats the passage.
    passage = Engine(target(), tokenizer, 1, max_seq_len).generate(
        [prompt], SamplingParams(max_new_tokens=a.new_tokens + 20, ignore_eos=True))[0].tokens
    repeat = prompt + passage + prompt[-2:]

    def engine(make_target, mode=None, draft=None):
        def build():
            model = make_target()
            return Engine(model, tokenizer, 1, max_seq_len, compile=not a.eager, speculate=mode,
                          speculate_k=a.speculate_k, draft_model=draft and draft(model))
        return build

    return [("plain", None, engine(target), prompt),
            ("draft (agrees)", "plain", engine(target, "draft", lambda t: first_layers(t, DRAFT_LAYERS)), prompt),
            ("draft (disagrees)", "plain",
             engine(target, "draft", lambda t: first_layers(t, DRAFT_LAYERS, shuffle_output=True)), prompt),
            ("plain, repeat prompt", None, engine(target), repeat),
            ("lookup (repeats)", "plain, repeat prompt", engine(target, "lookup"), repeat),
            ("plain, random weights", None, engine(rand), prompt),
            ("lookup (random weights)", "plain, random weights", engine(rand, "lookup"), prompt)], tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(NAMED_SHAPES),
                    help="random weights of a named shape with its own int4 as draft (GPU); default: planted target")
    ap.add_argument("--speculate-k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="every engine runs once per round; the best round counts")
    ap.add_argument("--eager", action="store_true", help="skip torch.compile")
    ap.add_argument("--warmup", choices=["all", "used"], default="all",
                    help="compile every shape bucket first, or only those an untimed first request runs")
    ap.add_argument("--max-seq-len", type=int, default=512, help="KV cache length (fewer prefill buckets to compile)")
    ap.add_argument("--json", type=Path, default=Path("bench_results/speculative.json"))
    a = ap.parse_args()
    device, dtype, max_seq_len = torch.device(a.device), torch.bfloat16, a.max_seq_len

    if a.shape:
        args = ModelArgs(**NAMED_SHAPES[a.shape])
        tokenizer, prompt = NoTextTokenizer(), [1] + list(range(3, 40))

        def engine(mode=None):
            def build():
                draft = quantize_model(random_model(args, device, dtype), "int4", 128) if mode else None
                return Engine(random_model(args, device, dtype), tokenizer, 1, max_seq_len, compile=not a.eager,
                              speculate=mode, speculate_k=a.speculate_k, draft_model=draft)
            return build
        scenarios = [("plain", None, engine(), prompt), ("draft (int4 of target)", "plain", engine("draft"), prompt),
                     ("lookup", "plain", engine("lookup"), prompt)]
    else:
        scenarios, tokenizer = planted_scenarios(a, max_seq_len, device, dtype)

    engines = {}
    for name, _, build, prompt_ids in scenarios:
        t0 = time.perf_counter()
        engines[name] = build()
        if a.warmup == "all":
            engines[name].warmup()
        else:  # an untimed request compiles the shapes it runs (the first round may still meet a new one)
            run(engines[name], prompt_ids, a.new_tokens, device)
        print(f"  {name}: built and warmed up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    # Round-robin, so slow drifts of a shared machine hit every row alike.
    best: dict[str, dict] = {}
    for _ in range(a.rounds):
        for name, _, _, prompt_ids in scenarios:
            r = run(engines[name], prompt_ids, a.new_tokens, device)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    rows = []
    for name, baseline, _, _ in scenarios:
        r = {"name": name, **best[name]}
        r["vs_plain"] = r["tokens_per_s"] / best[baseline]["tokens_per_s"] if baseline else 1.0
        rows.append(r)

    print(f"\n{a.shape or 'planted stories110M-size target'} on {device} "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, bf16, "
          f"{'eager' if a.eager else 'compiled'}, batch 1, k={a.speculate_k}, {a.new_tokens} new tokens, greedy, "
          f"best of {a.rounds} rounds")
    print("| decoding                  | tok/s  | vs plain | mean accepted | accepted/drafted |")
    print("|---------------------------|--------|----------|---------------|------------------|")
    for r in rows:
        print(f"| {r['name']:25s} | {r['tokens_per_s']:6.1f} | {r['vs_plain']:7.2f}x | {r['mean_accepted']:13.2f} | "
              f"{r['accepted_tokens']:>7d}/{r['draft_tokens']:<8d} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "k": a.speculate_k,
                                  "compiled": not a.eager, "rows": rows}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
