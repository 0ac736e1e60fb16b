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
from .fields import RequestError, check_fields, json_object, sampling_params, text_field

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
# A prompt with more characters than this per token of context is refused before it is tokenized (real text has ~4).
MAX_PROMPT_CHARS_PER_TOKEN = 32


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


def encode_prompt(tokenizer: Tokenizer, text: str, field: str, max_seq_len: int, bos: bool = True) -> list[int]:
    """The prompt's token ids; a RequestError naming `field` for text the tokenizer refuses, or text too long to be
    worth tokenizing (tokenizing 6 MB holds the engine thread, and so every stream, for seconds)."""
    max_chars = MAX_PROMPT_CHARS_PER_TOKEN * max_seq_len
    if len(text) > max_chars:
        raise RequestError(field, f"has {len(text)} characters; at most {max_chars} ({MAX_PROMPT_CHARS_PER_TOKEN} "
                                  f"per token of the {max_seq_len}-token context) are tokenized",
                           code="context_length_exceeded")
    try:
        return tokenizer.encode(text, bos=bos)
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
        request = parse_request(body, self.defaults, self.max_seq_len)
        return Generation(encode_prompt(self.tokenizer, request.prompt, "prompt", self.max_seq_len), request.params,
                          NativeResponse(request.stream, self.speculating))

    def error(self, e: RequestError) -> Answer:
        return Answer(error_body(e), e.status)

# Request fields and the JSON types they take (floats take integers too).
REQUEST_FIELDS = {"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
                  "seed": (int, type(None)), "stop": (str, list), "stream": bool, "speculate": bool}


@dataclass
class GenerationRequest:
    prompt: str
    params: SamplingParams
    stream: bool


def parse_request(body: Any, defaults: SamplingParams, max_seq_len: int) -> GenerationRequest:
    """Validate one request body: raw bytes, text, or what TorchServe already decoded from JSON."""
    body = json_object(body)
    check_fields(body, REQUEST_FIELDS)
    prompt = text_field(body, "prompt")
    params = sampling_params(body, defaults, max_seq_len, speculate=body.get("speculate", True))
    return GenerationRequest(prompt, params, body.get("stream", True))


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
