"""Benchmark the model served by a real TorchServe against the same engine in process, in one run.

    python scripts/bench_server.py                      # the tiny default model, model_config_cpu.yaml
    python scripts/bench_server.py --shape stories110M  # random weights of that shape, the tiny tokenizer
    python scripts/bench_server.py --checkpoint checkpoints/Llama-3.1-8B-Instruct --config model_config.yaml

Reports time to first token and tokens/s of one stream (server vs in-process engine, same settings),
aggregate tokens/s with 1, 4 and 8 concurrent streams, each through /predictions and through the OpenAI API's
streamed v1/completions (server-sent events; raw HTTP, so no client-side parsing is timed), interleaved, time to first token of a ~1000-token prompt whose
first ~900 tokens are a cached prefix vs one with no cached prefix (the handler config's prefix_cache_mb), and
the time from `serve.sh start` to the first streamed token of a first start (empty compile cache) and a
second start (the compile cache the first one filled). Greedy, fixed prompts, so every run generates the
same tokens; the token counts come from a `stream: false` run of each prompt.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_server import ROOT, LocalServer  # noqa: E402

from gpt_fast.checkpoints.load import load  # noqa: E402
from gpt_fast.checkpoints.tiny import build_tiny  # noqa: E402
from gpt_fast.engine.engine import Engine, default_max_seq_len  # noqa: E402
from gpt_fast.engine.sampling import SamplingParams  # noqa: E402
from gpt_fast.model.args import NAMED_SHAPES, ModelArgs  # noqa: E402
from gpt_fast.model.transformer import Transformer  # noqa: E402
from gpt_fast.serving.config import HandlerConfig  # noqa: E402

SHARED_PREFIX_TOKENS, PREFIX_PROMPT_TOKENS = 900, 1000
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


NATIVE, OPENAI = "/predictions", "OpenAI SSE"


def stream_one(server: LocalServer, prompt: str, new_tokens: int, api: str = NATIVE) -> tuple[float, float, float]:
    """(start, first text chunk, end) wall times of one streamed greedy request through `api`."""
    if api == NATIVE:
        body, path = {"prompt": prompt, "max_new_tokens": new_tokens}, ""
    else:
        body = {"model": server.name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
        path = "completions"
    start = time.perf_counter()
    first = None
    with server.post(body, path=path, stream=True) as r:
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter()
    return start, first, time.perf_counter()


def concurrent(server: LocalServer, clients: int, per_client: int, new_tokens: int,
               counts: dict[str, int], api: str = NATIVE) -> float:
    """Aggregate generated tokens/s with `clients` streams open at once."""
    tokens = [0] * clients

    def client(c: int) -> None:
        for i in range(per_client):
            prompt = PROMPTS[(c + i * clients) % len(PROMPTS)]
            stream_one(server, prompt, new_tokens, api)
            tokens[c] += counts[prompt]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - t0)


def prefix_prompts(tokenizer, runs: int) -> tuple[list[str], list[str]]:
    """Texts of ~PREFIX_PROMPT_TOKENS tokens: `runs` that share no prefix with anything (uncached) and
    1 + `runs` that share their first ~SHARED_PREFIX_TOKENS tokens (the first one fills the cache); one more
    of each for the token counts."""
    words = " ".join(PROMPTS * 200).split(" ")

    def text(start: int, tokens: int) -> str:  # the fewest words from `start` that make `tokens` tokens
        low, high = start + 1, start + tokens  # every word is at least one token
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if len(tokenizer.encode(" ".join(words[start:mid]))) < tokens else (low, mid)
        return " ".join(words[start:low])

    shared = text(0, SHARED_PREFIX_TOKENS)
    suffix = PREFIX_PROMPT_TOKENS - SHARED_PREFIX_TOKENS
    cached = [shared + " " + text(300 + 60 * i, suffix) for i in range(runs + 2)]
    uncached = [f"Request {i}. " + text(1000 + 300 * i, PREFIX_PROMPT_TOKENS) for i in range(runs + 1)]
    return uncached, cached


def engine_prefix_ttft(engine: Engine) -> dict:
    """Median TTFT (s) of the uncached and cached prefix prompts; prompt and cached tokens of one more."""
    uncached, cached = prefix_prompts(engine.tokenizer, 3)
    result = {}
    for name, prompts in (("uncached", uncached), ("cached", cached)):
        times = []
        for prompt in prompts:
            engine.add("bench", engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=1))
            t0 = time.perf_counter()
            (out,) = engine.step()
            times.append(time.perf_counter() - t0)
        result[name] = statistics.median(times[-4:-1])
        result[f"{name}_tokens"] = (out.prompt_tokens, out.cached_tokens)
    return result


def server_prefix_ttft(server: LocalServer, tokenizer) -> dict:
    uncached, cached = prefix_prompts(tokenizer, 3)
    result = {}
    for name, prompts in (("uncached", uncached), ("cached", cached)):
        ttfts = [first - start for start, first, _ in (stream_one(server, p, 1) for p in prompts[:-1])]
        result[name] = statistics.median(ttfts[-3:])
        usage = server.post({"prompt": prompts[-1], "max_new_tokens": 1, "stream": False}).json()["usage"]
        result[f"{name}_tokens"] = (usage["prompt_tokens"], usage["cached_tokens"])
    return result


def check_openai_counts(server: LocalServer, counts: dict[str, int], new_tokens: int) -> None:
    """The OpenAI API generates the same tokens for the same greedy prompts (so the token counts serve both)."""
    for prompt, count in counts.items():
        body = {"model": server.name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0}
        usage = server.post(body, path="completions").json()["usage"]
        if usage["completion_tokens"] != count:
            raise RuntimeError(f"{prompt!r}: {usage['completion_tokens']} tokens through the OpenAI API, {count} "
                               "through /predictions")


def call_times(server: LocalServer) -> tuple[float, float]:
    """Median ms per handler call (TorchServe's 'Backend response time') and between a reply and the next
    call (the frontend's round trip), from the frontend's log of the whole run; NaN when the log configuration
    drops those lines (scripts/log4j2.xml does; GFS_LOG_CONFIG= keeps TorchServe's own)."""
    stamps, backend = [], []
    for line in server.log("ts_log.log").splitlines():
        if "Backend response time:" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()
            if stamps and stamps[-1] == stamp:
                continue  # TorchServe writes each of these lines twice
            stamps.append(stamp)
            backend.append(float(line.rsplit(":", 1)[1]))
    gaps = [(stamps[i + 1] - stamps[i]) * 1e3 - backend[i + 1] for i in range(len(stamps) - 1)]
    if not gaps:
        return math.nan, math.nan
    return statistics.median(backend), statistics.median(gaps)


def start_to_first_token(server: LocalServer) -> float:
    t0 = time.perf_counter()
    server.start()
    _, first, _ = stream_one(server, PROMPTS[0], 8)
    return first - t0


def in_process_engine(checkpoint: Path, config: HandlerConfig) -> Engine:
    """The engine with the handler's settings, warmed up."""
    model, tokenizer = load(checkpoint, "cpu" if not torch.cuda.is_available() else "cuda", config.torch_dtype(),
                            config.quantize, config.groupsize)
    engine = Engine(model, tokenizer, config.max_batch_size, config.max_seq_len or default_max_seq_len(model.args),
                    compile=config.compile, prefix_cache_bytes=config.prefix_cache_bytes())
    engine.warmup()
    return engine


def engine_one(engine: Engine, prompt: str, new_tokens: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of one request through the engine in this process."""
    engine.add("bench", engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    engine.step()
    t1 = time.perf_counter()
    n = 1
    while engine.num_active:
        n += sum(len(o.token_ids) for o in engine.step())
    return t1 - t0, (n - 1) / (time.perf_counter() - t1)


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
    frontend["startupTimeout"] = 3600  # compiling every bucket on a shared 2-core machine can take minutes
    if a.compile != "config":
        frontend["handler"]["compile"] = a.compile == "on"
    # An empty compile cache of its own, so the first start compiles everything and the second reuses it.
    frontend["handler"]["compile_cache_dir"] = str(work / "compile-cache")
    config_path = work / "model_config.yaml"
    config_path.write_text(yaml.safe_dump(frontend))
    config = HandlerConfig.from_dict(frontend["handler"], frontend["batchSize"])

    engine = in_process_engine(checkpoint, config)
    prefix_engine = engine_prefix_ttft(engine)
    load = {"before": os.getloadavg()}
    server = LocalServer(work / "run", name="bench", start_timeout=3600)
    server.archive(checkpoint, config_path)
    first_start = start_to_first_token(server)
    load["first start"] = os.getloadavg()
    try:
        counts = {p: server.post({"prompt": p, "max_new_tokens": a.new_tokens, "stream": False})
                  .json()["usage"]["completion_tokens"] for p in PROMPTS}
        check_openai_counts(server, counts, a.new_tokens)
        # One stream: engine and server requests alternate (the idle one takes no CPU), so drift in what the
        # machine gives (other tenants, memory bandwidth) hits both alike; so do the two APIs, in turns first.
        engines, servers, openai = [], [], []
        for i, prompt in enumerate(PROMPTS[:3] * 4):
            engines.append(engine_one(engine, prompt, a.new_tokens))
            for api, runs in ((NATIVE, servers), (OPENAI, openai))[::1 if i % 2 else -1]:
                start, first, end = stream_one(server, prompt, a.new_tokens, api)
                runs.append((first - start, (counts[prompt] - 1) / (end - first)))
        (ttft_engine, tps_engine), (ttft_server, tps_server), (ttft_openai, tps_openai) = (
            [statistics.median(column) for column in zip(*runs)] for runs in (engines, servers, openai))
        # Concurrent streams: the two APIs alternate at each level, in turns first (A B B A A B B A), medians.
        rounds = {(c, api): [] for c in a.concurrency for api in (NATIVE, OPENAI)}
        for c in a.concurrency:
            for api in (NATIVE, OPENAI, OPENAI, NATIVE) * 2:
                rounds[c, api].append(concurrent(server, c, 2, a.new_tokens, counts, api))
        aggregate = {key: statistics.median(runs) for key, runs in rounds.items()}
        prefix_server = server_prefix_ttft(server, engine.tokenizer)
        handler_ms, frontend_ms = call_times(server)
        load["server runs"] = os.getloadavg()
        server.stop()
        second_start = start_to_first_token(server)
        load["second start"] = os.getloadavg()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{name} with {a.config.name} (compile={config.compile}), {a.new_tokens} new tokens, "
          f"torch {torch.__version__}; load averages (1, 5, 15 min): "
          + "; ".join(f"{k} {' '.join(f'{x:.1f}' for x in v)}" for k, v in load.items()))
    print("| measure | in-process engine | TorchServe | server / engine |\n|---|---|---|---|")
    print(f"| TTFT, 1 stream (ms) | {ttft_engine * 1e3:.1f} | {ttft_server * 1e3:.1f} | |")
    print(f"| tokens/s, 1 stream | {tps_engine:.1f} | {tps_server:.1f} | {tps_server / tps_engine:.2f} |")
    print(f"| TTFT, 1 stream, {OPENAI} (ms) | | {ttft_openai * 1e3:.1f} | {ttft_openai / ttft_server:.2f}x of "
          f"{NATIVE} |")
    print(f"| tokens/s, 1 stream, {OPENAI} | | {tps_openai:.1f} | {tps_openai / tps_server:.2f}x of {NATIVE} |")
    base = aggregate[a.concurrency[0], NATIVE]
    for (c, api), tps in aggregate.items():
        print(f"| aggregate tokens/s, {c} streams, {api} | | {tps:.1f} | {tps / base:.2f}x of "
              f"{a.concurrency[0]} stream(s) {NATIVE}"
              + (f"; {tps / aggregate[c, NATIVE]:.2f}x of {NATIVE}" if api == OPENAI else "") + " |")
    for label, key in (("no cached prefix", "uncached"), ("cached prefix", "cached")):
        (pe, ce), (ps, cs) = prefix_engine[f"{key}_tokens"], prefix_server[f"{key}_tokens"]
        print(f"| TTFT ms, {label} (prompt/cached tokens {pe}/{ce} engine, {ps}/{cs} server) | "
              f"{prefix_engine[key] * 1e3:.1f} | {prefix_server[key] * 1e3:.1f} | |")
    print(f"| TTFT speed-up from the prefix cache | {prefix_engine['uncached'] / prefix_engine['cached']:.1f}x | "
          f"{prefix_server['uncached'] / prefix_server['cached']:.1f}x | |")
    print(f"| per TorchServe call: ms in the handler / ms in the frontend between calls | | "
          f"{handler_ms:.1f} / {frontend_ms:.1f} | |")
    print(f"| start to first token, s: first start / second start | | {first_start:.1f} / {second_start:.1f} | "
          f"{first_start / second_start:.1f}x faster |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"checkpoint": str(name), "config": str(a.config),
                                  "compile": config.compile, "torch": torch.__version__, "new_tokens": a.new_tokens,
                                  "engine": {"ttft_s": ttft_engine, "tokens_per_s": tps_engine},
                                  "prefix_ttft_s": {"engine": prefix_engine, "server": prefix_server},
                                  "load": load, "call_ms": {"handler": handler_ms, "frontend": frontend_ms},
                                  "server": {"ttft_s": ttft_server, "tokens_per_s": tps_server,
                                             "start_to_first_token_s": [first_start, second_start],
                                             "aggregate_tokens_per_s": {c: aggregate[c, NATIVE]
                                                                        for c in a.concurrency}},
                                  "openai": {"ttft_s": ttft_openai, "tokens_per_s": tps_openai,
                                             "aggregate_tokens_per_s": {c: aggregate[c, OPENAI]
                                                                        for c in a.concurrency}}}, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
