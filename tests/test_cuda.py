"""The GPU path: compiled decode under CUDA graphs, the int8/int4 CUDA kernels, speculative decoding, the prefix
cache and tensor parallelism, each checked against plain eager decoding through the public API.

Every test runs once per device: `pytest -m cuda` selects the CUDA cases (scripts/gpu_check.sh runs them on the GPU
machine; they skip where there is no CUDA), and the CPU cases run in the ordinary suite, so the checks cannot rot
while no GPU is lent. The tiny model's planted rule (gpt_fast/checkpoints/tiny.py) keeps its greedy top-1 logit
well above the top-2, so bf16, int8, int4, eager and compiled all give the same tokens.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_quantize import dequantized_int4

from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.quantize import quantize_checkpoint
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model import tp
from gpt_fast.serving.config import HandlerConfig, build_engine
from gpt_fast.serving.loop import ServingLoop
from gpt_fast.text.tokenizer import load_tokenizer

PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as stored, and its int8 and int4 (device-neutral) quantized files."""
    root = tmp_path_factory.mktemp("cuda")
    return {"none": tiny_checkpoint, "int8": quantize_checkpoint(tiny_checkpoint, "int8", out_dir=root / "int8"),
            "int4": quantize_checkpoint(tiny_checkpoint, "int4", 32, root / "int4")}


def compiled(device: torch.device, weights: str = "none") -> bool:
    """Whether a test compiles: always on CUDA; on CPU, where a shape bucket costs a compile of several seconds,
    only the quantized kinds, whose compiled CPU path no other test checks (test_engine, test_speculative and
    test_prefix_cache check the unquantized one, and its recompiles)."""
    return device.type == "cuda" or weights != "none"


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CudaGraphCaptures:
    """Counts CUDA graph captures (torch.compile's reduce-overhead records one per new shape and path)."""

    def __init__(self, monkeypatch):
        self.count = 0
        if torch.cuda.is_available():
            begin = torch.cuda.CUDAGraph.capture_begin

            def counted(graph, *args, **kwargs):
                self.count += 1
                return begin(graph, *args, **kwargs)
            monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counted)


@pytest.fixture
def captures(monkeypatch) -> CudaGraphCaptures:
    return CudaGraphCaptures(monkeypatch)


def generate(engine: Engine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    return [c.tokens for c in engine.generate(prompts, params)]


def assert_warm(engine: Engine, prompts: list[list[int]], expected: list[list[int]], captures: CudaGraphCaptures):
    """After warm-up, traffic (batches that shrink as requests finish) compiles and captures nothing new."""
    graphs, recorded = compiled_graphs(), captures.count
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 9, 17, 3)]
    assert generate(engine, prompts, params) == [e[:p.max_new_tokens] for e, p in zip(expected, params)]
    assert [generate(engine, [p])[0] for p in prompts[:2]] == expected[:2]
    assert compiled_graphs() == graphs, "recompiled after warm-up"
    assert captures.count == recorded, "CUDA graphs captured after warm-up"
    # A graph that CUDA graphs refuse (CPU tensors, mutated inputs) silently runs as plain kernels.
    assert skips == 0 and torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs skipped"


@pytest.mark.parametrize("weights", ["none", "int8", "int4"])
def test_compiled_decode_equals_eager(device, weights, checkpoints, tokenizer, prompts, captures):
    model = load_model(checkpoints[weights], device, torch.bfloat16)
    expected = generate(Engine(model, tokenizer, max_batch_size=2, max_seq_len=64), prompts)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64, compile=compiled(device, weights))
    engine.warmup()
    if device.type == "cuda":
        assert captures.count > 0
    assert_warm(engine, prompts, expected, captures)


def test_int4_is_packed_from_the_device_neutral_file(device, checkpoints):
    """The stored int4 codes (two per byte, high nibble first; w = (code - 8) * scale + zero per group) are what
    the device's kernel multiplies by, once packed for it at load."""
    neutral = torch.load(checkpoints["int4"] / "model.pth", weights_only=True)
    model = load_model(checkpoints["int4"], device, torch.bfloat16)
    torch.manual_seed(0)
    for name in ("layers.0.attention.wqkv", "layers.1.feed_forward.w2", "output"):
        layer = model.get_submodule(name)
        weight = dequantized_int4(neutral[f"{name}.weight"], neutral[f"{name}.scales_and_zeros"])
        weight = weight[:, :layer.in_features]  # [out, in], the padding cut off
        x = torch.randn(3, layer.in_features).to(torch.bfloat16)
        expected = x.double() @ weight.double().t()
        got = layer(x.to(device)).double().cpu()
        assert got.shape == expected.shape
        assert (got - expected).norm() / expected.norm() < 1e-2, name


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_speculative_equals_plain(device, mode, checkpoints, tokenizer, prompts, captures):
    model = load_model(checkpoints["none"], device, torch.bfloat16)
    # Lookup drafts pay when the answer repeats the prompt: a passage the model wrote, then its opening again.
    passage = generate(Engine(model, tokenizer, 1, 128), prompts[1:2])[0]
    batch = [prompts[0], prompts[1] + passage + prompts[1][-2:]]
    expected = generate(Engine(model, tokenizer, max_batch_size=2, max_seq_len=128), batch)
    draft = load_model(checkpoints["int8"], device, torch.bfloat16) if mode == "draft" else None
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=128, compile=compiled(device), speculate=mode,
                    speculate_k=4, draft_model=draft)
    engine.warmup()
    graphs, recorded = compiled_graphs(), captures.count
    out = engine.generate(batch, GREEDY)
    assert [c.tokens for c in out] == expected
    assert sum(c.accepted_tokens for c in out) > 0  # verify passes took several tokens at once
    assert compiled_graphs() == graphs and captures.count == recorded


def test_prefix_cache_hits_equal_misses(device, checkpoints, tokenizer, prompts, captures):
    model = load_model(checkpoints["none"], device, torch.bfloat16)
    system = prompts[3] * 2  # a shared prefix of 5 whole 16-token blocks
    batch = [system + p for p in prompts[:3]]
    expected = generate(Engine(model, tokenizer, max_batch_size=2, max_seq_len=160), batch)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=160, compile=compiled(device),
                    prefix_cache_bytes=1 << 20)
    engine.warmup()
    graphs, recorded = compiled_graphs(), captures.count
    first = engine.generate(batch, GREEDY)
    again = engine.generate(batch, GREEDY)  # every prompt's blocks are cached now
    assert [c.tokens for c in first] == [c.tokens for c in again] == expected
    assert first[0].cached_tokens == 0 and all(c.cached_tokens >= 80 for c in again)
    assert compiled_graphs() == graphs and captures.count == recorded


def test_serving_loop_on_the_device(device, tiny_checkpoint, tokenizer, prompts, captures):
    """The handler's path without TorchServe: the engine built from a handler config on its own thread (CUDA graphs
    are recorded per thread), warmed up there, then streamed requests: the text eager decoding gives."""
    from test_serving import run  # noqa: PLC0415 (drives the loop as TorchServe does)
    config = HandlerConfig.from_dict({"checkpoint": str(tiny_checkpoint), "device": device.type, "compile":
                                      compiled(device), "max_batch_size": 2, "max_seq_len": 64}, 2)
    loop = ServingLoop(lambda: build_engine(config, tiny_checkpoint, 0 if device.type == "cuda" else None),
                       config.default_params())
    loop.warmup()
    graphs, recorded = compiled_graphs(), captures.count
    model = load_model(tiny_checkpoint, device, torch.bfloat16)
    expected = [c.text for c in Engine(model, tokenizer, 2, 64).generate(prompts, GREEDY)]
    # The tiny model never emits its end-of-text token: every request runs to max_new_tokens.
    bodies = {f"r{i}": {"prompt": p, "max_new_tokens": GREEDY.max_new_tokens} for i, p in enumerate(PROMPTS)}
    replies = run(loop, bodies)
    assert [b"".join(r.body for r in replies[rid]).decode() for rid in bodies] == expected
    assert compiled_graphs() == graphs and captures.count == recorded


def test_batch_and_kv_buckets_do_not_recompile(device, checkpoints, tokenizer, prompts, captures):
    """Batch buckets 1, 2, 4 and cache-length buckets 256, 320 (on CPU, multiples of 64, the lengths of eager and of
    compiled dynamic-length reads): decode crosses from one to the next."""
    model = load_model(checkpoints["none"], device, torch.bfloat16)
    long = (prompts[3] * 20)[:250]  # its decode reads past position 256
    batch = [long] + prompts[:3]
    expected = generate(Engine(model, tokenizer, max_batch_size=4, max_seq_len=320), batch)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=320, compile=compiled(device))
    kv_buckets = [256, 320] if device.type == "cuda" else [64, 128, 192, 256, 320]
    assert engine.decode_buckets == [1, 2, 4] and engine.kv_buckets == kv_buckets
    engine.warmup()
    assert_warm(engine, batch, expected, captures)


def tp_rank(rank: int, world: int, port: int, device: str, checkpoint: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dev = tp.setup(torch.device(device))
    model = load_model(checkpoint, dev, torch.bfloat16, tp.rank(), tp.world_size())
    tokenizer = load_tokenizer(Path(checkpoint))
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64, compile=dev.type == "cuda")
    engine.warmup()
    tokens = generate(engine, [tokenizer.encode(p) for p in PROMPTS])
    torch.save(tokens, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_tensor_parallel_two_ranks(device, checkpoints, tokenizer, prompts, tmp_path):
    """2 ranks (nccl on 2 GPUs, compiled; gloo on CPU, eager) decode what one process does."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism needs 2 GPUs")
    from test_tp import free_port  # noqa: PLC0415 (the helper the CPU tensor-parallel tests use)
    model = load_model(checkpoints["none"], device, torch.bfloat16)
    expected = generate(Engine(model, tokenizer, max_batch_size=2, max_seq_len=64), prompts)
    mp.spawn(tp_rank, args=(2, free_port(), device.type, str(checkpoints["none"]), str(tmp_path)), nprocs=2)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [expected] * 2
