"""gpt_fast.serving in-process: handler config, request validation and the per-step loop (no TorchServe)."""
import json

import pytest
import torch

from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.serving import metrics
from gpt_fast.serving.config import HandlerConfig
from gpt_fast.serving.fields import RequestError
from gpt_fast.serving.loop import Reply, ServingLoop
from gpt_fast.serving.protocol import JSON, TEXT, error_body, parse_request

DEFAULTS = SamplingParams(max_new_tokens=16)


def test_handler_config_defaults_and_errors():
    config = HandlerConfig.from_dict(None, batch_size=4)
    assert config.max_batch_size == 4 and config.compile and config.checkpoint == "checkpoint"
    config = HandlerConfig.from_dict({"stop": "\n", "max_batch_size": 2, "dtype": "float32", "device": "cpu"}, 8)
    assert config.stop == ("\n",) and config.max_batch_size == 2 and config.torch_dtype() == torch.float32
    assert str(config.checkpoint_path("/models/x")) == "/models/x/checkpoint"
    assert str(HandlerConfig.from_dict({"checkpoint": "/ckpt"}, 1).checkpoint_path("/models/x")) == "/ckpt"
    for bad in ({"max_seq_lne": 8}, {"compile": "yes"}, {"max_seq_len": True}, {"dtype": "int8"},
                {"device": "tpu"}, {"top_p": 0}, {"temperature": float("nan")}, {"max_batch_size": 0},
                {"quantize": "int3"}, {"quantize": "int4", "groupsize": 48}, {"quantize": "int8", "groupsize": 32},
                {"groupsize": 64}, {"prefix_cache_mb": -1}, {"compile_cache_dir": 3}, {"speculate": "medusa"},
                {"speculate": "draft"}, {"speculate": "lookup", "draft_checkpoint": "d"}, {"draft_quantize": "int4"},
                {"speculate": "draft", "draft_quantize": "fp8"}, {"speculate": "lookup", "speculate_k": 0}):
        with pytest.raises(ValueError):
            HandlerConfig.from_dict(bad, 8)
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerConfig.from_dict({"max_seq_lne": 8}, 8)
    quantized = HandlerConfig.from_dict({"quantize": "int4", "groupsize": 64}, 8)
    assert (quantized.quantize, quantized.groupsize) == ("int4", 64)
    self_draft = HandlerConfig.from_dict({"speculate": "draft", "draft_quantize": "int4"}, 8)
    assert str(self_draft.draft_checkpoint_path("/models/x")) == "/models/x/checkpoint"
    caching = HandlerConfig.from_dict({"prefix_cache_mb": 1.5, "compile_cache_dir": "compiled"}, 8)
    assert caching.prefix_cache_bytes() == 3 * 2**19 and HandlerConfig.from_dict({}, 8).prefix_cache_bytes() == 0
    assert str(caching.compile_cache_path("/models/x")) == "/models/x/compiled"


def test_device_follows_the_gpu_torchserve_assigns():
    auto = HandlerConfig.from_dict({}, 1)
    assert auto.torch_device(None) == torch.device("cpu")
    if torch.cuda.is_available():
        assert auto.torch_device(0) == torch.device("cuda", 0)
    else:
        assert auto.torch_device(0) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA"):
            HandlerConfig.from_dict({"device": "cuda"}, 1).torch_device(0)


@pytest.mark.parametrize("body", [b'{"prompt": "hi", "stop": "x"}', '{"prompt": "hi", "stop": "x"}',
                                  {"prompt": "hi", "stop": "x"}, bytearray(b'{"prompt": "hi", "stop": "x"}')])
def test_parse_request_takes_raw_or_decoded_bodies(body, tiny_tokenizer):
    request = parse_request(body, DEFAULTS, 64, tiny_tokenizer)
    assert request.prompt_ids == tiny_tokenizer.encode("hi") and request.prompt_field == "prompt"
    assert request.stream and request.params == SamplingParams(max_new_tokens=16, stop=("x",))


def test_parse_request_errors_name_the_field(tiny_tokenizer):
    def parse(body):
        return parse_request(body, DEFAULTS, 64, tiny_tokenizer)

    with pytest.raises(RequestError) as e:
        parse({"prompt": "hi", "top_k": 2.0})
    assert json.loads(error_body(e.value)) == {"error": "must be an integer, got 2.0", "field": "top_k"}
    with pytest.raises(RequestError, match="form fields"):
        parse({"prompt": b"hi"})
    with pytest.raises(RequestError, match="at most 16"):
        parse({"prompt": "hi", "stop": ["s"] * 17})
    with pytest.raises(RequestError) as e:
        parse({"prompt": "hi", "speculate": "no"})
    assert e.value.field == "speculate"
    assert not parse({"prompt": "hi", "speculate": False}).params.speculate


@pytest.fixture(scope="module")
def tiny_tokenizer(parts):
    return parts[1]


def make_loop(parts, max_batch_size=4, prefix_cache_bytes=0, values=False):
    """The loop and the metric events it emits: (name, labels), or (name, value, labels) with values=True."""
    model, tokenizer = parts
    events = []
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=64,
                    prefix_cache_bytes=prefix_cache_bytes)
    loop = ServingLoop(lambda: engine, DEFAULTS, lambda name, value, **labels: events.append(
        (name, value, labels) if values else (name, labels)))
    return loop, events


def run(loop, bodies: dict, path: str = "") -> dict:
    """Drive the loop as TorchServe does (bodies first, then None) until every request has finished."""
    replies = {rid: [] for rid in bodies}
    batch = [(rid, body, path) for rid, body in bodies.items()]
    while batch:
        for (rid, _, _), reply in zip(batch, loop.step(batch)):
            replies[rid].append(reply)
        batch = [(rid, None, path) for rid, _, path in batch if not replies[rid][-1].finished]
    return replies


def test_loop_streams_answers_and_rejects_alone(parts):
    loop, events = make_loop(parts)
    engine = loop.engine
    replies = run(loop, {"s": {"prompt": "The capital", "max_new_tokens": 5},
                         "n": {"prompt": "The capital", "max_new_tokens": 5, "stream": False},
                         "one": {"prompt": "The capital", "max_new_tokens": 1},
                         "bad": {"prompt": "The capital", "top_p": 2}})
    expected = engine.generate([engine.tokenizer.encode("The capital")], SamplingParams(max_new_tokens=5))[0]
    # The first reply (HTTP headers) is empty: the step it starts is collected by the next call. Then one reply per
    # step, or fewer when the engine thread ran several steps before the next call (a loaded machine).
    first, *rest = [(r.first, r.body == b"") for r in replies["s"]]
    assert first == (True, True) and rest == [(False, False)] * len(rest) and 1 <= len(rest) <= 5
    assert b"".join(r.body for r in replies["s"]).decode() == expected.text
    assert replies["s"][0].content_type == TEXT and all(r.status == 200 for r in replies["s"])
    # stream: false sends nothing visible until the whole answer.
    assert all(r.body == b"" for r in replies["n"][:-1]) and replies["n"][0].content_type == JSON
    assert json.loads(replies["n"][-1].body) == {"text": expected.text, "finish_reason": "length",
                                                 "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                                           "cached_tokens": 0}}
    assert [(r.first, r.finished) for r in replies["one"]] == [(True, False), (False, True)]
    # A rejected request is done on its first reply (the handler makes that a plain, complete response).
    (bad,) = replies["bad"]
    assert bad.first and bad.finished and bad.status == 400 and json.loads(bad.body)["field"] == "top_p"
    assert engine.num_active == 0 and not loop.tracked
    names = [name for name, _ in events]
    assert {metrics.TIME_TO_FIRST_TOKEN, metrics.INTER_TOKEN_LATENCY, metrics.GENERATED_TOKENS,
            metrics.ACTIVE_SLOTS} <= set(names)
    assert sorted(labels["reason"] for name, labels in events if name == metrics.REQUESTS_FINISHED) == \
        ["error", "length", "length", "length"]


def test_loop_cancels_vanished_requests_and_queues_beyond_its_slots(parts):
    loop, events = make_loop(parts, max_batch_size=1)
    body = {"prompt": "Once upon a time", "max_new_tokens": 30}
    loop.step([("a", body, ""), ("b", body, "")])
    second = loop.step([("a", None, ""), ("b", None, "")])
    assert second[0].body and second[1] == Reply(b"", False, False)  # b waits for a's slot
    loop.step([("b", None, "")])  # a's client went away
    assert set(loop.tracked) == {"b"} and loop.engine.num_active == 1
    assert ("gpt_fast_requests_finished_total", {"reason": "cancelled"}) in events
    assert loop.step([("b", None, "")])[0].body  # b got the slot


def test_loop_frees_every_slot_when_the_engine_fails(parts, monkeypatch):
    loop, _ = make_loop(parts)
    engine_step, calls = loop.engine.step, []

    def third_step_fails():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return engine_step()

    monkeypatch.setattr(loop.engine, "step", third_step_fails)
    loop.step([("a", {"prompt": "x"}, "")])
    loop.step([("a", None, "")])
    loop.step([("a", None, ""), ("b", {"prompt": "y"}, "")])  # starts the failing step
    with pytest.raises(RuntimeError, match="device lost"):
        loop.step([("a", None, ""), ("b", None, "")])
    assert not loop.tracked and loop.engine.num_active == 0


def test_loop_reports_prefix_cache_hits(parts):
    loop, events = make_loop(parts, prefix_cache_bytes=2**20, values=True)
    system = "Once upon a time there was a little mill by the river. "
    answers = [run(loop, {rid: {"prompt": system + question, "stream": False}})[rid][-1]
               for rid, question in (("a", "Who lived there?"), ("b", "What did they eat?"))]
    usage = [json.loads(answer.body)["usage"] for answer in answers]
    assert usage[0]["cached_tokens"] == 0 and usage[1]["cached_tokens"] == 16
    totals = {}
    for name, value, labels in events:
        if name in (metrics.PREFIX_CACHE_BLOCKS, metrics.PREFIX_CACHE_SAVED_TOKENS):
            key = (name, *labels.values())
            totals[key] = totals.get(key, 0) + value
    assert totals[(metrics.PREFIX_CACHE_SAVED_TOKENS,)] == 16 and totals[(metrics.PREFIX_CACHE_BLOCKS, "hit")] == 1
    assert totals[(metrics.PREFIX_CACHE_BLOCKS, "miss")] == sum((u["prompt_tokens"] - 1) // 16 for u in usage) - 1
