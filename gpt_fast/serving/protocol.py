"""What a request protocol hands the serving loop (Generation, Answer), and the native /predictions protocol:
a JSON object in; the streamed UTF-8 text, or one JSON object, out.

Request fields are in the README's table. A bad request gets HTTP 400 with {"error": message, "field": name}; a
request our code fails gets 500 {"error": message, "field": null}, or, once its answer has begun, that object as its
last chunk.
"""
import json
from dataclasses import dataclass
from typing import Any, Protocol, Union

from ..engine.request import StepOutput
from ..engine.sampling import SamplingParams
from ..text.tokenizer import Tokenizer
from .fields import (RequestError, chat_prompt_ids, check_fields, check_prompt_chars, json_object, sampling_params,
                     text_field)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


class Response(Protocol):
    """Renders one request's answer from its step outputs."""
    content_type: str

    def start(self) -> bytes:
        """The first reply's body, sent with the HTTP headers before any token (b"": nothing)."""

    def render(self, out: StepOutput) -> bytes:
        """The bytes to send for one step's output (b"": nothing yet)."""

    def fail(self, message: str) -> bytes:
        """The last bytes of an answer our code failed after its 200 headers went out: an error the client can
        tell from text."""


@dataclass
class Generation:
    """A request to run: its prompt, sampling parameters and what renders its answer."""
    prompt_ids: list[int]
    params: SamplingParams
    response: Response
    prompt_field: str = "prompt"  # the field a prompt too long for the context is blamed on


@dataclass
class Answer:
    """A request answered at once, without the engine: an error, or one that generates nothing."""
    body: bytes
    status: int = 200
    content_type: str = JSON


def encode_prompt(tokenizer: Tokenizer, text: str, field: str, max_seq_len: int) -> list[int]:
    """A plain-text prompt's ids (bos as the tokenizer adds it, special tokens' strings kept as text); a
    RequestError naming `field` for text the tokenizer refuses, or text too long to be worth tokenizing."""
    check_prompt_chars(len(text), field, max_seq_len)
    try:
        return tokenizer.encode(text)
    except ValueError as e:  # text the tokenizer refuses
        raise RequestError(field, f"cannot be tokenized: {e}") from None


class NativeProtocol:
    """/predictions/<model>[/<version>]: the request fields of the README's table."""

    def __init__(self, tokenizer: Tokenizer, defaults: SamplingParams, max_seq_len: int, speculating: bool):
        self.tokenizer, self.defaults, self.max_seq_len = tokenizer, defaults, max_seq_len
        self.speculating = speculating

    def parse(self, rid: str, body: Any, path: str) -> Union[Generation, Answer]:
        if path:
            raise RequestError("path", f"no such path: {path!r} (POST to /predictions/<model>)", status=404)
        request = parse_request(body, self.defaults, self.max_seq_len, self.tokenizer)
        return Generation(request.prompt_ids, request.params, NativeResponse(request.stream, self.speculating),
                          request.prompt_field)

    def error(self, e: RequestError) -> Answer:
        return Answer(error_body(e), e.status)

# Request fields and the JSON types they take (floats take integers too).
REQUEST_FIELDS = {"prompt": str, "messages": list, "max_new_tokens": int, "temperature": float, "top_k": int,
                  "top_p": float, "seed": (int, type(None)), "stop": (str, list), "stream": bool, "speculate": bool}


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    prompt_field: str  # "prompt" or "messages": what an error about the prompt names
    params: SamplingParams
    stream: bool


def parse_request(body: Any, defaults: SamplingParams, max_seq_len: int, tokenizer: Tokenizer) -> GenerationRequest:
    """Validate one request body (raw bytes, text, or what TorchServe already decoded from JSON) and tokenize its
    prompt: `prompt` is plain text; `messages` a chat, rendered by the model's template."""
    body = json_object(body)
    check_fields(body, REQUEST_FIELDS)
    if "prompt" in body and "messages" in body:
        raise RequestError("messages", "send either prompt (text to continue) or messages (a chat), not both")
    prompt_field = "messages" if "messages" in body else "prompt"
    prompt = text_field(body, "prompt") if prompt_field == "prompt" else None
    params = sampling_params(body, defaults, max_seq_len, speculate=body.get("speculate", True))
    ids = encode_prompt(tokenizer, prompt, "prompt", max_seq_len) if prompt is not None else \
        chat_prompt_ids(tokenizer, body["messages"], max_seq_len)
    return GenerationRequest(ids, prompt_field, params, body.get("stream", True))


def error_body(e: RequestError) -> bytes:
    return json.dumps({"error": e.message, "field": e.field}).encode()


class NativeResponse:
    """One request's answer: each step's text delta as it comes (stream), or one JSON object at the end."""

    def __init__(self, stream: bool, speculating: bool):
        self.stream, self.speculating = stream, speculating
        self.content_type = TEXT if stream else JSON
        self._text: list[str] = []

    def start(self) -> bytes:
        return b""

    def render(self, out: StepOutput) -> bytes:
        if self.stream:
            return out.text.encode()
        self._text.append(out.text)
        if not out.finished:
            return b""
        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                 "cached_tokens": out.cached_tokens}
        if self.speculating:
            usage.update(draft_tokens=out.draft_tokens, accepted_tokens=out.accepted_tokens)
        answer = {"text": "".join(self._text), "finish_reason": out.finish_reason, "usage": usage}
        return json.dumps(answer).encode()

    def fail(self, message: str) -> bytes:
        """{"error": message, "field": null}, on a line of its own after streamed text."""
        body = error_body(RequestError(None, message, status=500))
        return b"\n" + body + b"\n" if self.stream else body
