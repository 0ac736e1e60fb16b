"""The OpenAI-compatible API under /predictions/<model>/<version>/: v1/completions, v1/chat/completions, v1/models.

Requests and answers have OpenAI's shapes, so the official clients work unchanged (base_url
http://127.0.0.1:8080/predictions/<model>/<version>/v1, api_key: TorchServe's inference key). A streamed answer is
server-sent events: a `data: {chunk}` per reply (the text the engine produced since the previous one; a chat's
first chunk carries the role), then the usage chunk if stream_options.include_usage, then `data: [DONE]`.
Errors are {"error": {"message", "type", "param", "code"}} with their HTTP status.

Field rules: a null field is as if absent; fields left out take the handler config's defaults, as on
/predictions (not OpenAI's temperature 1 and 16 completion tokens); `n` and `best_of` must be 1 and `echo` false;
`user` is ignored; `top_k` is accepted as vLLM does; any other field, OpenAI's ones this server does not implement
included (tools, response_format, logit_bias, ...), is a 400 naming it rather than silently ignored.
"""
import json
import time
from typing import Any, Optional, Union

from ..engine.request import StepOutput, TokenLogprob
from ..engine.sampling import SamplingParams
from ..text.tokenizer import Tokenizer
from .fields import (RequestError, chat_prompt_ids, check_fields, is_type, json_object, sampling_params,
                     text_field)
from .protocol import JSON, Answer, Generation, encode_prompt

SSE = "text/event-stream"
COMPLETIONS, CHAT, MODELS = "v1/completions", "v1/chat/completions", "v1/models"

# The fields each endpoint takes and their JSON types (object: checked by the field's own parser).
_COMMON = {"model": str, "stream": bool, "stream_options": dict, "max_tokens": int, "temperature": float,
           "top_p": float, "top_k": int, "seed": int, "stop": (str, list), "presence_penalty": float,
           "frequency_penalty": float, "n": int, "user": str}
COMPLETION_FIELDS = {**_COMMON, "prompt": object, "logprobs": int, "echo": bool, "best_of": int}
CHAT_FIELDS = {**_COMMON, "messages": object, "max_completion_tokens": int, "logprobs": bool, "top_logprobs": int}
ONLY_VALUE = {"n": 1, "best_of": 1, "echo": False}  # accepted at these values alone


class OpenAIProtocol:
    def __init__(self, model_name: str, tokenizer: Tokenizer, defaults: SamplingParams, max_seq_len: int):
        self.model_name, self.tokenizer, self.defaults, self.max_seq_len = model_name, tokenizer, defaults, max_seq_len
        self.created = int(time.time())

    def parse(self, rid: str, body: Any, path: str) -> Union[Generation, Answer]:
        if path in (MODELS, f"{MODELS}/{self.model_name}"):  # GET reaches the handler like POST
            card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gpt-fast-serve",
                    "max_model_len": self.max_seq_len}
            return Answer(_json({"object": "list", "data": [card]} if path == MODELS else card))
        if path.startswith(MODELS + "/"):
            raise self._no_model(path[len(MODELS) + 1:])
        if path not in (COMPLETIONS, CHAT):
            raise RequestError("path", f"no endpoint /{path} here (this server has /{COMPLETIONS}, /{CHAT} and "
                                       f"/{MODELS})", status=404, code="unknown_url")
        chat = path == CHAT
        body = {name: value for name, value in json_object(body).items() if value is not None}
        check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        for name, value in ONLY_VALUE.items():
            if body.get(name, value) != value:
                raise RequestError(name, f"only {json.dumps(value)} is supported")
        if body.get("model", self.model_name) != self.model_name:
            raise self._no_model(body["model"])
        stream = body.get("stream", False)
        include_usage = _include_usage(body, stream)
        if chat:
            prompt_ids = chat_prompt_ids(self.tokenizer, body.get("messages"), self.max_seq_len)
            if "top_logprobs" in body and not body.get("logprobs"):
                raise RequestError("top_logprobs", "needs logprobs: true")
            top = body.get("top_logprobs", 0) if body.get("logprobs") else None
            max_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            aliases = {"max_new_tokens": max_field, "logprobs": "top_logprobs"}
        else:
            prompt_ids = self._completion_prompt(body)
            top, aliases = body.get("logprobs"), {"max_new_tokens": "max_tokens"}
        params = sampling_params(body, self.defaults, self.max_seq_len, aliases, logprobs=top,
                                 presence_penalty=float(body.get("presence_penalty", 0.0)),
                                 frequency_penalty=float(body.get("frequency_penalty", 0.0)))
        kind = ChatResponse if chat else CompletionResponse
        response = kind(rid, self.model_name, stream, include_usage, top is not None, self.tokenizer)
        return Generation(prompt_ids, params, response, "messages" if chat else "prompt")

    def error(self, e: RequestError) -> Answer:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        param = None if e.field in ("body", "path") else e.field
        return Answer(_json({"error": {"message": e.message, "type": kind, "param": param, "code": e.code}}),
                      e.status)

    def _no_model(self, name: str) -> RequestError:
        return RequestError("model", f"the model `{name}` does not exist (this server has `{self.model_name}`)",
                            status=404, code="model_not_found")

    def _completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            return encode_prompt(self.tokenizer, text_field({"prompt": prompt}, "prompt"), "prompt", self.max_seq_len)
        if isinstance(prompt, list) and prompt and all(is_type(t, int) for t in prompt):
            if not all(0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise RequestError("prompt", f"token ids must be in [0, {self.tokenizer.vocab_size})")
            return list(prompt)
        raise RequestError("prompt", "must be a non-empty string or a list of token ids (one prompt per request)")


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options", "only allowed with stream: true")
    for name, value in options.items():
        if name != "include_usage" or not isinstance(value, bool):
            raise RequestError(f"stream_options.{name}", "the only option is include_usage (a boolean)")
    return options.get("include_usage", False)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


class CompletionResponse:
    """One request's answer: one JSON object when it finishes, or an event per reply (stream)."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, rid: str, model: str, stream: bool, include_usage: bool, logprobs: bool,
                 tokenizer: Tokenizer):
        self.id, self.model, self.created = f"{self.id_prefix}-{rid}", model, int(time.time())
        self.stream, self.include_usage, self.logprobs, self.tokenizer = stream, include_usage, logprobs, tokenizer
        self.content_type = SSE if stream else JSON
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._text_offset = 0  # characters of the tokens whose logprobs were sent
        # The usual event, a text delta that is not the last, rendered once around a placeholder: a reply then
        # costs one json.dumps of its text, not of the whole chunk (replies are rendered between decode steps).
        self._delta_event = None
        if stream and not logprobs:
            event = self._chunk([self._choice("\0", [], None, delta=True)])
            self._delta_event = (b"data: " + _json(event) + b"\n\n").split(_json("\0"))

    def start(self) -> bytes:
        return b""

    def render(self, out: StepOutput) -> bytes:
        if not self.stream:
            self._text.append(out.text)
            self._logprobs += out.logprobs
            if not out.finished:
                return b""
            choice = self._choice("".join(self._text), self._logprobs, out.finish_reason, delta=False)
            return _json({**self._head(self.object), "choices": [choice], "usage": _usage(out)})
        if self._delta_event and not out.finished:
            return self._delta_event[0] + _json(out.text) + self._delta_event[1] if out.text else b""
        events = []
        if out.text or out.logprobs or out.finished:
            events.append(self._chunk([self._choice(out.text, out.logprobs, out.finish_reason, delta=True)]))
        if out.finished and self.include_usage:
            events.append({**self._head(self.chunk_object), "choices": [], "usage": _usage(out)})
        return b"".join(b"data: " + _json(event) + b"\n\n" for event in events) + \
            (b"data: [DONE]\n\n" if out.finished else b"")

    def fail(self, message: str) -> bytes:
        """OpenAI's error object: the whole body, or an event before [DONE] (a 200 was already sent)."""
        error = _json({"error": {"message": message, "type": "server_error", "param": None, "code": "internal_error"}})
        return b"data: " + error + b"\n\ndata: [DONE]\n\n" if self.stream else error

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head(self.chunk_object), "choices": choices}
        if self.include_usage:  # OpenAI's chunks say usage: null until the last
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: Optional[str], delta: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": self._render_logprobs(logprobs) if self.logprobs else None,
                "finish_reason": finish_reason}

    def _render_logprobs(self, logprobs: list[TokenLogprob]) -> dict:
        tokens = [self._token(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._token(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


class ChatResponse(CompletionResponse):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def start(self) -> bytes:
        if not self.stream:
            return b""
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return b"data: " + _json(self._chunk([role])) + b"\n\n"

    def _choice(self, text: str, logprobs: list[TokenLogprob], finish_reason: Optional[str], delta: bool) -> dict:
        message = {"content": text} if delta else {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "delta" if delta else "message": message,
                "logprobs": self._render_logprobs(logprobs) if self.logprobs else None, "finish_reason": finish_reason}

    def _render_logprobs(self, logprobs: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            data = self.tokenizer.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs], "refusal": None}


def _usage(out: StepOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}
