"""The native /predictions protocol: a JSON object in; the streamed UTF-8 text, or one JSON object, out.

Request fields are in the README's table. A bad request gets HTTP 400 with {"error": message, "field": name}; a
request our code fails gets 500 {"error": message}, or, once its answer has begun, that object as its last chunk.
"""
import json
from dataclasses import dataclass
from typing import Any

from ..engine.request import StepOutput
from ..engine.sampling import InvalidParam, SamplingParams
from .fields import RequestError, check_fields, json_object, stop_strings, text_field

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

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
    max_new_tokens = body.get("max_new_tokens", defaults.max_new_tokens)
    if "max_new_tokens" in body and max_new_tokens > max_seq_len:
        raise RequestError("max_new_tokens", f"must be <= {max_seq_len} (the context length)")
    stop = stop_strings(body["stop"], "stop") if "stop" in body else defaults.stop
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens,
                                temperature=float(body.get("temperature", defaults.temperature)),
                                top_k=body.get("top_k", defaults.top_k),
                                top_p=float(body.get("top_p", defaults.top_p)),
                                seed=body.get("seed"), stop=stop, speculate=body.get("speculate", True))
    except InvalidParam as e:
        raise RequestError(e.field, e.message) from None
    return GenerationRequest(prompt, params, body.get("stream", True))


def error_body(e: RequestError) -> bytes:
    return json.dumps({"error": e.message, "field": e.field}).encode()


def failure_body(message: str) -> bytes:
    """A failure that is not the request's fault: {"error": message}."""
    return json.dumps({"error": message}).encode()


class NativeResponse:
    """One request's answer: each step's text delta as it comes (stream), or one JSON object at the end."""

    def __init__(self, stream: bool, speculating: bool):
        self.stream, self.speculating = stream, speculating
        self.content_type = TEXT if stream else JSON
        self._text: list[str] = []

    def render(self, out: StepOutput) -> bytes:
        """The bytes to send for one step's output (b"": nothing yet)."""
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
        """The last chunk of an answer that failed after its 200 headers went out: {"error": message}, on a line
        of its own after streamed text."""
        return b"\n" + failure_body(message) + b"\n" if self.stream else failure_body(message)
