"""Benchmark the model served by a real TorchServe against the same engine in process, in one run.

    python scripts/bench_server.py                      # the tiny default model, model_config_cpu.yaml
    python scripts/bench_server.py --shape stories110M  # random weights of that shape, the tiny tokenizer
    python scripts/bench_server.py --checkpoint checkpoints/Llama-3.1-8B-Instruct --config model_config.yaml

Reports time to first token and tokens/s of one stream (server vs in-process engine, same settings), and
aggregate tokens/s with 1, 4 and 8 concurrent streams. Greedy, fixed prompts, so every run generates the
same tokens; the token counts come from a `stream: false` run of each prompt.
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpt_fast.checkpoint import load_model  # noqa: E402
from gpt_fast.config import NAMED_SHAPES, ModelArgs  # noqa: E402
from gpt_fast.engine import Engine, default_max_seq_len  # noqa: E402
from gpt_fast.model import Transformer  # noqa: E402
from gpt_fast.sampling import SamplingParams  # noqa: E402
from gpt_fast.serving import HandlerConfig  # noqa: E402
from gpt_fast.tiny import build_tiny  # noqa: E402
from gpt_fast.tokenizer import load_tokenizer  # noqa: E402
from local_server import ROOT, LocalServer  # noqa: E402

PROMPTS = ["The capital of France", "Once upon a time there was a little", "Bread and butter",
           "The river ran past the old mill", "In the morning the market", "She opened the letter and",
           "Three ships sailed", "A quiet street in the rain"]


def random_checkpoint(shape: str, out: Path) -> Path:
    """Random bf16 weights of a named shape with the tiny model's tokenizer (so the vocabulary is the tokenizer's)."""
    tiny = build_tiny(out / "tiny")
    args = ModelArgs(**{**NAMED_SHAPES[shape], "vocab_size": ModelArgs.load(tiny / "config.json").vocab_size,
                        "tokenizer": "sentencepiece", "rope_scaling": None, "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = Transformer(args).to(torch.bfloat16)
    path = out / shape
    path.mkdir()
    torch.save(model.state_dict(), path / "model.pth")
    args.save(path / "config.json")
    (path / "tokenizer.model").write_bytes((tiny / "tokenizer.model").read_bytes())
    return path


def stream_one(server: LocalServer, prompt: str, new_tokens: int) -> tuple[float, float, float]:
    """(start, first text chunk, end) wall times of one streamed request."""
    start = time.perf_counter()
    first = None
    with server.post({"prompt": prompt, "max_new_tokens": new_tokens}, stream=True) as r:
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter()
    return start, first, time.perf_counter()


def concurrent(server: LocalServer, clients: int, per_client: int, new_tokens: int,
               counts: dict[str, int]) -> float:
    """Aggregate generated tokens/s with `clients` streams open at once."""
    tokens = [0] * clients

    def client(c: int) -> None:
        for i in range(per_client):
            prompt = PROMPTS[(c + i * clients) % len(PROMPTS)]
            stream_one(server, prompt, new_tokens)
            tokens[c] += counts[prompt]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0)


def in_process(checkpoint: Path, config: HandlerConfig, new_tokens: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of one request through the engine with the handler's settings."""
    model = load_model(checkpoint, "cpu" if not torch.cuda.is_available() else "cuda", config.torch_dtype())
    tokenizer = load_tokenizer(checkpoint, model.args.tokenizer, model.args.stop_token_ids)
    engine = Engine(model, tokenizer, config.max_batch_size, config.max_seq_len or default_max_seq_len(model.args),
                    compile=config.compile)
    engine.warmup()
    ttfts, rates = [], []
    for prompt in PROMPTS[:3] * 2:
        engine.add("bench", tokenizer.encode(prompt), SamplingParams(max_new_tokens=new_tokens))
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        n = 1
        while engine.num_active:
            n += sum(len(o.token_ids) for o in engine.step())
        ttfts.append(t1 - t0)
        rates.append((n - 1) / (time.perf_counter() - t1))
    return statistics.median(ttfts), statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="default: build the tiny model in a temp dir")
    src.add_argument("--shape", choices=sorted(NAMED_SHAPES), help="random weights of a named shape")
    ap.add_argument("--config", type=Path, default=ROOT / "model_config_cpu.yaml")
    ap.add_argument("--compile", choices=["config", "on", "off"], default="config")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--json", type=Path, default=Path("bench_results/server.json"))
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    checkpoint = a.checkpoint or (random_checkpoint(a.shape, work) if a.shape else build_tiny(work / "tiny"))
    name = a.checkpoint or a.shape or "tiny"
    frontend = yaml.safe_load(a.config.read_text())
    frontend["batchSize"] = max(frontend["batchSize"], *a.concurrency)
    if a.compile != "config":
        frontend["handler"]["compile"] = a.compile == "on"
    config_path = work / "model_config.yaml"
    config_path.write_text(yaml.safe_dump(frontend))
    config = HandlerConfig.from_dict(frontend["handler"], frontend["batchSize"])

    ttft_engine, tps_engine = in_process(checkpoint, config, a.new_tokens)
    server = LocalServer(work / "run", name="bench", start_timeout=3600)
    t0 = time.perf_counter()
    server.archive_and_start(checkpoint, config_path)
    start_s = time.perf_counter() - t0
    try:
        counts = {p: server.post({"prompt": p, "max_new_tokens": a.new_tokens, "stream": False})
                  .json()["usage"]["completion_tokens"] for p in PROMPTS}
        singles = [stream_one(server, p, a.new_tokens) for p in PROMPTS[:3] * 2]
        ttft_server = statistics.median(first - start for start, first, _ in singles)
        tps_server = statistics.median((counts[p] - 1) / (end - first)
                                       for p, (_, first, end) in zip(PROMPTS[:3] * 2, singles))
        aggregate = {c: concurrent(server, c, 2, a.new_tokens, counts) for c in a.concurrency}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{name} with {a.config.name} (compile={config.compile}), {a.new_tokens} new tokens, "
          f"torch {torch.__version__}; server start {start_s:.0f} s")
    print("| measure | in-process engine | TorchServe | server / engine |\n|---|---|---|---|")
    print(f"| TTFT, 1 stream (ms) | {ttft_engine * 1e3:.1f} | {ttft_server * 1e3:.1f} | |")
    print(f"| tokens/s, 1 stream | {tps_engine:.1f} | {tps_server:.1f} | {tps_server / tps_engine:.2f} |")
    for c, tps in aggregate.items():
        print(f"| aggregate tokens/s, {c} streams | | {tps:.1f} | {tps / aggregate[a.concurrency[0]]:.2f}x of "
              f"{a.concurrency[0]} stream(s) |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"checkpoint": str(name), "config": str(a.config),
                                  "compile": config.compile, "torch": torch.__version__, "new_tokens": a.new_tokens,
                                  "engine": {"ttft_s": ttft_engine, "tokens_per_s": tps_engine},
                                  "server": {"ttft_s": ttft_server, "tokens_per_s": tps_server,
                                             "start_s": start_s, "aggregate_tokens_per_s": aggregate}}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
