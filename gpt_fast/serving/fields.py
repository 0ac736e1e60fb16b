"""JSON values checked against the types a field takes, for the handler config and the request protocols alike;
the sampling parameters and the chat `messages` every protocol takes."""
import json
import math
from typing import Any, Optional, Union

from ..engine.sampling import InvalidParam, SamplingParams
from ..text.tokenizer import Tokenizer

# Stop strings are checked against every text delta on the engine thread the whole batch shares.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # each
MAX_STOP_BYTES = 4096  # all of them, UTF-8
# What to add when a body is not JSON: curl --data sends a form without it, which TorchServe decodes before the
# handler sees it (JSON text without "=" arrives as nothing, "+" as a space), so the JSON cannot be recovered.
SEND_JSON = ('send a JSON object with the header "Content-Type: application/json" '
             '(curl: -H "Content-Type: application/json")')
CHAT_ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "name")
# A prompt with more characters than this per token of context is refused before it is tokenized (real text has ~4).
MAX_PROMPT_CHARS_PER_TOKEN = 32


class RequestError(InvalidParam):
    """A bad request: HTTP `status` (400 unless told) naming `field`, for that request alone (each protocol renders
    it its own way; `code` is a machine-readable reason where one exists, e.g. OpenAI's "model_not_found").
    A failure of ours on one request is one too: status 500, no field.

    Field and message are cut short: they may quote the request (a 6 MB field name), and a worker's reply over
    TorchServe's max_response_size (6.5 MB) makes the frontend drop the worker, and with it every request in flight.
    """

    def __init__(self, field: Optional[str], message: str, status: int = 400, code: Optional[str] = None):
        super().__init__(field and _shorten(field, 100), _shorten(message, 500))
        self.status, self.code = status, code


def is_type(value: Any, kind: Union[type, tuple]) -> bool:
    """Whether a JSON value is of `kind` (a type or a tuple of them); a float field takes integers too; `object` takes
    anything (a field whose own parser checks it)."""
    if kind is object:
        return True
    if isinstance(value, bool):  # bool is an int subclass: only a bool field takes it
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def type_name(kind: Union[type, tuple]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list of strings", dict: "an object", type(None): "null"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def stop_strings(value: Union[str, list], name: str) -> tuple[str, ...]:
    """A stop field (a string or a list of them) as a tuple; RequestError naming `name` if it is not one."""
    stop = [value] if isinstance(value, str) else value
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(name, f"at most {MAX_STOP_STRINGS} stop strings")
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError(name, "must be a non-empty string or a list of non-empty strings")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError(name, f"a stop string may have at most {MAX_STOP_CHARS} characters")
    try:
        size = sum(len(s.encode()) for s in stop)
    except UnicodeEncodeError:
        raise RequestError(name, "contains an unpaired surrogate (not valid Unicode)") from None
    if size > MAX_STOP_BYTES:
        raise RequestError(name, f"the stop strings may have at most {MAX_STOP_BYTES} bytes (UTF-8) in all")
    return tuple(stop)


def json_object(body: Any) -> dict:
    """A request body as a JSON object: raw bytes, text, or what TorchServe already decoded from JSON."""
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body):
        raise RequestError("body", f"empty body; {SEND_JSON}")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError("body", f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise RequestError("body", f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError("body", "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"the request body must be a JSON object, not {type(body).__name__}")
    if any(isinstance(value, (bytes, bytearray)) for value in body.values()):
        # Form fields (curl --data without a Content-Type): the form decoding has already mangled any JSON.
        raise RequestError("body", f"got form fields; {SEND_JSON}")
    return body


def check_fields(body: dict, known: dict[str, Union[type, tuple]]) -> None:
    """Every field of body is known and of its type; RequestError naming the first that is not."""
    for name, value in body.items():
        if name not in known:
            raise RequestError(name, f"unknown field (known: {', '.join(known)})")
        if not is_type(value, known[name]):
            raise RequestError(name, f"must be {type_name(known[name])}, got {_preview(value)}")


def text_field(body: dict, name: str) -> str:
    """A required non-empty string field that is valid Unicode."""
    text = body.get(name)
    if not text:
        raise RequestError(name, f"a non-empty {name} string is required")
    return unicode_text(text, name)


def unicode_text(text: str, name: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text cannot hold them
        raise RequestError(name, "contains an unpaired surrogate (not valid Unicode)") from None
    return text


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _preview(value: Any) -> str:
    """A short description of a JSON value for an error message; cheap for a 6 MB or deeply nested one."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    if isinstance(value, str):
        value = value[:80]
    return json.dumps(value)[:80]


def sampling_params(body: dict, defaults: SamplingParams, max_seq_len: int, aliases: Optional[dict[str, str]] = None,
                    **given: Any) -> SamplingParams:
    """SamplingParams from a checked request body: max_new_tokens (or the request field `aliases` names for it),
    temperature, top_k, top_p, seed and stop, those left out from `defaults`; `given`: more SamplingParams
    arguments. A RequestError names the request field at fault (through `aliases`)."""
    aliases = aliases or {}
    max_field = aliases.get("max_new_tokens", "max_new_tokens")
    if body.get(max_field, 0) > max_seq_len:
        raise RequestError(max_field, f"must be <= {max_seq_len} (the context length)")
    stop = stop_strings(body["stop"], "stop") if "stop" in body else defaults.stop
    try:
        return SamplingParams(max_new_tokens=body.get(max_field, defaults.max_new_tokens),
                              temperature=float(body.get("temperature", defaults.temperature)),
                              top_k=body.get("top_k", defaults.top_k), top_p=float(body.get("top_p", defaults.top_p)),
                              seed=body.get("seed"), stop=stop, **given)
    except InvalidParam as e:
        raise RequestError(aliases.get(e.field, e.field), e.message) from None


def check_prompt_chars(chars: int, name: str, max_seq_len: int) -> None:
    """Refuse text too long to be worth tokenizing (tokenizing 6 MB holds the engine thread, and so every stream,
    for seconds): it could not fit the context anyway."""
    max_chars = MAX_PROMPT_CHARS_PER_TOKEN * max_seq_len
    if chars > max_chars:
        raise RequestError(name, f"has {chars} characters; at most {max_chars} ({MAX_PROMPT_CHARS_PER_TOKEN} "
                                 f"per token of the {max_seq_len}-token context) are tokenized",
                           code="context_length_exceeded")


def chat_prompt_ids(tokenizer: Tokenizer, value: Any, max_seq_len: int, name: str = "messages") -> list[int]:
    """A `messages` JSON value checked, rendered by the model's chat template and tokenized, ready for the
    assistant's reply; RequestError naming the field at fault (`messages[1].content`), or `name` itself when the
    model has no template, its template refuses the conversation, or the text could not fit the context."""
    messages = chat_messages(value, name)
    check_prompt_chars(sum(len(m["content"]) + len(m.get("name", "")) for m in messages), name, max_seq_len)
    try:
        return tokenizer.encode_chat(messages)
    except ValueError as e:  # no template, the template's raise_exception, or a failing template
        raise RequestError(name, str(e)) from None


def chat_messages(value: Any, name: str) -> list[dict]:
    """A non-empty list of {"role": system|user|assistant, "content": text, "name"?: string} objects; content is a
    string or a list of {"type": "text", "text": ...} parts (OpenAI's), joined by newlines."""
    if not isinstance(value, list) or not value:
        raise RequestError(name, 'must be a non-empty list of {"role", "content"} objects')
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RequestError(where, f'must be a {{"role", "content"}} object, got {json.dumps(message)[:80]}')
        for key in message:
            if key not in MESSAGE_FIELDS:
                raise RequestError(f"{where}.{key}", f"unknown field (known: {', '.join(MESSAGE_FIELDS)})")
        if message.get("role") not in CHAT_ROLES:
            raise RequestError(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got "
                                                f"{json.dumps(message.get('role'))[:80]}")
        checked = {"role": message["role"], "content": _message_content(message.get("content"), f"{where}.content")}
        if "name" in message:
            if not isinstance(message["name"], str) or not message["name"]:
                raise RequestError(f"{where}.name", "must be a non-empty string")
            checked["name"] = unicode_text(message["name"], f"{where}.name")
        messages.append(checked)
    return messages


def _message_content(content: Any, name: str) -> str:
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                raise RequestError(f"{name}[{j}]", 'must be a {"type": "text", "text": string} part (this model '
                                                   "reads text only)")
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RequestError(name, f"must be a string or a list of text parts, got {json.dumps(content)[:80]}")
    return unicode_text(content, name)
