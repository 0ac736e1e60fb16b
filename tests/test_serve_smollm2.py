"""The demo end to end on the real default model: SmolLM2-135M-Instruct served by a real TorchServe as
scripts/demo.sh serves it (tests/conftest.py's smollm2_server), asked the demo's question as a chat."""
import openai
import pytest
from test_serve import stream

from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Completion, Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.text.tokenizer import load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 16  # the answer is 8 tokens and <|im_end|>


@pytest.fixture(scope="module")
def expected(smollm2_checkpoint, smollm2_server) -> Completion:
    """The in-process engine's greedy answer, with the server's defaults (bf16) and context length."""
    card = smollm2_server.post(b"", path="models/gpt-fast").json()
    model = load_model(smollm2_checkpoint, device="cpu")
    tokenizer = load_tokenizer(smollm2_checkpoint, model.args.tokenizer, model.args.stop_token_ids)
    # batchSize 8 as in model_config_cpu.yaml: the same slot count, so the same decode shapes.
    engine = Engine(model, tokenizer, max_batch_size=8, max_seq_len=card["max_model_len"])
    return engine.generate([tokenizer.encode_chat(QUESTION)], SamplingParams(max_new_tokens=MAX_NEW_TOKENS))[0]


def test_chat_streamed_equals_non_streamed_equals_engine(smollm2_server, expected):
    body = {"messages": QUESTION, "max_new_tokens": MAX_NEW_TOKENS}
    chunks, _ = stream(smollm2_server, body)
    r = smollm2_server.post({**body, "stream": False})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["text"] == b"".join(chunks).decode() == expected.text
    assert "Paris" in expected.text
    assert answer["finish_reason"] == expected.finish_reason == "stop"  # the turn ended with <|im_end|>
    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert answer["usage"]["cached_tokens"] > 0  # the second ask prefilled from the prefix cache: the same text
    assert answer["usage"]["completion_tokens"] == len(expected.tokens) < MAX_NEW_TOKENS


def test_openai_chat_stream_is_the_same_answer(smollm2_server, expected):
    """The demo's last request: the OpenAI chat endpoint, streamed, read by the official client."""
    key = smollm2_server.headers["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=smollm2_server.openai_url, api_key=key, max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model="gpt-fast", messages=QUESTION, max_tokens=MAX_NEW_TOKENS,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"
