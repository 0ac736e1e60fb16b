"""The OpenAI-compatible API, in-process (shapes, errors) and through a real TorchServe with the official client."""
import json
import threading

import openai
import pytest
import requests
from test_serve import MODEL_CONFIG, metric, served

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.serving import metrics
from gpt_fast.text.tokenizer import load_tokenizer

NAME = "gpt-fast"  # the tiny model: no chat template
CHAT = "gpt-fast-chat"  # its weights with a tokenizer.json tokenizer and a ChatML template (conftest's chat_checkpoint)
PROMPT = "Once upon a time there was a little"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, chat_checkpoint, tmp_path_factory, request):
    yield from served(tiny_checkpoint, tmp_path_factory.mktemp("serve_openai"), request,
                      {NAME: MODEL_CONFIG, CHAT: MODEL_CONFIG}, {CHAT: chat_checkpoint})


def openai_client(server, name: str) -> openai.OpenAI:
    key = server.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{server.predictions}/{name}/1.0/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, NAME)


@pytest.fixture(scope="module")
def chat_client(server):
    return openai_client(server, CHAT)


def native(server, body: dict, model: str = NAME) -> dict:
    r = server.post({**body, "stream": False}, model)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_is_the_predictions_text(server, client):
    expected = native(server, {"prompt": PROMPT, "max_new_tokens": 30})
    completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    assert completion.object == "text_completion" and completion.model == NAME
    assert completion.id.startswith("cmpl-") and completion.created > 0
    (choice,) = completion.choices
    assert choice.text == expected["text"] and choice.finish_reason == "length" and choice.logprobs is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        expected["usage"]["prompt_tokens"], 30, expected["usage"]["prompt_tokens"] + 30)
    # The /predictions request just served the same prompt: its full 16-token blocks come from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0


def test_streamed_deltas_concatenate_to_the_completion(server, client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 3  # streamed as generated
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert all(c.usage is None for c in text_chunks) and usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 40 and len({c.id for c in chunks}) == 1
    plain = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_stop_seed_and_prompt_forms_behave_as_on_predictions(server, client, tiny_checkpoint):
    for body, kw in [({"stop": "ar"}, {"stop": "ar"}), ({"stop": ["zz", "e "]}, {"stop": ["zz", "e "]}),
                     ({"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11},
                      {"temperature": 0.9, "top_p": 0.9, "seed": 11, "extra_body": {"top_k": 40}})]:
        expected = native(server, {"prompt": PROMPT, "max_new_tokens": 40, **body})
        choice = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, **kw).choices[0]
        assert (choice.text, choice.finish_reason) == (expected["text"], expected["finish_reason"]), body
    assert expected["text"] != native(server, {"prompt": PROMPT, "max_new_tokens": 40, "seed": 12,
                                               "temperature": 0.9, "top_p": 0.9, "top_k": 40})["text"]
    tokenizer = load_tokenizer(tiny_checkpoint)
    text = native(server, {"prompt": PROMPT, "max_new_tokens": 12})["text"]
    for prompt in ([PROMPT], tokenizer.encode(PROMPT), [tokenizer.encode(PROMPT)]):
        assert client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0) \
            .choices[0].text == text


def test_concurrent_streams_get_what_each_gets_alone(client):
    prompts = ["The capital of France", PROMPT, "A", "Bread and", "The river ran past the old mill",
               "Once", "The children watched the water", "It was"]
    kws = [dict(max_tokens=20 + 3 * i, temperature=0.7 * (i % 2), seed=i) for i in range(len(prompts))]
    alone = [client.completions.create(model=NAME, prompt=p, **kw).choices[0].text for p, kw in zip(prompts, kws)]
    together = {}

    def run(i: int) -> None:
        stream = client.completions.create(model=NAME, prompt=prompts[i], stream=True, **kws[i])
        together[i] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [together.get(i) for i in range(len(prompts))] == alone


def test_logprobs_and_penalties(client, tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    tokenizer = load_tokenizer(tiny_checkpoint, model.args.tokenizer, model.args.stop_token_ids)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=512)
    [expected] = engine.generate([tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=8, logprobs=2))
    choice = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2).choices[0]
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.token_bytes(t).decode() for t in expected.tokens]
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert lp.token_logprobs == pytest.approx([x.logprob for x in expected.logprobs], abs=1e-3)
    assert [list(top) for top in lp.top_logprobs] == [[tokenizer.token_bytes(t).decode() for t, _ in x.top]
                                                      for x in expected.logprobs]
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                         stream=True)
    assert [t for chunk in streamed for t in chunk.choices[0].logprobs.tokens] == lp.tokens

    penalized = SamplingParams(max_new_tokens=60, presence_penalty=1.0, frequency_penalty=2.0)
    [expected] = engine.generate([tokenizer.encode(PROMPT)], penalized)
    assert expected.tokens != engine.generate([tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=60))[0].tokens
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=60, temperature=0, presence_penalty=1.0,
                                     frequency_penalty=2.0).choices[0].text == expected.text


def test_chat_completion_is_the_predictions_messages_text(server, chat_client, chat_checkpoint):
    expected = native(server, {"messages": MESSAGES, "max_new_tokens": 20}, CHAT)
    completion = chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=20, temperature=0)
    assert completion.object == "chat.completion" and completion.model == CHAT
    assert completion.id.startswith("chatcmpl-") and completion.created > 0
    (choice,) = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", expected["text"])
    assert choice.finish_reason == expected["finish_reason"] == "length" and choice.logprobs is None
    prompt_tokens = len(load_tokenizer(chat_checkpoint).encode_chat(MESSAGES))
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        prompt_tokens, 20, prompt_tokens + 20) and expected["usage"]["prompt_tokens"] == prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16
    assert chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_completion_tokens=20,
                                               temperature=0).choices[0].message.content == expected["text"]
    short = chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=2).choices[0]
    lp = short.logprobs.content
    assert len(lp) == 8 and b"".join(bytes(t.bytes) for t in lp).decode() == short.message.content
    assert expected["text"].startswith(short.message.content)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in lp)  # greedy: the top one


def test_streamed_chat_deltas_concatenate_to_the_message(chat_client):
    whole = chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=20, temperature=0)
    content = whole.choices[0].message.content
    chunks = list(chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=20, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    role, *text_chunks, usage_chunk = chunks
    assert (role.choices[0].delta.role, role.choices[0].delta.content) == ("assistant", "")
    # Streamed: each chunk carries the tokens of the steps run since the frontend's last call, so 20 fast tokens
    # may come in as few as 2 or 3.
    assert len(text_chunks) > 1 and all(c.choices[0].delta.role is None for c in text_chunks)
    assert "".join(c.choices[0].delta.content for c in text_chunks) == content
    assert [c.choices[0].finish_reason for c in [role, *text_chunks]] == [None] * len(text_chunks) + ["length"]
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-") and all(c.usage is None for c in [role, *text_chunks])
    assert usage_chunk.choices == [] and (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        whole.usage.prompt_tokens, 20)


def test_chat_stop_and_seed_behave_as_on_predictions(server, chat_client):
    content = native(server, {"messages": MESSAGES, "max_new_tokens": 20}, CHAT)["text"]
    stop = content[len(content) // 2:len(content) // 2 + 2]
    answers = []
    for body in ({"stop": stop}, {"temperature": 0.9, "top_p": 0.9, "seed": 5}):  # the same fields in both APIs
        expected = native(server, {"messages": MESSAGES, "max_new_tokens": 20, **body}, CHAT)
        choice = chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=20,
                                                     **body).choices[0]
        assert (choice.message.content, choice.finish_reason) == (expected["text"], expected["finish_reason"])
        streamed = list(chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=20,
                                                            stream=True, **body))
        assert "".join(c.choices[0].delta.content for c in streamed) == expected["text"]
        assert streamed[-1].choices[0].finish_reason == expected["finish_reason"]
        answers.append(expected)
    stopped, sampled = answers
    assert (stopped["text"], stopped["finish_reason"]) == (content[:content.index(stop)], "stop")
    assert sampled["text"] != content


BAD_MESSAGES = [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages[1].role"),
    ([{"content": "a"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "a", "tool_call_id": "x"}], "messages[0].tool_call_id"),
    ([], "messages"),
    (None, "messages"),  # null is as if left out
]


@pytest.mark.parametrize("messages,param", BAD_MESSAGES, ids=[p for _, p in BAD_MESSAGES])
def test_bad_messages_are_bad_requests_naming_the_field(chat_client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat_client.chat.completions.create(model=CHAT, messages=messages)
    assert e.value.param == param and e.value.type == "invalid_request_error", e.value.body


def test_chat_fields_are_checked_as_chat_fields(chat_client):
    for kw, param in [(dict(logprobs=False, top_logprobs=2), "top_logprobs"), (dict(logprobs=3), "logprobs"),
                      (dict(extra_body={"prompt": "x"}), "prompt"), (dict(max_completion_tokens=0),
                                                                      "max_completion_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            chat_client.chat.completions.create(model=CHAT, messages=MESSAGES, **kw)
        assert e.value.param == param, e.value.body


def test_chat_with_a_model_without_a_template_is_a_bad_request(client):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=MESSAGES, stream=stream)
        assert e.value.status_code == 400 and "chat template" in e.value.message
        assert e.value.response.json() == {"error": {"message": e.value.body["message"],
                                                     "type": "invalid_request_error", "param": "messages",
                                                     "code": None}}


BAD_FIELDS = [
    (dict(prompt=PROMPT, max_tokens=0), "max_tokens"),
    (dict(prompt=PROMPT, max_tokens=10**6), "max_tokens"),
    (dict(prompt=PROMPT, temperature=-1), "temperature"),
    (dict(prompt=PROMPT, top_p=1.5), "top_p"),
    (dict(prompt=PROMPT, n=2), "n"),
    (dict(prompt=PROMPT, best_of=3), "best_of"),
    (dict(prompt=PROMPT, echo=True), "echo"),
    (dict(prompt=PROMPT, logprobs=21), "logprobs"),
    (dict(prompt=PROMPT, presence_penalty=3), "presence_penalty"),
    (dict(prompt=PROMPT, frequency_penalty="high"), "frequency_penalty"),
    (dict(prompt=PROMPT, seed=-1), "seed"),
    (dict(prompt=PROMPT, stop=[""]), "stop"),
    (dict(prompt=PROMPT, stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=PROMPT, logit_bias={"5": 1}), "logit_bias"),
    (dict(prompt=PROMPT, extra_body={"temperatur": 0.5}), "temperatur"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["a", "b"]), "prompt"),
    (dict(prompt=[10**7]), "prompt"),
    (dict(prompt="x " * 600), "prompt"),  # longer than the context
]


@pytest.mark.parametrize("kw,param", BAD_FIELDS, ids=[p for _, p in BAD_FIELDS])
def test_bad_fields_are_bad_requests_naming_the_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, **kw)
    assert e.value.param == param and e.value.type == "invalid_request_error", e.value.body


def test_unknown_model_path_and_key(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.post("/embeddings", body={"input": "x"}, cast_to=object)
    assert e.value.code == "unknown_url"
    # TorchServe checks the key before the handler sees the request, and answers 400 InvalidKeyException.
    wrong = openai.OpenAI(base_url=client.base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        wrong.completions.create(model=NAME, prompt=PROMPT)
    assert e.value.type == "InvalidKeyException"


def test_models_list_through_get(client):
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "gpt-fast-serve")
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_sse_framing_on_the_wire(server):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with requests.post(f"{server.openai_url}/completions", json=body, headers=server.headers, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        raw = b"".join(r.iter_content(chunk_size=None)).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"text_completion"}
    not_streamed = requests.post(f"{server.openai_url}/completions", json={**body, "stream": False,
                                 "stream_options": None}, headers=server.headers, timeout=120)
    assert not_streamed.headers["content-type"] == "application/json"
    assert not_streamed.json()["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks[:-1])


def test_metrics_count_openai_requests(server, client):
    before = metric(server, metrics.GENERATED_TOKENS)
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=7, temperature=0)
    assert metric(server, metrics.GENERATED_TOKENS) - before == 7
