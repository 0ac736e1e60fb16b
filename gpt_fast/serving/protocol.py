"""What a request protocol hands the serving loop (Generation, Answer), and the native /predictions protocol:
a JSON object in; the streamed UTF-8 text, or one JSON object, out.

Request fields are in the README's table. A bad request gets HTTP 400 with {"error": message, "field": name}.
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


class Response(Protocol):
    """Renders one request's answer from its step outputs."""
    content_type: str

    def start(self) -> bytes:
        """The first reply's body, sent with the HTTP headers before any token (b"": nothing)."""

    def render(self, out: StepOutput) -> bytes:
        """The bytes to send for one step's output (b"": nothing yet)."""


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


def encode_prompt(tokenizer: Tokenizer, text: str, field: str, bos: bool = True) -> list[int]:
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
        return Generation(encode_prompt(self.tokenizer, request.prompt, "prompt"), request.params,
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
