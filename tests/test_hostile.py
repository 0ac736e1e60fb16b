"""Hostile input in-process: whatever a request carries, it gets its own 400 (or its own error) and every other
request in the batch is served as if it were alone. scripts/soak.py does the same against a real TorchServe."""
import json
import random
import threading

import pytest

from gpt_fast.engine.engine import Engine
from gpt_fast.engine.request import Request, _partial_stop
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.serving.fields import MAX_PROMPT_CHARS_PER_TOKEN, MAX_STOP_BYTES, MAX_STOP_CHARS, RequestError
from gpt_fast.serving.openai import CompletionResponse
from gpt_fast.serving.protocol import parse_request
from test_serving import DEFAULTS, make_loop, run

PROMPT = "Once upon a time"
VALID = [{"prompt": PROMPT, "max_new_tokens": 12}, {"prompt": "The capital", "max_new_tokens": 8, "stream": False},
         {"prompt": "Bread and", "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3, "stop": ["q", "zz"]}]


def refusal(reply) -> str:
    """The field a 400 names (and that the reply is a complete JSON 400)."""
    assert reply.first and reply.finished and reply.status == 400, reply
    error = json.loads(reply.body)
    assert set(error) == {"error", "field"} and error["error"], error
    return error["field"]


@pytest.mark.parametrize("body, field", [
    (b"[" * 100_000, "body"),  # deeper than the JSON parser's recursion limit
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ({"prompt": json.loads("[" * 500 + "]" * 500)}, "prompt"),  # nested, but parsed: a wrong type
    ({"prompt": "x", "stop": "s" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"prompt": "x", "stop": ["s" * 300_000] * 16}, "stop"),
    ({"prompt": "x", "stop": ["é" * MAX_STOP_CHARS] * 3}, "stop"),  # each short enough, too many bytes in all
    ({"prompt": "x", "stop": ["s"] * 1_000_000}, "stop"),
    ({"prompt": "x", "stop": "\ud800"}, "stop"),
    ({"prompt": "x", "max_new_tokens": 10**4000}, "max_new_tokens"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "body"),  # past Python's int digit limit
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    ({"prompt": "x", "max_new_tokens": list(range(1_000_000))}, "max_new_tokens"),
    ({"prompt": "x", "y" * 6_000_000: 1}, "y" * 97 + "..."),  # echoed whole, it overflowed the worker's reply
])
def test_hostile_bodies_are_refused_naming_the_field(body, field, parts):
    with pytest.raises(RequestError) as e:
        parse_request(body if isinstance(body, bytes) else json.dumps(body), DEFAULTS, 64, parts[1])
    assert e.value.field == field
    assert len(e.value.message) < 300  # never echoes the megabytes back


def test_stop_limits_admit_what_they_say(parts):
    stop = ["é" * (MAX_STOP_BYTES // 2 // 4)] * 4  # 2 bytes per character: exactly the byte limit
    assert parse_request({"prompt": "x", "stop": stop}, DEFAULTS, 64, parts[1]).params.stop == tuple(stop)


def test_long_prompts_are_refused_before_tokenizing(parts, monkeypatch):
    loop, _ = make_loop(parts)
    limit = MAX_PROMPT_CHARS_PER_TOKEN * loop.engine.max_seq_len
    monkeypatch.setattr(loop.engine.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized an over-long prompt"))
    monkeypatch.setattr(loop.engine.tokenizer, "encode_chat", lambda *a: pytest.fail("tokenized an over-long chat"))
    messages = [{"role": "system", "content": "x" * (limit // 2)}, {"role": "user", "content": "x" * (limit // 2 + 1)}]
    (native, openai, chat) = loop.step([("a", {"prompt": "x" * (limit + 1)}, ""),
                                        ("b", {"prompt": "x" * (limit + 1)}, "v1/completions"),
                                        ("c", {"messages": messages}, "")])
    assert refusal(native) == "prompt" and str(limit) in json.loads(native.body)["error"]
    assert openai.status == 400 and json.loads(openai.body)["error"]["param"] == "prompt"
    assert refusal(chat) == "messages" and str(limit) in json.loads(chat.body)["error"]


def test_a_request_our_code_fails_ends_alone(parts, monkeypatch):
    """A bug hit on admission is that request's 500; one hit mid-stream ends that stream with an error chunk."""
    expected = run(make_loop(parts)[0], {"a": VALID[0]})["a"]
    loop, events = make_loop(parts)  # after: the KV cache lives on the model, and each engine makes its own
    encode = loop.engine.tokenizer.encode
    monkeypatch.setattr(loop.engine.tokenizer, "encode",
                        lambda text, **k: 1 / 0 if text == "boom" else encode(text, **k))
    append = Request.append

    def append_fails_for_b_and_c(self, *args):
        if self.request_id in ("b", "c") and len(self.generated) >= 3:
            raise RuntimeError("detokenizer bug")
        return append(self, *args)

    monkeypatch.setattr(Request, "append", append_fails_for_b_and_c)
    replies = run(loop, {"a": VALID[0], "b": VALID[0], "c": {**VALID[0], "stream": False}, "boom": {"prompt": "boom"}})
    assert b"".join(r.body for r in replies["a"]) == b"".join(r.body for r in expected)  # chunking follows timing
    (boom,) = replies["boom"]
    assert boom.first and boom.finished and boom.status == 500 and "internal error" in json.loads(boom.body)["error"]
    *streamed, last = replies["b"]
    assert last.finished and not last.first and b"".join(r.body for r in streamed)
    assert json.loads(last.body.decode().split("\n")[-2])["error"].startswith("internal error")
    assert json.loads(replies["c"][-1].body)["error"].startswith("internal error")  # stream: false
    assert not loop.tracked and loop.engine.num_active == 0
    reasons = sorted(labels["reason"] for name, labels in events if name == "gpt_fast_requests_finished_total")
    assert reasons == ["error", "error", "error", "length"]


@pytest.mark.parametrize("stream", [True, False])
def test_openai_answers_end_with_an_error_object_when_our_code_fails(parts, stream):
    last = CompletionResponse("r", "m", stream, False, False, parts[1]).fail("internal error")
    if stream:  # an event the official client raises on, then the end of the stream
        event, done = last.decode().split("\n\n")[:2]
        assert event.startswith("data: ") and done == "data: [DONE]"
        last = event[len("data: "):].encode()
    assert json.loads(last)["error"] == {"message": "internal error", "type": "server_error", "param": None,
                                         "code": "internal_error"}


def mutations(rng: random.Random) -> bytes:
    """One hostile body: a valid one mangled, or a field given a random JSON value."""
    body = dict(rng.choice(VALID))
    values = [None, True, -1, 0, 2**64, -1e308, 1.5, "", "x" * rng.randint(1, 3000), "\ud800", [], [1, "a"], {},
              {"a": [None]}, ["s"] * 20, json.loads("[" * 200 + "]" * 200)]
    kind = rng.randrange(5)
    if kind == 0:
        body[rng.choice([*body, "prompt", "stop", "seed", "bogus"])] = rng.choice(values)
        return json.dumps(body).encode()
    raw = bytearray(json.dumps(body).encode())
    if kind == 1:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif kind == 2:
        del raw[rng.randrange(len(raw)):]
    elif kind == 3:
        at = rng.randrange(len(raw))
        raw[at:at] = rng.choice([b"[" * 5000, b'{"a":' * 3000, b"\xff\xfe", b"NaN", b"\\ud800", b"1e999"])
    else:
        raw = bytearray(rng.randbytes(rng.randint(0, 200)))
    return bytes(raw)


def test_fuzzed_bodies_get_400s_and_never_disturb_the_batch(parts):
    solo = b"".join(r.body for r in run(make_loop(parts)[0], {"v": VALID[0]})["v"])
    loop, _ = make_loop(parts)
    rng = random.Random(17)
    valid, replies, served, refused, admitted = "v0", [], 0, 0, 0
    batch = [(valid, VALID[0], "")]
    for i in range(100):
        fuzz = [(f"f{i}-{j}", mutations(rng), "") for j in range(6)]
        for (rid, body, _), reply in zip(batch + fuzz, loop.step(batch + fuzz)):
            if rid == valid:
                replies.append(reply.body)
            elif body is None:
                continue  # an admitted mutation, still generating
            elif reply.status == 400:
                refusal(reply)
                refused += 1
            else:  # the mutation left a valid request: it is served like any other
                assert reply.status == 200 and reply.first and not reply.finished, reply
                admitted += 1
        if valid not in loop.tracked:  # finished: exactly what it would have been alone
            assert b"".join(replies) == solo
            served += 1
            valid, replies = f"v{i + 1}", []
            batch = [(valid, VALID[0], "")]
        else:
            batch = [(valid, None, "")]
        batch += [(rid, None, "") for rid in loop.tracked if rid != valid]
    assert served > 5 and refused > 500 and admitted > 5


def test_partial_stop_is_the_longest_tail_that_starts_a_stop_string():
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 10)))
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        brute = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        assert _partial_stop(text, stops) == brute, (text, stops)


def test_a_megabyte_stop_string_does_not_stall_a_concurrent_request(parts):
    """Holding back text that may grow into a stop string used to check every prefix of it: a 1 MB stop string
    took ~20 s per step, on the thread every request shares. Now it costs what the text's length does."""
    model, tokenizer = parts
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    prompt = tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=30)
    alone = engine.generate([prompt], params)[0]
    # The stop string starts like the output, so text is held back, then released when it stops matching.
    huge = SamplingParams(max_new_tokens=30, stop=(alone.text[:6] + "\x00" * 2**20,))
    done = []
    both = threading.Thread(target=lambda: done.extend(engine.generate([prompt, prompt], [huge, params])), daemon=True)
    both.start()
    both.join(timeout=120)  # a liveness bound, ~1000x what it takes: the old check needed hours here
    assert done, "the request with a 1 MB stop string stalled the batch"
    assert done[0].text == done[1].text == alone.text
