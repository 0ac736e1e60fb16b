"""Generate text from a converted checkpoint, like gpt-fast's generate.py.

    python -m gpt_fast.generate --checkpoint checkpoints/tiny --prompt "The capital of France" --max-new-tokens 50
    python -m gpt_fast.generate --checkpoint checkpoints/SmolLM2 --chat "What is the capital of France?"

Tensor parallel over N GPUs (or N CPU processes), rank 0 prints:

    torchrun --standalone --nproc-per-node N -m gpt_fast.generate --checkpoint ... --prompt ...
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .checkpoints.load import DTYPES, default_device, load, load_model
from .engine.engine import Engine, default_max_seq_len
from .engine.sampling import SamplingParams
from .model import tp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory, or a .pth inside one")
    text = ap.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to continue")
    text.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered by the model's chat template; "
                                                        "the answer ends with the turn")
    ap.add_argument("--system", help="with --chat: a system message before it")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--compile", action="store_true", help="torch.compile decode and prefill")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16")
    ap.add_argument("--max-seq-len", type=int, help="KV cache length (default: min(2048, model's))")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    spec = ap.add_mutually_exclusive_group()
    spec.add_argument("--draft-checkpoint", type=Path, help="speculative decoding with this draft model")
    spec.add_argument("--lookup", action="store_true", help="speculative decoding with prompt lookup")
    ap.add_argument("--draft-quantize", choices=["int8", "int4"],
                    help="quantize the draft at load (without --draft-checkpoint: the target's own weights)")
    ap.add_argument("--speculate-k", type=int, default=4, help="tokens drafted per step")
    a = ap.parse_args(argv)
    if a.system is not None and a.chat is None:
        ap.error("--system needs --chat")
    if a.draft_quantize and not a.draft_checkpoint:
        a.draft_checkpoint = a.checkpoint
    speculate = "draft" if a.draft_checkpoint else "lookup" if a.lookup else None

    try:
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p, seed=a.seed, stop=tuple(a.stop))
        device = tp.setup(torch.device(a.device or default_device()))
        t0 = time.perf_counter()
        model, tokenizer = load(a.checkpoint, device=device, dtype=DTYPES.get(a.dtype), rank=tp.rank(),
                                world_size=tp.world_size())
        draft = None
        if a.draft_checkpoint:
            draft = load_model(a.draft_checkpoint, device=device, dtype=DTYPES.get(a.dtype), rank=tp.rank(),
                               world_size=tp.world_size(), quantize=a.draft_quantize)
        engine = Engine(model, tokenizer, max_batch_size=1,
                        max_seq_len=a.max_seq_len or default_max_seq_len(model.args), compile=a.compile,
                        speculate=speculate, speculate_k=a.speculate_k, draft_model=draft,
                        seed=tp.shared_seed())  # under torchrun, every rank samples with the same seeds
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if a.compile:
            engine.warmup()
        compile_s = time.perf_counter() - t0
        if a.chat is None:
            prompt_ids = tokenizer.encode(a.prompt)
        else:
            system = [{"role": "system", "content": a.system}] if a.system is not None else []
            prompt_ids = tokenizer.encode_chat(system + [{"role": "user", "content": a.chat}])
        engine.add("cli", prompt_ids, params)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    show = tp.rank() == 0  # every rank generates the same tokens
    tokens: list[int] = []
    text = []
    t0 = time.perf_counter()
    first = None
    while engine.num_active:
        for out in engine.step():
            tokens += out.token_ids
            text.append(out.text)
            last = out
            if show and not a.json:
                print(out.text, end="", flush=True)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode_s = end - first
    tps = (len(tokens) - 1) / decode_s if len(tokens) > 1 else 0.0
    weight_bytes = model.args.weight_bytes(model.tok_embeddings.weight.element_size())
    stats = {"prompt_tokens": prompt_ids, "tokens": tokens, "text": "".join(text), "tokens_per_s": tps,
             "time_to_first_token_s": first - t0, "bandwidth_gbs": weight_bytes * tps / 1e9,
             "load_s": load_s, "compile_s": compile_s, "device": str(device),
             "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch.")}
    if speculate:
        # Mean accepted length: draft tokens the target accepted per verify pass.
        stats.update(speculate=speculate, draft_tokens=last.draft_tokens, accepted_tokens=last.accepted_tokens,
                     mean_accepted=last.accepted_tokens / max(last.draft_passes, 1))
    if show and a.json:
        print(json.dumps(stats))
    elif show:
        ranks = f", {tp.world_size()} ranks" if tp.world_size() > 1 else ""
        print(f"\n\n{len(tokens)} tokens, {tps:.1f} tokens/s, {stats['bandwidth_gbs']:.2f} GB/s, "
              f"first token {stats['time_to_first_token_s'] * 1e3:.0f} ms, load {load_s:.1f} s, "
              f"compile {compile_s:.1f} s ({device}, {stats['dtype']}{ranks})", file=sys.stderr)
        if speculate:
            print(f"speculative ({speculate}, k={a.speculate_k}): mean accepted length {stats['mean_accepted']:.2f}, "
                  f"{last.accepted_tokens}/{last.draft_tokens} drafts accepted", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    finally:
        tp.teardown()
