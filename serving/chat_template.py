"""Chat messages -> prompt text: the checkpoint's own template, or a plain documented default.

A Hugging Face checkpoint keeps its chat template in `tokenizer_config.json` (`chat_template`: a
Jinja string, or a list of {"name", "template"} of which "default" is used). It is rendered the way
`transformers` renders it: a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`,
`raise_exception` and a `tojson` filter, and the variables `messages`, `add_generation_prompt`
(always true here), `bos_token` and `eos_token`.

Without one, the plain default is used (`DEFAULT_TEMPLATE`): each message on its own line as
"role: content", then "assistant:" for the model to continue, e.g.

  system: You are terse.
  user: Hi
  assistant:
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")


def _token_text(value: Any) -> str:
  # tokenizer_config.json writes special tokens either as strings or as {"content": ...} objects.
  if isinstance(value, dict):
    return str(value.get("content", ""))
  return "" if value is None else str(value)


class ChatTemplate:
  """`render(messages) -> str`, from a Jinja source."""

  def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "default"):
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # deferred: only chat needs Jinja

    def raise_exception(message: str):
      raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    self._template = env.from_string(source)
    self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

  def render(self, messages: list[dict[str, str]]) -> str:
    """Raises ValueError when the template refuses the conversation (e.g. roles out of order)."""
    from jinja2 import TemplateError

    try:
      return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
    except TemplateError as err:
      raise ValueError(f"the chat template failed: {err}") from None


def load_chat_template(directories: list[str], explicit: str | None = None) -> ChatTemplate:
  """The template of the first `tokenizer_config.json` (in `directories`) that has one, else the default.

  `explicit` (serve.py's --chat_template) wins: a tokenizer_config.json, or a file holding Jinja.
  """
  if explicit:
    if explicit.endswith(".json"):
      found = _from_config(explicit)
      if found is None:
        raise ValueError(f"--chat_template={explicit}: the file has no chat_template")
      return found
    with open(explicit) as f:
      return ChatTemplate(f.read(), origin=explicit)
  for d in directories:
    path = os.path.join(d, "tokenizer_config.json")
    if os.path.isfile(path):
      found = _from_config(path)
      if found is not None:
        return found
  return ChatTemplate(DEFAULT_TEMPLATE)


def _from_config(path: str) -> ChatTemplate | None:
  with open(path) as f:
    cfg = json.load(f)
  source = cfg.get("chat_template")
  if isinstance(source, list):  # named templates: the "default" one
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    source = named.get("default")
  if not isinstance(source, str):
    return None
  return ChatTemplate(source, bos_token=_token_text(cfg.get("bos_token")),
                      eos_token=_token_text(cfg.get("eos_token")), origin=path)

