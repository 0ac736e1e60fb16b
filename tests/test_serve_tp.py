"""End to end with tensor parallelism: TorchServe starts the worker as 2 CPU ranks through torchrun
(parallelType: tp); the replies must be single-process serving's, and a bad request must leave the ranks in step.
"""
import threading
import time

import pytest
import torch
from test_serve import BATCH_SIZE, FRONTEND_CONFIG, concurrently, served, solo, stream

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.text.tokenizer import load_tokenizer

MAX_SEQ_LEN = 256
# fp32, so the reference engine's sampled tokens cannot differ from the ranks' by a rounding flip.
MODEL_CONFIG = FRONTEND_CONFIG + f"""\
parallelType: tp
deviceType: cpu
torchrun:
  nproc-per-node: 2
handler:
  compile: false
  dtype: float32
  max_seq_len: {MAX_SEQ_LEN}
"""


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, request):
    yield from served(tiny_checkpoint, tmp_path_factory.mktemp("serve_tp"), request, {"gpt-fast": MODEL_CONFIG})


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_checkpoint, model.args.tokenizer, model.args.stop_token_ids)
    return Engine(model, tokenizer, max_batch_size=BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)


def test_both_ranks_serve(server):
    log = server.log("model_log.log")
    assert "tensor-parallel rank 0 of 2" in log and "tensor-parallel rank 1 of 2" in log


def test_streamed_request_matches_single_process(server, engine):
    body = {"prompt": "Once upon a time", "max_new_tokens": 60}
    chunks, _ = stream(server, body)
    assert len(chunks) > 3  # streamed as it is generated (a loaded machine merges chunks in transit)
    assert b"".join(chunks).decode() == solo(engine, body).text


def test_concurrent_requests_match_single_process(server, engine):
    bodies = [
        {"prompt": "The capital of France", "max_new_tokens": 40},
        {"prompt": "Once upon a time there was a little", "max_new_tokens": 25, "stream": False},
        {"prompt": "A", "max_new_tokens": 1},
        {"prompt": "The river ran past the old mill and the children watched the water", "max_new_tokens": 33},
        {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7},
        {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 1.0, "seed": 8, "stream": False},
        {"prompt": "The capital of France", "max_new_tokens": 40, "stop": "ar"},
        {"prompt": "Bread and butter", "max_new_tokens": 50, "temperature": 0.7},  # seeded by the ranks' engines
    ]
    texts = [text for text, _ in concurrently(server, bodies)]
    for body, text in zip(bodies[:-1], texts):
        assert text == solo(engine, body).text, body
    assert texts[-1]  # unseeded: its text is random, but it came back whole


def test_bad_request_gets_400_and_the_ranks_stay_in_step(server, engine):
    long = {"prompt": "The capital of France", "max_new_tokens": 120}
    done = {}
    in_flight = threading.Thread(target=lambda: done.update(text=b"".join(stream(server, long)[0]).decode()))
    in_flight.start()
    time.sleep(0.3)
    for body, field in (({"prompt": "x", "top_p": 1.5}, "top_p"), (b'{"prompt": "x"', "body"),
                        ({"prompt": "x " * MAX_SEQ_LEN}, "prompt")):
        r = server.post(body)
        assert r.status_code == 400 and r.json()["field"] == field
    in_flight.join(timeout=120)
    assert done["text"] == solo(engine, long).text
    body = {"prompt": "Once upon a time", "max_new_tokens": 20, "stream": False}
    r = server.post(body)
    assert r.status_code == 200 and r.json()["text"] == solo(engine, body).text
    assert "Backend worker process died" not in server.log("ts_log.log")
