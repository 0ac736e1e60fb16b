"""Chat: templates render exactly as transformers' apply_chat_template (SmolLM2's real one and hand-written ones);
`messages` requests and `generate --chat`."""
import json

import gguf
import jinja2
import pytest
import torch
from hf_tokenizers import byte_level, metaspace
from test_serving import run
from transformers import AutoTokenizer

from gpt_fast import generate
from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.serving.fields import RequestError, chat_prompt_ids
from gpt_fast.serving.loop import ServingLoop
from gpt_fast.serving.protocol import parse_request
from gpt_fast.text.chat import ChatTemplate, ChatTemplateError
from gpt_fast.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours, transformers') for a tokenizer whose bos/eos are <|im_start|>/<|im_end|>."""
    directory = byte_level(tmp_path_factory.mktemp("chat"))
    return load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)


def assert_renders_as_transformers(tokenizers, source: str, conversations: list) -> None:
    ours, hf = tokenizers
    template = ChatTemplate(source, ours.special_tokens)
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
            assert template.render(messages, add_generation_prompt) == expected


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi 日本 🎉"}, {"role": "assistant", "content": "Hello! <b>&</b>"},
     {"role": "user", "content": "  spaces\n\nand lines  "}],
]


def test_smollm2_template_from_its_gguf(tokenizers, smollm2_gguf):
    source = gguf.GGUFReader(str(smollm2_gguf)).get_field("tokenizer.chat_template").contents()
    assert "<|im_start|>" in source
    assert_renders_as_transformers(tokenizers, source, CONVERSATIONS)
    text = ChatTemplate(source).render(CONVERSATIONS[0])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


# Llama 2's layout with what HF templates use: bos/eos, a system prompt folded into the first turn, namespace,
# tojson, dict, loop controls, strftime_now and a {% generation %} block.
SYSTEM_TEMPLATE = """{%- set ns = namespace(system='', turns=0) -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}{%- continue -%}{%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- set ns.turns = ns.turns + 1 -%}
        {{ bos_token }}[INST] {% if ns.system and ns.turns == 1 %}<<SYS>>
{{ ns.system }}
<</SYS>>

{% endif %}{{ message['content'] | trim }} [/INST]
    {%- else -%}
        {% generation %} {{ message['content'] | trim }} {{ eos_token }}{% endgeneration %}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %} {{ dict(turns=ns.turns, year=strftime_now('%Y') | length) | tojson }}{% endif -%}
"""

# Roles it does not know end in raise_exception, as Mistral's and Gemma's templates do.
STRICT_TEMPLATE = """{%- for message in messages -%}
{%- if message['role'] not in ['user', 'assistant'] -%}
{{ raise_exception('Conversation roles must be user/assistant, got ' ~ message['role']) }}
{%- endif -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif -%}
<{{ message['role'] }}>{{ message['content'] | tojson(indent=1) }}</{{ message['role'] }}>
{% endfor -%}"""


def test_hand_written_template_with_a_system_prompt(tokenizers):
    assert_renders_as_transformers(tokenizers, SYSTEM_TEMPLATE, CONVERSATIONS)
    text = ChatTemplate(SYSTEM_TEMPLATE, tokenizers[0].special_tokens).render(CONVERSATIONS[1])
    assert text.startswith("<|im_start|>[INST] <<SYS>>\nYou answer in French.\n<</SYS>>\n\nCapital of Italy? [/INST]")
    assert text.endswith('{"turns": 1, "year": 4}')


def test_raise_exception_on_a_bad_role(tokenizers):
    ours, hf = tokenizers
    assert_renders_as_transformers(tokenizers, STRICT_TEMPLATE, [CONVERSATIONS[0], CONVERSATIONS[2]])
    template = ChatTemplate(STRICT_TEMPLATE)
    for messages in ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                     [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]):
        with pytest.raises(jinja2.TemplateError) as expected:
            hf.apply_chat_template(messages, chat_template=STRICT_TEMPLATE, tokenize=False)
        with pytest.raises(ChatTemplateError) as got:
            template.render(messages)
        assert str(got.value) == str(expected.value)


def test_templates_run_sandboxed():
    for source in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                   "{{ messages[5] }}{{ undefined_function() }}", "{{ 1 / 0 }}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render([])
    assert ChatTemplate("{{ dict.__class__ }}").render([]) == ""  # the sandbox hides what it does not refuse
    with pytest.raises(ValueError, match="line 1"):
        ChatTemplate("{% if %}")


@pytest.fixture(scope="module")
def chat_tokenizer(chat_checkpoint):
    return load_tokenizer(chat_checkpoint)


BAD_MESSAGES = [  # (messages, the field the 400 names)
    ("hi", "messages"), ([], "messages"), (["hi"], "messages[0]"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role"),
    ([{"content": "a"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": "\ud800"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "a", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "a", "name": 3}], "messages[0].name"),
]


@pytest.mark.parametrize("messages, field", BAD_MESSAGES)
def test_bad_messages_name_the_field(chat_tokenizer, messages, field):
    with pytest.raises(RequestError) as e:
        chat_prompt_ids(chat_tokenizer, messages, 64)
    assert e.value.field == field


def test_messages_need_a_template_the_model_accepts(chat_tokenizer, tiny_checkpoint, tmp_path):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    expected = chat_tokenizer.encode_chat([{"role": "user", "content": "a\nb"}])
    assert chat_prompt_ids(chat_tokenizer, parts, 64) == expected
    with pytest.raises(RequestError, match="no chat template") as e:
        chat_prompt_ids(load_tokenizer(tiny_checkpoint), [{"role": "user", "content": "hi"}], 64)
    assert e.value.field == "messages"
    strict = load_tokenizer(metaspace(tmp_path))  # its template raises on a system message
    with pytest.raises(RequestError, match="^messages: Only user and assistant roles are supported!$") as e:
        chat_prompt_ids(strict, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], 64)
    assert e.value.field == "messages"


def test_prompt_or_messages(chat_tokenizer):
    messages = [{"role": "user", "content": "hi <|im_end|>"}]
    request = parse_request({"messages": messages}, SamplingParams(), 64, chat_tokenizer)
    assert request.prompt_ids == chat_tokenizer.encode_chat(messages) and request.prompt_field == "messages"
    for body, field in (({"prompt": "a", "messages": messages}, "messages"), ({}, "prompt"),
                        ({"messages": {"role": "user"}}, "messages")):
        with pytest.raises(RequestError) as e:
            parse_request(body, SamplingParams(), 64, chat_tokenizer)
        assert e.value.field == field


def test_loop_answers_messages(chat_checkpoint, chat_tokenizer):
    model = load_model(chat_checkpoint, device="cpu", dtype=torch.float32)
    engine = Engine(model, chat_tokenizer, max_batch_size=2, max_seq_len=128)
    loop = ServingLoop(lambda: engine, SamplingParams(max_new_tokens=12))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    replies = run(loop, {"s": {"messages": messages}, "n": {"messages": messages, "stream": False},
                         "bad": {"messages": [{"role": "user", "content": 1}]}})
    expected = engine.generate([chat_tokenizer.encode_chat(messages)], SamplingParams(max_new_tokens=12))[0]
    assert b"".join(r.body for r in replies["s"]).decode() == expected.text
    answer = json.loads(replies["n"][-1].body)
    assert answer["text"] == expected.text
    assert answer["usage"]["prompt_tokens"] == len(chat_tokenizer.encode_chat(messages)) == expected.prompt_tokens
    assert json.loads(replies["bad"][0].body)["field"] == "messages[0].content"


def test_cli_chat(chat_checkpoint, chat_tokenizer, tiny_checkpoint, capsys):
    generate.main(["--checkpoint", str(chat_checkpoint), "--chat", "Capital of France?", "--system", "Be brief.",
                   "--max-new-tokens", "6", "--json", "--dtype", "float32"])
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == chat_tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Capital of France?"}])
    assert result["text"] == chat_tokenizer.decode(result["tokens"])
    with pytest.raises(SystemExit, match="error: the model has no chat template"):
        generate.main(["--checkpoint", str(tiny_checkpoint), "--chat", "hi"])
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "hi", "--system", "x"])
    assert "--system needs --chat" in capsys.readouterr().err


def test_openai_chat_completions_use_the_same_messages_rule(chat_checkpoint, chat_tokenizer):
    model = load_model(chat_checkpoint, device="cpu", dtype=torch.float32)
    engine = Engine(model, chat_tokenizer, max_batch_size=2, max_seq_len=128)
    loop = ServingLoop(lambda: engine, SamplingParams(max_new_tokens=12))
    messages = [{"role": "user", "content": "Capital of France?"}]
    replies = run(loop, {"ok": {"messages": messages}, "bad": {"messages": [{"role": "robot", "content": "x"}]}},
                  "v1/chat/completions")
    expected = engine.generate([chat_tokenizer.encode_chat(messages)], SamplingParams(max_new_tokens=12))[0]
    answer = json.loads(replies["ok"][-1].body)
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens
    error = json.loads(replies["bad"][-1].body)["error"]
    assert replies["bad"][-1].status == 400 and error["param"] == "messages[0].role"
