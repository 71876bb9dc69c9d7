"""The OpenAI-compatible HTTP API on FastAPI (served by uvicorn, as vLLM serves its own).

  POST /v1/completions         prompt (text or token ids) -> text; `stream=true` for server-sent events
  POST /v1/chat/completions    messages -> prompt via the chat template -> assistant message
  GET  /v1/models              the one served model
  GET  /health                 200 while serving; 503 while draining or after an engine failure
  GET  /metrics                Prometheus text (serving/metrics.py)

Every error is OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a malformed
or out-of-range request (FastAPI's 422 validation errors included), 404 for an unknown model or
route, 429 when the queue is full, 503 while draining, 500 when the engine failed. A client that
disconnects (streaming or not) has its requests aborted, which frees their decode slots.

`DrainingServer` is uvicorn's server with the graceful shutdown serve.py needs: on SIGTERM or
SIGINT it stops accepting connections, answers 503 to new requests on open ones, lets in-flight
requests run for `graceful_s` seconds, then cancels the rest (aborting them in the engine) and
stops the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.tokenizer import Tokenizer
from serving import protocol as P
from serving.async_engine import AsyncEngine, Draining, EngineFailed, Output, QueueFull, RequestHandle
from serving.chat_template import ChatTemplate
from serving.engine import SamplingParams


log = logging.getLogger("shardlab.serving")


class DrainingServer(uvicorn.Server):
  """uvicorn.Server that drains the engine on shutdown: new requests get 503, in-flight ones run for
  `graceful_s` seconds, then are aborted (their streams end with finish_reason "abort"). uvicorn's
  own cancellation of whatever is still running comes `BACKSTOP_S` later."""

  BACKSTOP_S = 5.0

  def __init__(self, app: FastAPI, engine: AsyncEngine, *, graceful_s: float, log_level: str = "warning"):
    super().__init__(uvicorn.Config(app, log_level=log_level,
                                    timeout_graceful_shutdown=graceful_s + self.BACKSTOP_S))
    self.engine, self.graceful_s = engine, graceful_s

  def handle_exit(self, sig: int, frame) -> None:
    if not self.engine.draining:
      log.info("signal %d: draining (%d requests in flight, up to %.0f s)", sig, self.engine.num_outstanding,
               self.graceful_s)
    self.engine.draining = True  # new requests on connections still open get 503
    super().handle_exit(sig, frame)
    # uvicorn re-raises the signal after its shutdown, so the process dies of it (status -15); a
    # drained server has exited cleanly, so serve.py returns 0 instead.
    self._captured_signals.clear()

  async def shutdown(self, sockets=None) -> None:
    self.engine.draining = True
    cancel = asyncio.get_running_loop().call_later(self.graceful_s, self._cancel_in_flight)
    try:
      await super().shutdown(sockets)
    finally:
      cancel.cancel()

  def _cancel_in_flight(self) -> None:
    if self.engine.num_outstanding:
      log.info("grace period over: aborting %d requests", self.engine.num_outstanding)
    self.engine.abort_all()


def bind(host: str, port: int) -> socket.socket:
  """A bound, listening TCP socket (port 0: any free one) for `DrainingServer.run(sockets=[...])`.
  It listens from here on, so a client that connects before the server starts accepting waits in
  the backlog instead of being refused."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  return sock


def _error(status: int, message: str, **fields: Any) -> JSONResponse:
  return JSONResponse(P.error_body(message, **fields), status_code=status)


class _AbortOnDisconnect(StreamingResponse):
  """Streams while watching the connection: a disconnect cancels the stream (and so aborts its
  requests) at once, even while no token is due. `handles` are closed however it ends (closing a
  finished one does nothing), even if the body was never started."""

  def __init__(self, content: AsyncIterator[str], handles: list[RequestHandle]):
    super().__init__(content, media_type="text/event-stream")
    self.handles = handles

  async def __call__(self, scope, receive, send) -> None:
    async def disconnected() -> None:
      while (await receive())["type"] != "http.disconnect":
        pass

    streaming = asyncio.ensure_future(self.stream_response(send))
    watcher = asyncio.ensure_future(disconnected())
    try:
      await asyncio.wait({streaming, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for task in (streaming, watcher):
        task.cancel()
      with contextlib.suppress(asyncio.CancelledError, OSError):
        await streaming
      await self.body_iterator.aclose()
      for h in self.handles:
        h.close()


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
  """Runs `work`; if the client goes away first, cancels it (its requests are aborted)."""
  task = asyncio.ensure_future(work)

  async def disconnected() -> None:
    while (await request.receive())["type"] != "http.disconnect":
      pass

  watcher = asyncio.ensure_future(disconnected())
  try:
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    watcher.cancel()
    if not task.done():
      task.cancel()
  if task.cancelled():
    return Response(status_code=499)  # nobody is left to read it
  return task.result()


def _sse(payload: dict | str) -> str:
  return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: AsyncEngine, tokenizer: Tokenizer, *, model_name: str, chat_template: ChatTemplate) -> FastAPI:
  """The FastAPI application; its lifespan starts the engine thread and stops it at shutdown."""

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    engine.start()
    yield
    engine.shutdown()

  app = FastAPI(title="shardlab", lifespan=lifespan)
  created = int(time.time())
  vocab = getattr(tokenizer, "vocab_size", None)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, err: RequestValidationError):
    engine.metrics.reject("invalid")
    message, param = P.validation_message(err.errors())
    return _error(400, message, param=param)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request: Request, err: StarletteHTTPException):
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return _error(err.status_code, str(err.detail), type=kind)

  @app.exception_handler(P.OpenAIError)
  async def _openai(request: Request, err: P.OpenAIError):
    if err.status == 400:
      engine.metrics.reject("invalid")
    return JSONResponse(err.body(), status_code=err.status)

  @app.exception_handler(Exception)
  async def _unexpected(request: Request, err: Exception):
    log.exception("unexpected error")
    return _error(500, f"internal error: {type(err).__name__}: {err}", type="server_error")

  @app.get("/health")
  async def health():
    if engine.draining:
      return _error(503, "the server is shutting down", type="server_error", code="draining")
    if not engine.alive:
      return _error(503, f"the engine failed: {engine.error}", type="server_error", code="engine_failed")
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "shardlab", "max_model_len": engine.max_len}]}

  def check_model(name: str) -> None:
    if name != model_name:
      raise P.OpenAIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                          type="not_found_error", param="model", code="model_not_found")

  def prompt_ids(prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
      return tokenizer.encode(prompt)
    if vocab is not None and any(not 0 <= t < vocab for t in prompt):
      raise P.OpenAIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return list(prompt)

  async def submit_all(prompts: list[list[int]], req: P._SamplingFields, max_new: int | None,
                       logprobs: bool) -> list[RequestHandle]:
    """One engine request per (prompt, n) choice; all or none: a refusal aborts the ones already in."""
    handles: list[RequestHandle] = []
    try:
      for ids in prompts:
        n_new = P.check_lengths(len(ids), max_new, engine.max_len)
        for i in range(req.n):
          seed = None if req.seed is None else req.seed + i
          sampling = SamplingParams(max_tokens=n_new, temperature=req.temperature, top_k=req.top_k,
                                    top_p=req.top_p, seed=seed, logprobs=logprobs)
          handles.append(await engine.submit(ids, sampling, req.stop_strings))
    except BaseException as err:
      for h in handles:
        h.close()
      if isinstance(err, QueueFull):
        raise P.OpenAIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded") from None
      if isinstance(err, Draining):
        raise P.OpenAIError(503, str(err), type="server_error", code="draining") from None
      if isinstance(err, EngineFailed):
        raise P.OpenAIError(500, f"the engine failed: {err}", type="server_error") from None
      if isinstance(err, ValueError):
        raise P.OpenAIError(400, str(err)) from None
      raise
    return handles

  def token_texts(ids: list[int], as_ids: bool) -> list[str]:
    return [f"token_id:{t}" if as_ids else tokenizer.decode([t]) for t in ids]

  async def collect(handle: RequestHandle) -> dict:
    text, ids, lps, reason = [], [], [], None
    async for out in handle.stream():
      text.append(out.text)
      ids.extend(out.token_ids)
      lps.extend(out.logprobs or [])
      reason = out.finish_reason
    return {"text": "".join(text), "ids": ids, "logprobs": lps, "finish_reason": reason}

  async def answer_all(request: Request, handles: list[RequestHandle],
                       respond: Callable[[list[dict]], Response]) -> Response:
    """Every handle's whole result (`collect`) answered by `respond`, or a 500 if the engine failed;
    given up if the client leaves first. The handles are closed either way."""
    async def answer() -> Response:
      try:
        results = await asyncio.gather(*[collect(h) for h in handles])
      except EngineFailed as err:
        return _error(500, f"the engine failed: {err}", type="server_error")
      return respond(results)

    try:
      return await _unless_disconnected(request, answer())
    finally:
      for h in handles:
        h.close()

  async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """(choice index, Output) from every handle as they come; closing this closes them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
      try:
        async for out in h.stream():
          await queue.put((i, out))
      except Exception as err:  # noqa: BLE001 -- handed to the consumer, which reports it
        await queue.put((i, err))
      await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
      remaining = len(tasks)
      while remaining:
        i, item = await queue.get()
        if item is None:
          remaining -= 1
        elif isinstance(item, Exception):
          raise item
        else:
          yield i, item
    finally:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)

  def usage_of(handles: list[RequestHandle], n: int) -> dict:
    prompt = sum(len(h.request.prompt_ids) for h in handles[::n])  # each prompt once, not once per choice
    return P.usage(prompt, sum(h.num_output_tokens for h in handles))

  async def stream_events(handles: list[RequestHandle], req, chunk: Callable, choice: Callable,
                          first: Callable | None) -> AsyncIterator[str]:
    rid, stamp = P.new_id("cmpl" if first is None else "chatcmpl"), int(time.time())
    try:
      if first is not None:
        for i in range(len(handles)):
          yield _sse(chunk(rid, model_name, stamp, [first(i)]))
      async for i, out in merged(handles):
        yield _sse(chunk(rid, model_name, stamp, [choice(i, out)]))
      if req.include_usage:
        yield _sse(chunk(rid, model_name, stamp, [], usage_of(handles, req.n)))
    except EngineFailed as err:
      yield _sse(P.error_body(f"the engine failed: {err}", type="server_error"))
    yield _sse("[DONE]")

  @app.post("/v1/completions")
  async def completions(req: P.CompletionRequest, request: Request):
    check_model(req.model)
    prompts = [prompt_ids(p) for p in req.prompts()]
    want_lp = req.logprobs is not None
    handles = await submit_all(prompts, req, req.max_tokens, want_lp)

    def lp(out: Output | dict, offset: int = 0) -> dict | None:
      if not want_lp:
        return None
      ids = out.token_ids if isinstance(out, Output) else out["ids"]
      vals = out.logprobs if isinstance(out, Output) else out["logprobs"]
      return P.completion_logprobs(token_texts(ids, req.return_tokens_as_token_ids), list(vals or []), offset)

    if req.stream:
      emitted = [0] * len(handles)  # characters of each choice's text so far: where a chunk's offsets start

      def choice(i: int, out: Output) -> dict:
        logprobs = lp(out, emitted[i])
        emitted[i] += len(out.text)
        return {"index": i, "text": out.text, "finish_reason": out.finish_reason, "logprobs": logprobs}
      return _AbortOnDisconnect(stream_events(handles, req, P.completion_chunk, choice, None), handles)

    def respond(results: list[dict]) -> Response:
      choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": lp(r)}
                 for i, r in enumerate(results)]
      return JSONResponse(P.completion_response(P.new_id("cmpl"), model_name, choices, usage_of(handles, req.n)))

    return await answer_all(request, handles, respond)

  @app.post("/v1/chat/completions")
  async def chat(req: P.ChatCompletionRequest, request: Request):
    check_model(req.model)
    try:
      messages = [{"role": m.role, "content": m.text()} for m in req.messages]
      text = chat_template.render(messages)
    except ValueError as err:
      raise P.OpenAIError(400, str(err), param="messages") from None
    handles = await submit_all([tokenizer.encode(text)], req, req.max_new_tokens, req.logprobs)

    def lp(ids: list[int], vals: list[float] | None) -> dict | None:
      return (P.chat_logprobs(token_texts(ids, req.return_tokens_as_token_ids), list(vals or []))
              if req.logprobs else None)

    if req.stream:
      def first(i: int) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}

      def choice(i: int, out: Output) -> dict:
        delta = {"content": out.text} if out.text or not out.finished else {}
        return {"index": i, "delta": delta, "finish_reason": out.finish_reason,
                "logprobs": lp(out.token_ids, out.logprobs)}
      return _AbortOnDisconnect(stream_events(handles, req, P.chat_chunk, choice, first), handles)

    def respond(results: list[dict]) -> Response:
      choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                  "finish_reason": r["finish_reason"], "logprobs": lp(r["ids"], r["logprobs"])}
                 for i, r in enumerate(results)]
      return JSONResponse(P.chat_response(P.new_id("chatcmpl"), model_name, choices, usage_of(handles, req.n)))

    return await answer_all(request, handles, respond)

  return app
