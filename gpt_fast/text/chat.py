"""A model's own chat template (Jinja, from its tokenizer_config.json or chat_template.jinja), rendered as
transformers' apply_chat_template renders it.

Templates come from the model's files, so they are untrusted code: they run in jinja2's immutable sandbox, with the
names Hugging Face templates use (`raise_exception`, `strftime_now`, the `tojson` filter, `bos_token`/`eos_token`, a
`{% generation %}` block) and transformers' limits on `dict` and `namespace`.
"""
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception) or failed while rendering them."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Dict:
    """`dict` for templates: building dicts only, no attribute access to the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace` for templates: no underscore-prefixed attributes (a way towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's signature trick, so `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template namespace cannot hold {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks: here it renders its
    body as is."""
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=None)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


class ChatTemplate:
    """One model's chat template; `special_tokens` are the names it sees besides the messages (bos_token, ...)."""

    def __init__(self, source: str, special_tokens: Optional[dict[str, str]] = None, origin: str = "chat template"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]); add_generation_prompt ends it with the
        assistant's turn header. Raises ChatTemplateError when the template refuses them or fails."""
        try:
            return self._template.render({**self.special_tokens, **variables}, messages=messages, tools=None,
                                         documents=None, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox violations
            raise ChatTemplateError(str(e) or type(e).__name__) from None
        except Exception as e:  # the template is code from the model's files: its bugs are the request's error
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def literal_text(self) -> str:
        """The template's literal strings (raw text and string constants), joined by NULs: where a substring
        search finds the tokens the template writes itself."""
        ast = _environment().parse(self.source)
        literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
        literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
        return "\0".join(sorted(literals))


def template_source(checkpoint_dir: Path, tokenizer_config: dict) -> Optional[tuple[str, str]]:
    """(source, where it came from) of a checkpoint's chat template, as transformers picks it: chat_template.jinja,
    else tokenizer_config.json's `chat_template` (a string, or a list of named templates: the "default" one)."""
    path = Path(checkpoint_dir) / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    value = tokenizer_config.get("chat_template")
    origin = f"{Path(checkpoint_dir) / 'tokenizer_config.json'} chat_template"
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
        if value is None:
            raise ValueError(f"{origin}: several templates ({', '.join(map(str, named))}) and none named 'default'")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{origin}: must be a string or a list of named templates")
    return value, origin
