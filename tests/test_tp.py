"""Tensor parallelism on 2 CPU ranks (gloo, spawned here): the sharded model computes what the whole one does."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.quantize import quantize_checkpoint
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model import tp
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.layers import Linear
from gpt_fast.model.quantized import WeightOnlyInt4Linear, WeightOnlyInt8Linear, quantize_model
from gpt_fast.model.transformer import Transformer
from gpt_fast.serving.loop import ServingLoop
from gpt_fast.text.tokenizer import load_tokenizer

WORLD = 2
PROMPTS = ["The capital of France", "Once upon a time there was a little", "A",
           "The river ran past the old mill and the children watched the water turn the wheel all day long"]
GREEDY = SamplingParams(max_new_tokens=32, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=32, temperature=0.9, top_k=50, ignore_eos=True)  # seed drawn by the engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logits_of(model: Transformer) -> torch.Tensor:
    """Full-sequence logits of two rows, then a decode step that reads the cache those rows wrote."""
    torch.manual_seed(1)
    tokens = torch.randint(3, model.args.vocab_size, (2, 21))
    model.setup_caches(2, 64)
    prefill = model(tokens[:, :20], torch.arange(20).expand(2, 20), torch.arange(2))
    decode = model(tokens[:, 20:], torch.full((2, 1), 20), kv_len=64)
    return torch.cat([prefill, decode], dim=1)


def generations(model: Transformer, tokenizer, **speculation) -> list[list[int]]:
    """Greedy and sampled continuations of every prompt, batched (4 slots for 8 requests)."""
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128, seed=tp.shared_seed(), **speculation)
    prompts = [tokenizer.encode(p) for p in PROMPTS] * 2
    return [c.tokens for c in engine.generate(prompts, [GREEDY] * 4 + [SAMPLED] * 4)]


# What the serving test sends, one new request per call; the last one is refused (400).
SERVED = [{"prompt": p, "max_new_tokens": 20 + 7 * i} for i, p in enumerate(PROMPTS)] + [
    {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 0.8, "seed": 7},
    {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 0.8},
    {"prompt": "x", "top_p": 1.5}]


def serve(model: Transformer, tokenizer) -> dict[str, tuple[int, bytes]]:
    """Drive a ServingLoop as TorchServe does, each rank at its own pace; ranks other than 0 get new requests
    without their bodies, as TorchServe 0.12 may send them. (status, text) per request."""
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128, seed=tp.shared_seed())
    loop = ServingLoop(lambda: engine, SamplingParams(max_new_tokens=16))
    pace = random.Random(tp.rank())
    new = [(f"r{i}", body if tp.rank() == 0 else None, "") for i, body in enumerate(SERVED)]
    batch, answers = [], {}
    while new or batch:
        batch += new[:1]
        new = new[1:]
        time.sleep(pace.random() * 0.005)
        replies = loop.step(batch)
        for (rid, _, _), reply in zip(batch, replies):
            status, text = answers.get(rid, (reply.status, b""))
            answers[rid] = (status, text + reply.body)
        batch = [(rid, None, "") for (rid, _, _), reply in zip(batch, replies) if not reply.finished]
    return answers


def rank_main(rank: int, port: int, checkpoints: list[tuple[str, str]], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    device = tp.setup(torch.device("cpu"))
    results = {}
    for path, dtype in checkpoints:
        model = load_model(path, device, getattr(torch, dtype), tp.rank(), tp.world_size())
        tokenizer = load_tokenizer(Path(path), model.args.tokenizer, model.args.stop_token_ids)
        results[path, dtype] = (logits_of(model), generations(model, tokenizer))
    path, dtype = checkpoints[0]
    model = load_model(path, device, getattr(torch, dtype), tp.rank(), tp.world_size())
    tokenizer = load_tokenizer(Path(path))
    results["served"] = serve(model, tokenizer)
    draft = quantize_model(load_model(path, device, getattr(torch, dtype), tp.rank(), tp.world_size()), "int8")
    results["speculative"] = {"draft": generations(model, tokenizer, speculate="draft", draft_model=draft),
                              "lookup": generations(model, tokenizer, speculate="lookup")}
    results["prefix cached"] = generations(model, tokenizer, prefix_cache_bytes=1 << 20)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def random_checkpoint(out: Path, tokenizer_dir: Path, **overrides) -> Path:
    """Random weights at a shape the tiny model does not cover, with the tiny model's tokenizer."""
    torch.manual_seed(0)
    args = ModelArgs(**{**dict(dim=256, n_layer=2, n_head=8, n_kv_heads=2, head_dim=32, intermediate_size=512,
                               vocab_size=515, tie_embeddings=True), **overrides})
    state = Transformer(args).state_dict()
    out.mkdir()
    tied = args.tie_embeddings and "output.weight"  # a tied output layer is not stored
    torch.save({k: v for k, v in state.items() if k != tied}, out / "model.pth")
    args.save(out / "config.json")
    shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("tp")
    tied = random_checkpoint(root / "tied", tiny_checkpoint)
    moe = random_checkpoint(root / "moe", tiny_checkpoint, num_experts=4, num_experts_per_tok=2, tie_embeddings=False)
    biased = random_checkpoint(root / "biased", tiny_checkpoint, qkv_bias=True)  # Qwen2's attention
    # The other families' options; Phi-3's window is in every layer, as Mistral's.
    qwen3 = random_checkpoint(root / "qwen3", tiny_checkpoint, qk_norm=True, head_dim=48)
    gemma2 = random_checkpoint(root / "gemma2", tiny_checkpoint, hidden_act="gelu_pytorch_tanh",
                               norm_unit_offset=True, post_norms=True, scale_embeddings=True, attn_scale=0.1,
                               attn_softcap=20.0, final_softcap=10.0, sliding_window=8, sliding_window_layers=[0])
    phi3 = random_checkpoint(root / "phi3", tiny_checkpoint, rotary_dim=16, sliding_window=12, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        "long_factor": [1.0, 1.5, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0], "original_max_position_embeddings": 16,
        "attention_factor": 1.2})
    return {"tiny": (str(tiny_checkpoint), "float32"),
            "int8": (str(quantize_checkpoint(tiny_checkpoint, "int8", out_dir=root / "int8")), "float32"),
            "tied": (str(tied), "float32"),
            "int4": (str(quantize_checkpoint(tied, "int4", 64, root / "int4")), "bfloat16"),
            "moe": (str(moe), "float32"),
            "moe-int8": (str(quantize_checkpoint(moe, "int8", out_dir=root / "moe-int8")), "float32"),
            "biased": (str(biased), "float32"),
            "biased-int8": (str(quantize_checkpoint(biased, "int8", out_dir=root / "biased-int8")), "float32"),
            "qwen3": (str(qwen3), "float32"),
            "gemma2": (str(gemma2), "float32"),
            "phi3": (str(phi3), "float32")}


@pytest.fixture(scope="module")
def ranks(checkpoints, tmp_path_factory) -> list[dict]:
    """What each of 2 ranks computed for every checkpoint (one spawn for all: starting ranks costs seconds)."""
    out = tmp_path_factory.mktemp("ranks")
    spawned = mp.spawn(rank_main, args=(free_port(), list(checkpoints.values()), str(out)), nprocs=WORLD,
                       join=False)
    deadline = time.monotonic() + 600
    while not spawned.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:  # ranks out of step wait for each other until gloo's 30 min timeout
            for process in spawned.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 600 s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single_process(path: str, dtype: str):
    model = load_model(path, "cpu", getattr(torch, dtype))
    return logits_of(model), generations(model, load_tokenizer(Path(path), model.args.tokenizer))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["tiny", "int8", "tied", "moe", "moe-int8", "biased", "biased-int8", "qwen3",
                                  "gemma2", "phi3"])
def test_two_ranks_match_one_process(checkpoints, ranks, name):
    key = checkpoints[name]
    logits, tokens = single_process(*key)
    for result in ranks:
        tp_logits, tp_tokens = result[key]
        assert tp_logits.shape == logits.shape
        assert relative_error(tp_logits, logits) < 1e-4
        if name in ("tiny", "int8"):  # the planted tiny model has no near-ties that rounding could flip
            assert tp_tokens[:4] == tokens[:4]


def test_int4_shards_match_one_process_within_bf16(checkpoints, ranks):
    key = checkpoints["int4"]
    logits, _ = single_process(*key)
    assert relative_error(ranks[0][key][0], logits) < 2e-2


def test_ranks_agree_on_every_token_sampled_or_not(checkpoints, ranks):
    for key in checkpoints.values():
        assert ranks[0][key][1] == ranks[1][key][1]
        assert torch.equal(ranks[0][key][0], ranks[1][key][0])


def test_serving_loop_ranks_step_together_on_rank_0s_requests(checkpoints, ranks):
    model = load_model(checkpoints["tiny"][0], "cpu", torch.float32)
    tokenizer = load_tokenizer(Path(checkpoints["tiny"][0]))
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)
    served = ranks[0]["served"]
    assert served == ranks[1]["served"]  # the same steps and tokens, although rank 1 never saw a body
    for i, body in enumerate(SERVED[:-2]):
        params = SamplingParams(max_new_tokens=body["max_new_tokens"], temperature=body.get("temperature", 0.0),
                                seed=body.get("seed"))
        expected = engine.generate([tokenizer.encode(body["prompt"])], params)[0].text
        assert served[f"r{i}"] == (200, expected.encode())
    assert served[f"r{len(SERVED) - 2}"][0] == 200  # unseeded: a seed drawn alike on both ranks
    status, error = served[f"r{len(SERVED) - 1}"]
    assert status == 400 and json.loads(error)["field"] == "top_p"


def test_speculative_decoding_under_tp(checkpoints, ranks):
    """A sharded int8 draft, or prompt lookup: greedy tokens as without speculation; sampled ones alike on both
    ranks."""
    _, tokens = single_process(*checkpoints["tiny"])
    for mode in ("draft", "lookup"):
        assert ranks[0]["speculative"][mode][:4] == tokens[:4]
        assert ranks[0]["speculative"][mode] == ranks[1]["speculative"][mode]


def test_prefix_cache_under_tp(checkpoints, ranks):
    """Each rank caches its own kv heads' prompt blocks (the repeated long prompt hits): the plain greedy tokens,
    and the same sampled tokens on every rank."""
    _, tokens = single_process(*checkpoints["tiny"])
    assert ranks[0]["prefix cached"][:4] == tokens[:4]
    assert ranks[0]["prefix cached"] == ranks[1]["prefix cached"]


def test_a_rank_holds_its_share_of_every_matrix(checkpoints):
    for name in ("int8", "moe", "qwen3", "gemma2"):  # per-head q/k norms and post norms are replicated
        full = load_model(checkpoints[name][0], "cpu", torch.float32)
        ranks = [load_model(checkpoints[name][0], "cpu", torch.float32, r, WORLD) for r in range(WORLD)]
        for key, tensor in full.state_dict().items():
            shards = [rank.state_dict()[key] for rank in ranks]
            if shards[0].shape == tensor.shape:
                assert key.endswith(("norm.weight", "tok_embeddings.weight", "gate.weight", "wo.scales", "w2.scales",
                                     "w2_scales")), key  # the only replicated tensors
                assert all(torch.equal(s, tensor) for s in shards), key
                continue
            split = next(d for d in range(tensor.dim()) if shards[0].shape[d] != tensor.shape[d])
            assert sum(s.shape[split] for s in shards) >= tensor.shape[split], key  # padding aside
            # A copy of the shard, not a view into the whole mmapped checkpoint.
            assert all(s.untyped_storage().nbytes() == s.nbytes for s in shards), key


def test_unshardable_shapes_are_rejected_naming_them(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"n_head=4, n_kv_heads=1, intermediate_size=512 \(n_kv_heads is not"):
        tp.check_shardable(4, 1, 512, WORLD)
    with pytest.raises(ValueError, match="n_head=6"):
        tp.check_shardable(6, 6, 512, 4)
    # tiny's w2 takes 344 inputs, 172 per rank: not a whole number of int4 groups of 32.
    int4 = quantize_checkpoint(tiny_checkpoint, "int4", 32, tmp_path / "int4")
    with pytest.raises(ValueError, match="feed_forward.w2.weight: int4 groups of 32 inputs do not split into "
                                         "shards of 172"):
        load_model(int4, "cpu", rank=0, world_size=WORLD)


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_every_linear_kind_shards_with_its_bias(kind):
    """Row shards stack into the whole layer's output, column shards sum to it (the bias added once)."""
    torch.manual_seed(0)
    whole = Linear(128, 48, bias=True).to(torch.bfloat16)
    if kind == "int8":
        whole = WeightOnlyInt8Linear.from_linear(whole)
    elif kind == "int4":
        whole = WeightOnlyInt4Linear.from_linear(whole, 32)
    state = {f"x.{k}": v for k, v in whole.state_dict().items()}
    x = torch.randn(3, 128, dtype=torch.bfloat16)

    def shard(split: str, inputs: torch.Tensor, *args) -> torch.Tensor:
        shard_state = dict(state)
        layer = getattr(whole, split)(shard_state, "x.", *args)
        layer.load_state_dict({k[2:]: v for k, v in shard_state.items()}, assign=True)
        if kind == "int4":
            layer.pack()
        return layer(inputs).float()

    rows = torch.cat([shard("shard_rows", x, torch.arange(r * 24, r * 24 + 24)) for r in range(WORLD)], dim=-1)
    columns = sum(shard("shard_columns", x[:, r * 64:r * 64 + 64], r * 64, 64) for r in range(WORLD))
    if kind == "int4":
        whole.pack()
    expected = whole(x).float()
    assert torch.allclose(rows, expected)
    assert torch.allclose(columns, expected, atol=0.05, rtol=0.02)  # bf16 partial sums


def test_torchrun_generate_prints_once_and_matches(tiny_checkpoint):
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--device", "cpu",
            "--dtype", "float32", "--json"]
    one = subprocess.run([sys.executable, "-m", "gpt_fast.generate", *args], capture_output=True, text=True,
                         check=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                          "-m", "gpt_fast.generate", *args], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    lines = two.stdout.splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    assert json.loads(lines[0])["tokens"] == json.loads(one.stdout)["tokens"]
