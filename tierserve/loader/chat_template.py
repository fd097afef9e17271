"""Jinja chat-template rendering with the same environment and semantics as transformers.

The environment matches ``transformers.utils.chat_template_utils``: an ``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols`` extension, a ``tojson`` filter that does not escape
HTML or non-ASCII characters, and the ``raise_exception`` / ``strftime_now`` globals. Templates are compiled once
per distinct source string and cached.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """A chat template failed to compile or render (also raised by the template's ``raise_exception``)."""


def _raise_exception(message: Any) -> None:
    raise ChatTemplateError(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used by some templates) and render its body as-is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile ``source`` once; later calls with the same string return the cached template."""
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc


def validate_messages(messages: Any) -> None:
    """Raise ``ValueError`` naming the offending field unless ``messages`` is a non-empty list of chat messages.

    Each message must be a dict with a string ``role`` and a ``content`` key (an assistant message that carries
    ``tool_calls`` may omit ``content``, as in the OpenAI API).
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages must contain at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"messages[{i}] is missing the 'role' field")
        if not isinstance(msg["role"], str):
            raise ValueError(f"messages[{i}]['role'] must be a string, got {type(msg['role']).__name__}")
        if "content" not in msg and not msg.get("tool_calls"):
            raise ValueError(f"messages[{i}] is missing the 'content' field")


def select_template(templates: dict[str, str], name_or_source: str | None, tools: list | None) -> str:
    """Pick a template the way transformers does: an explicit name or source, else 'tool_use' when tools are
    given and present, else 'default'."""
    if name_or_source is not None:
        return templates.get(name_or_source, name_or_source)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ValueError(
            "this tokenizer has no chat template: add 'chat_template' to tokenizer_config.json or a "
            "chat_template.jinja file to the model directory, or pass chat_template=..."
        )
    raise ValueError(f"this tokenizer has several chat templates and no default; pass chat_template= one of "
                     f"{sorted(templates)}")


def render_chat_template(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    tools: list | None,
    special_tokens: dict[str, str],
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render one conversation. ``special_tokens`` (bos_token, eos_token, ...) are template variables that
    ``kwargs`` may override, exactly as in transformers."""
    validate_messages(messages)
    if tools is not None:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        tools = list(tools)
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    documents = kwargs.pop("documents", None)
    marker = "CONTINUE_FINAL_MESSAGE_TAG "
    final = None
    if continue_final_message:
        final = messages[-1].get("content")
        if not isinstance(final, str):
            raise ValueError("continue_final_message needs the final message's 'content' to be a string")
        messages = [*messages[:-1], {**messages[-1], "content": final + marker}]
    template = compile_template(source)
    variables = {**special_tokens, **kwargs}
    try:
        text = template.render(messages=list(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    if continue_final_message:
        loc = text.rfind(marker.strip())
        if loc < 0 or final.strip() not in text:
            raise ValueError("continue_final_message: the chat template dropped the final message")
        text = text[:loc] if text[loc: loc + len(marker)] == marker else text[:loc].rstrip()
    return text
