"""The OpenAI wire format: request and response models for /v1/completions and /v1/chat/completions.

Requests are pydantic models; a field of the wrong type or out of range is a `ValidationError`,
which the app answers as a 400 in OpenAI's error shape (`error_body`). Checks that need the served
model (the prompt's length against the context, the model's name) live in `check_lengths` and
the app, so this module stays free of the engine.

Supported beyond the plain fields: `seed` (same seed, same text), `stop` (strings), `top_k` and
`return_tokens_as_token_ids` (as vLLM), `logprobs` (the sampled token's log-probability only: the engine does not rank
alternatives, so `logprobs > 0` for completions and `top_logprobs > 0` for chat are refused rather
than answered wrongly), `stream_options.include_usage`, and `n` completions per prompt.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 8
MAX_N = 16


class OpenAIError(Exception):
  """A request the server refuses, with its HTTP status and OpenAI's error fields."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid")
  include_usage: bool = False


class _SamplingFields(BaseModel):
  """Fields shared by both endpoints. Strict types: "1" is not a number, 1.5 is not an int."""

  model_config = ConfigDict(extra="ignore", strict=True)

  model: str
  max_tokens: int | None = Field(default=None, gt=0)
  temperature: float = Field(default=1.0, ge=0.0, le=100.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  top_k: int = Field(default=0, ge=0)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = Field(default=1, ge=1, le=MAX_N)
  user: str | None = None
  # vLLM's extension: log-probability entries name tokens as "token_id:<id>", exact for any vocabulary.
  return_tokens_as_token_ids: bool = False
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0

  @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
  @classmethod
  def _int_is_a_float(cls, v: Any) -> Any:
    # JSON has one number type: 0 and 1 are valid temperatures. Booleans are not numbers here.
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

  @field_validator("stop")
  @classmethod
  def _stop_strings(cls, v: str | list[str] | None) -> list[str] | None:
    if v is None:
      return None
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP_STRINGS:
      raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(s == "" for s in stops):
      raise ValueError("stop strings must not be empty")
    return stops

  @model_validator(mode="after")
  def _supported(self):
    if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
      raise ValueError("presence_penalty and frequency_penalty are not supported (must be 0)")
    if self.stream_options is not None and not self.stream:
      raise ValueError("stream_options is only allowed with stream=true")
    return self

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return tuple(self.stop or ())

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
  """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or lists of token ids."""

  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = Field(default=16, gt=0)  # OpenAI's default for completions
  logprobs: int | None = None
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None

  @field_validator("prompt")
  @classmethod
  def _nonempty(cls, v):
    if isinstance(v, list) and not v:
      raise ValueError("prompt must not be an empty list")
    return v

  @field_validator("logprobs")
  @classmethod
  def _sampled_only(cls, v: int | None) -> int | None:
    if v not in (None, 0):
      raise ValueError(f"logprobs={v}: only 0 is supported (the sampled tokens' log-probabilities; "
                       "this server does not rank alternatives)")
    return v

  @model_validator(mode="after")
  def _unsupported(self):
    if self.echo:
      raise ValueError("echo is not supported")
    if self.suffix is not None:
      raise ValueError("suffix is not supported")
    if self.best_of not in (None, 1):
      raise ValueError("best_of is not supported (must be 1)")
    return self

  def prompts(self) -> list[str | list[int]]:
    """One entry per prompt: a string, or a list of token ids."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if all(isinstance(x, int) for x in p):
      return [list(p)]
    return list(p)


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore", strict=True)
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: str | list[dict[str, Any]] | None = None
  name: str | None = None

  def text(self) -> str:
    """The message's text; content parts of type "text" are joined (other kinds are refused)."""
    if self.content is None or isinstance(self.content, str):
      return self.content or ""
    parts = []
    for part in self.content:
      if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise ValueError("only text content parts are supported")
      parts.append(part["text"])
    return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
  """POST /v1/chat/completions."""

  messages: list[ChatMessage] = Field(min_length=1)
  logprobs: bool = False
  top_logprobs: int | None = None
  max_completion_tokens: int | None = Field(default=None, gt=0)

  @field_validator("top_logprobs")
  @classmethod
  def _no_alternatives(cls, v: int | None) -> int | None:
    if v not in (None, 0):
      raise ValueError(f"top_logprobs={v}: only 0 is supported (this server does not rank alternatives)")
    return v

  @property
  def max_new_tokens(self) -> int | None:
    return self.max_completion_tokens or self.max_tokens


def check_lengths(prompt_len: int, max_tokens: int | None, max_len: int) -> int:
  """The number of new tokens to generate; raises a 400 `OpenAIError` when the request cannot fit.

  `max_tokens=None` means "up to the context": max_len - prompt_len (as vLLM does).
  """
  if prompt_len == 0:
    raise OpenAIError(400, "the prompt is empty", param="prompt")
  if prompt_len >= max_len:
    raise OpenAIError(400, f"the prompt is {prompt_len} tokens long, but this model's context is {max_len} "
                      f"tokens and at least one must be left to generate", param="prompt",
                      code="context_length_exceeded")
  if max_tokens is None:
    return max_len - prompt_len
  if prompt_len + max_tokens > max_len:
    raise OpenAIError(400, f"this model's context is {max_len} tokens; the prompt ({prompt_len} tokens) "
                      f"plus max_tokens ({max_tokens}) is {prompt_len + max_tokens}", param="max_tokens",
                      code="context_length_exceeded")
  return max_tokens


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int = 0) -> dict:
  """The legacy completions `logprobs` object (the sampled tokens only: `top_logprobs` is null)."""
  offsets, pos = [], offset
  for t in tokens:
    offsets.append(pos)
    pos += len(t)
  return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict:
  """The chat `logprobs` object: one entry per sampled token, with no alternatives listed."""
  return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                      for t, lp in zip(tokens, logprobs)]}


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": choices, "usage": usage_}


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict) -> dict:
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": choices, "usage": usage_}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
  out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
  if usage_ is not None:
    out["usage"] = usage_
  return out


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
  out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
  if usage_ is not None:
    out["usage"] = usage_
  return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
  """A one-line message and the offending parameter from pydantic's (or FastAPI's) error list."""
  if not errors:
    return "invalid request", None
  first = errors[0]
  if first.get("type") == "json_invalid":
    return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  param = loc[0] if loc else None
  where = ".".join(loc) or "body"
  return f"{where}: {first.get('msg', 'invalid value')}", param
