"""End to end: the tiny model archived by scripts/archive.sh, served by real TorchServe (Java) on 127.0.0.1.

One server for the module, on free ports with its own run directory, stopped by the fixture even when a
test fails (its logs are then printed). The reference answers come from the in-process engine.
"""
import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.serving import metrics
from gpt_fast.text.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from local_server import LocalServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8
MAX_SEQ_LEN = 512
# The frontend settings every test server shares (tests/test_serve_tp.py too).
FRONTEND_CONFIG = f"""\
minWorkers: 1
maxWorkers: 1
batchSize: {BATCH_SIZE}
maxBatchDelay: 20
responseTimeout: 60
startupTimeout: 120
continuousBatching: true
"""
# compile: false keeps startup to seconds (compiling every bucket takes minutes on a small CPU).
MODEL_CONFIG = FRONTEND_CONFIG + f"""\
handler:
  compile: false
  max_seq_len: {MAX_SEQ_LEN}
  prefix_cache_mb: 4
"""
REQUEST = json.loads((ROOT / "request.json").read_text())
# The same model served with speculative decoding, drafting with its own weights.
SPECULATIVE = "gpt-fast-speculative"
SPECULATIVE_CONFIG = MODEL_CONFIG + """\
  speculate: draft
  draft_checkpoint: checkpoint
  speculate_k: 4
"""


def served(checkpoint: Path, run_dir: Path, request, configs: dict[str, str],
           in_place: bool = False) -> Iterator[LocalServer]:
    """A module fixture's body: the checkpoint served under each name with its model_config text (the first is
    the server's own name; in_place: archive.sh --no-archive); stopped at the end, its logs printed when it failed
    to start or a test failed."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (scripts/setup.sh installs it)")
    paths = []
    for name, text in configs.items():
        paths.append((name, run_dir / f"model_config_{name}.yaml"))
        paths[-1][1].write_text(text)
    srv = LocalServer(run_dir, name=paths[0][0])
    failed_before, up = request.session.testsfailed, False
    try:
        srv.archive_and_start(checkpoint, paths[0][1], more=tuple(paths[1:]), in_place=in_place)
        up = True
        yield srv
    finally:
        stopped = srv.stop()
        if not up or request.session.testsfailed > failed_before or stopped.returncode != 0:
            # Straight to the terminal: a module fixture's teardown output is not shown otherwise.
            for name in ("ts_log.log", "model_log.log"):
                sys.__stderr__.write(f"\n===== {name} (tail) =====\n{srv.log(name)[-20000:]}\n")
            sys.__stderr__.write(f"\n===== serve.sh stop =====\n{stopped.stdout}{stopped.stderr}\n")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, request):
    yield from served(tiny_checkpoint, tmp_path_factory.mktemp("serve"), request,
                      {"gpt-fast": MODEL_CONFIG, SPECULATIVE: SPECULATIVE_CONFIG})


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The in-process engine with the server's settings (default dtype, same context length)."""
    model = load_model(tiny_checkpoint, device="cpu")
    tokenizer = load_tokenizer(tiny_checkpoint, model.args.tokenizer, model.args.stop_token_ids)
    return Engine(model, tokenizer, max_batch_size=BATCH_SIZE, max_seq_len=MAX_SEQ_LEN)


def solo(engine: Engine, body: dict):
    params = SamplingParams(max_new_tokens=body.get("max_new_tokens", 256), temperature=body.get("temperature", 0.0),
                            top_k=body.get("top_k", 0), top_p=body.get("top_p", 1.0), seed=body.get("seed"),
                            stop=tuple([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop", ())))
    return engine.generate([engine.tokenizer.encode(body["prompt"])], params)[0]


def stream(server: LocalServer, body: dict, model: Optional[str] = None) -> tuple[list[bytes], list[float]]:
    """POST and read the chunks as they arrive; returns them and their arrival times."""
    chunks, times = [], []
    with server.post(body, model, stream=True) as r:
        assert r.status_code == 200, r.text
        for chunk in r.iter_content(chunk_size=None):
            chunks.append(chunk)
            times.append(time.perf_counter())
    return chunks, times


def worker_starts(server: LocalServer) -> int:
    return server.log("model_log.log").count("Torch worker started.")


def test_streamed_equals_non_streamed_equals_engine(server, engine):
    chunks, times = stream(server, REQUEST)
    # Sent as steps finish: about one chunk per token, fewer when the frontend is slower than a decode step
    # (the engine thread keeps decoding and the next reply carries several tokens).
    assert len(chunks) > 3
    assert times[-1] - times[0] > 0.01
    text = b"".join(chunks).decode()

    r = server.post({**REQUEST, "stream": False})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    answer = r.json()
    expected = solo(engine, REQUEST)
    assert answer["text"] == text == expected.text
    assert answer["finish_reason"] == "length"  # the tiny model never emits eos
    assert answer["usage"] == {"prompt_tokens": expected.prompt_tokens,
                               "completion_tokens": REQUEST["max_new_tokens"], "cached_tokens": 0}


def test_speculative_model_streams_the_plain_greedy_text(server, engine):
    body = {"prompt": "Once upon a time there was a little", "max_new_tokens": 40}
    chunks, _ = stream(server, body, SPECULATIVE)
    expected = solo(engine, body)
    assert b"".join(chunks).decode() == expected.text
    r = server.post({**body, "stream": False}, SPECULATIVE)
    assert r.status_code == 200 and r.json()["text"] == expected.text
    usage = r.json()["usage"]
    assert usage["accepted_tokens"] == usage["draft_tokens"] > 0  # the draft is the model itself
    opted_out = server.post({**body, "stream": False, "speculate": False}, SPECULATIVE).json()
    assert opted_out["text"] == expected.text and opted_out["usage"]["draft_tokens"] == 0


def concurrently(server: LocalServer, bodies: list[dict]) -> list[tuple[str, Optional[str]]]:
    """Send every body at once; (text, finish_reason) of each, finish_reason None for streamed ones."""
    results: dict[int, tuple[str, Optional[str]]] = {}

    def run(i: int) -> None:
        if bodies[i].get("stream", True):
            chunks, _ = stream(server, bodies[i])
            results[i] = (b"".join(chunks).decode(), None)
        else:
            r = server.post(bodies[i])
            assert r.status_code == 200, r.text
            results[i] = (r.json()["text"], r.json()["finish_reason"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(len(bodies)))
    return [results[i] for i in range(len(bodies))]


def test_concurrent_requests_match_their_solo_results(server, engine):
    bodies = [
        {"prompt": "The capital of France", "max_new_tokens": 40},
        {"prompt": "Once upon a time there was a little", "max_new_tokens": 25, "stream": False},
        {"prompt": "A", "max_new_tokens": 1},  # done on its first step
        {"prompt": "A", "max_new_tokens": 1, "stream": False},
        {"prompt": "The river ran past the old mill and the children watched the water", "max_new_tokens": 33},
        {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7},
        {"prompt": "Bread and", "max_new_tokens": 30, "temperature": 1.0, "seed": 8, "stream": False},
        {"prompt": "The capital of France", "max_new_tokens": 40, "stop": "ar"},
    ]
    for body, (text, reason) in zip(bodies, concurrently(server, bodies)):
        expected = solo(engine, body)
        assert text == expected.text, body
        assert reason in (None, expected.finish_reason), body
    assert solo(engine, bodies[-1]).finish_reason == "stop"  # the stop string was hit


BAD_REQUESTS = [
    (b"", "body"),
    (b"\xff\xfe{not utf-8", "body"),
    (b'{"prompt": "The capital', "body"),  # malformed JSON
    (b'["The capital of France"]', "body"),  # not an object
    (b'"The capital of France"', "body"),
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),  # a bool is not an int
    ({"prompt": "x", "max_new_tokens": 5.5}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": -3}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**12}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "stop": ["ok", 3]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "temperatur": 0.5}, "temperatur"),  # unknown field
    ({"prompt": "x " * MAX_SEQ_LEN}, "prompt"),  # longer than the context
    (b'{"prompt": "\\ud800"}', "prompt"),  # an unpaired surrogate
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b"[" * 1000, "body"),  # nested past the JSON parser's recursion limit
    (b'{"prompt": ' + b"[" * 1000 + b"}", "body"),
    ({"prompt": "x", "stop": ["s" * 300_000] * 16}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),  # the tiny model has no chat template
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "messages"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
]


def test_bad_requests_get_400_for_themselves_alone(server, engine):
    starts = worker_starts(server)
    long = {"prompt": "The capital of France", "max_new_tokens": 120}
    done = {}
    in_flight = threading.Thread(target=lambda: done.update(text=b"".join(stream(server, long)[0]).decode()))
    in_flight.start()  # shares its steps with every bad request below
    time.sleep(0.3)
    for body, field in BAD_REQUESTS:
        r = server.post(body)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"] == "application/json"
        error = r.json()
        assert set(error) == {"error", "field"} and error["field"] == field, (body, error)
    # Form fields (curl --data without a Content-Type) are refused the same way, saying what to add; JSON sent as a
    # form arrives as nothing at all.
    form = {**server.headers, "Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"prompt=hello", json.dumps(REQUEST).encode()):
        r = server.post(body, headers=form)
        assert r.status_code == 400 and r.json()["field"] == "body"
        assert '-H "Content-Type: application/json"' in r.json()["error"]
    in_flight.join(timeout=120)
    assert done["text"] == solo(engine, long).text
    r = server.post({**REQUEST, "stream": False})
    assert r.status_code == 200 and r.json()["text"] == solo(engine, REQUEST).text
    assert worker_starts(server) == starts == 2  # one worker per model, never restarted
    assert "Backend worker process died" not in server.log("ts_log.log")


def test_client_disconnect_frees_its_slot(server, engine):
    def cancelled() -> float:
        return metric(server, metrics.REQUESTS_FINISHED, 'Reason="cancelled"')

    before = cancelled()
    abandoned = [server.post({"prompt": "Once upon a time", "max_new_tokens": MAX_SEQ_LEN - 10}, stream=True)
                 for _ in range(BATCH_SIZE)]
    for r in abandoned:
        assert r.status_code == 200
        next(r.iter_content(chunk_size=None))
        r.close()  # drops the connection mid-stream
    # A full batch right behind them: it gets the slots only if the abandoned requests freed theirs.
    body = {"prompt": "The capital of France", "max_new_tokens": 20, "stream": False}
    with_slots = []
    threads = [threading.Thread(target=lambda: with_slots.append(server.post(body))) for _ in range(BATCH_SIZE)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - start
    expected = solo(engine, body).text
    assert [r.status_code for r in with_slots] == [200] * BATCH_SIZE
    assert all(r.json()["text"] == expected for r in with_slots)
    assert cancelled() - before == BATCH_SIZE
    assert metric(server, metrics.ACTIVE_SLOTS) == 0
    # Had the abandoned requests kept their slots, this batch would have waited ~500 steps for them.
    assert elapsed < 60


def test_requests_without_the_token_are_refused(server):
    for headers in ({"Content-Type": "application/json"},
                    {"Content-Type": "application/json", "Authorization": "Bearer not-the-key"}):
        r = server.post(REQUEST, headers=headers)
        # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"


def metric(server: LocalServer, name: str, labels: str = "") -> float:
    text = requests.get(server.metrics_url, timeout=30).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", text, re.M)]
    return sum(values)


def test_metrics_endpoint_lists_our_metrics(server):
    assert server.post({**REQUEST, "stream": False}).status_code == 200
    text = requests.get(server.metrics_url, timeout=30).text
    for name in (metrics.GENERATED_TOKENS, metrics.REQUESTS_FINISHED, metrics.ACTIVE_SLOTS):
        assert re.search(rf"^{name}{{.*ModelName=\"gpt-fast\"", text, re.M), name
    for name in (metrics.TIME_TO_FIRST_TOKEN, metrics.INTER_TOKEN_LATENCY):
        assert re.search(rf"^{name}_count{{.*}} [1-9]", text, re.M), name
    assert metric(server, metrics.GENERATED_TOKENS) >= REQUEST["max_new_tokens"]
    assert metric(server, metrics.REQUESTS_FINISHED, 'Reason="length"') >= 1


def test_shared_prefix_is_served_from_the_cache(server, engine):
    system = "The river ran past the old mill and the children watched the water turn the wheel. "
    bodies = [{"prompt": system + q, "max_new_tokens": 12, "stream": False} for q in ("Who?", "Why not?")]
    saved_before = metric(server, metrics.PREFIX_CACHE_SAVED_TOKENS)
    answers = [server.post(body).json() for body in bodies]
    assert [a["text"] for a in answers] == [solo(engine, body).text for body in bodies]
    cached = answers[1]["usage"]["cached_tokens"]
    assert cached >= 16 and cached % 16 == 0
    assert metric(server, metrics.PREFIX_CACHE_SAVED_TOKENS) - saved_before >= cached
    assert metric(server, metrics.PREFIX_CACHE_BLOCKS, 'Event="hit"') >= cached // 16
