"""The engine behind an asyncio server: its step loop in a background thread, one queue per request.

`Engine` (serving/engine.py) is single-threaded, so one thread owns it: it takes commands (add,
abort) from an inbox, runs `engine.step()` while there is work, and hands each request's new
tokens to that request's `asyncio.Queue` on the event loop (`call_soon_threadsafe`). The event
loop side (`RequestHandle.stream`) turns tokens into text (incremental detokenisation), applies
stop strings (and aborts the request in the engine when one matches), and records metrics.

Admission: at most `slots + max_waiting` requests are outstanding; one more is `QueueFull` (the
app answers 429). While draining (after SIGTERM) new requests are `Draining` (503). A request
whose consumer goes away (client disconnect, cancelled task) is aborted in the engine, which
frees its slot at the next step. If `engine.step` raises, every outstanding request fails with
`EngineFailed` and the engine is marked dead (/health answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import AsyncIterator, Sequence

from data.tokenizer import Tokenizer
from serving.detokenize import IncrementalDetokenizer, StopStringMatcher
from serving.engine import Request, SamplingParams
from serving.metrics import Metrics

log = logging.getLogger("shardlab.serving")


class QueueFull(Exception):
  """Too many outstanding requests."""


class Draining(Exception):
  """The server is shutting down and takes no new requests."""


class EngineFailed(Exception):
  """The engine's step loop raised; the message says what."""


@dataclasses.dataclass
class Output:
  """What a request produced since its previous Output."""
  text: str  # new text (stop strings cut, a possible stop string's start held back)
  token_ids: list[int]
  logprobs: list[float] | None
  finished: bool = False
  finish_reason: str | None = None  # "stop" | "length" | "abort"


_ACCEPTED = object()


class RequestHandle:
  """One submitted request: `stream()` yields its `Output`s; closing it early aborts the request."""

  def __init__(self, owner: "AsyncEngine", request: Request, stop: Sequence[str], queue: asyncio.Queue):
    self._owner, self.request, self._queue = owner, request, queue
    self.id = request.id
    self._detok = IncrementalDetokenizer(owner.tokenizer, request.prompt_ids)
    self._stops = StopStringMatcher(stop)
    self._emitted = 0  # characters of the text already yielded
    self._hidden_ids = frozenset(request.sampling.stop_token_ids) | (
        {owner.eos_id} if owner.eos_id is not None else frozenset())
    self.arrival = time.monotonic()
    self.first_token: float | None = None
    self.num_output_tokens = 0
    self.done = False

  async def stream(self) -> AsyncIterator[Output]:
    reason = "abort"
    try:
      while not self.done:
        item = await self._queue.get()
        if isinstance(item, BaseException):
          raise item
        out = self._absorb(item)
        if out.finished:
          reason = out.finish_reason
          self.done = True
        if out.text or out.token_ids or out.finished:
          yield out
    finally:
      if not self.done:  # the consumer left early: free the slot
        self.done = True
        self._owner.abort(self.id)
      self._owner._finished(self, reason)

  def close(self) -> None:
    """Abort a request that will never be streamed (another choice of its HTTP request failed)."""
    if not self.done:
      self.done = True
      self._owner.abort(self.id)
      self._owner._finished(self, "abort")

  def _absorb(self, event) -> Output:
    now = time.monotonic()
    ids = list(event.token_ids)
    if ids and self.first_token is None:
      self.first_token = now
    self.num_output_tokens += len(ids)
    self._owner.metrics.add_generated(len(ids))
    finished, reason = event.finished, event.finish_reason
    visible = ids
    if finished and reason == "stop" and visible and visible[-1] in self._hidden_ids:
      visible = visible[:-1]  # the EOS / stop token ends the text but is not part of it
    self._stops.add(self._detok.push(visible))
    if finished and not self._stops.stopped:
      self._stops.add(self._detok.flush())
    if self._stops.stopped and not finished:
      finished, reason = True, "stop"
      self._owner.abort(self.id)
    end = len(self._stops.text) if finished else self._stops.safe_length()
    text, self._emitted = self._stops.text[self._emitted:end], max(self._emitted, end)
    return Output(text, ids, list(event.logprobs) if event.logprobs is not None else None, finished, reason)


class AsyncEngine:
  """Runs `engine` in a daemon thread; `submit` from the event loop."""

  def __init__(self, engine, tokenizer: Tokenizer, *, max_waiting: int = 256, metrics: Metrics | None = None):
    self.engine, self.tokenizer = engine, tokenizer
    self.eos_id = getattr(tokenizer, "eos_id", None)
    self.max_len, self.slots = engine.max_len, engine.slots
    self.capacity = engine.slots + max_waiting
    self.metrics = metrics or Metrics()
    self.draining = False
    self.error: str | None = None
    self._cv = threading.Condition()
    self._inbox: list[tuple] = []
    self._live: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
    self._outstanding: set[str] = set()  # event loop only
    self._ids = itertools.count()
    self._stop = False
    self._closed = False  # the thread has ended: commands are refused, not queued
    self._started = False
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

  # ---- event loop side -------------------------------------------------------------------------

  def start(self) -> None:
    """Starts the engine thread (once; later calls do nothing)."""
    if not self._started:
      self._started = True
      self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  @property
  def num_outstanding(self) -> int:
    return len(self._outstanding)

  async def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, stop: Sequence[str] = (),
                   request_id: str | None = None) -> RequestHandle:
    """Queues a request; returns once the engine accepted it. Raises `QueueFull`, `Draining`,
    `EngineFailed`, or the engine's `ValueError` for a request it refuses."""
    if self.draining:
      self.metrics.reject("draining")
      raise Draining("the server is shutting down")
    if self.error is not None or not self._thread.is_alive():
      raise EngineFailed(self.error or "the engine is not running")
    if len(self._outstanding) >= self.capacity:
      self.metrics.reject("queue_full")
      raise QueueFull(f"{len(self._outstanding)} requests are outstanding (the limit is {self.capacity})")
    rid = request_id or f"req-{next(self._ids)}"
    request = Request(id=rid, prompt_ids=tuple(int(t) for t in prompt_ids), sampling=sampling)
    queue: asyncio.Queue = asyncio.Queue()
    handle = RequestHandle(self, request, stop, queue)
    self._outstanding.add(rid)
    self._post(("add", request, asyncio.get_running_loop(), queue))
    try:
      first = await queue.get()
    except BaseException:
      handle.close()  # cancelled while waiting for the engine to accept it
      raise
    if first is not _ACCEPTED:
      handle.done = True
      self._outstanding.discard(rid)
      if isinstance(first, ValueError):
        self.metrics.reject("invalid")
      raise first
    self.metrics.add_prompt(len(request.prompt_ids))
    return handle

  def abort(self, request_id: str) -> None:
    self._post(("abort", request_id))

  def abort_all(self) -> None:
    """Aborts every outstanding request (their streams end with finish_reason "abort")."""
    for rid in list(self._outstanding):
      self.abort(rid)

  def _finished(self, handle: RequestHandle, reason: str | None) -> None:
    if handle.id in self._outstanding:
      self._outstanding.discard(handle.id)
      self.metrics.finish(reason or "abort", handle.arrival, handle.first_token, time.monotonic(),
                          handle.num_output_tokens)

  def shutdown(self, timeout: float = 10.0) -> None:
    """Aborts whatever is still running and stops the thread."""
    self.draining = True
    with self._cv:
      self._stop = True
      self._cv.notify()
    if self._thread.is_alive():
      self._thread.join(timeout)

  # ---- engine thread ---------------------------------------------------------------------------

  def _post(self, command: tuple) -> None:
    with self._cv:
      if not self._closed:
        self._inbox.append(command)
        self._cv.notify()
        return
    self._refuse(command)

  def _refuse(self, command: tuple) -> None:
    """An `add` that reached a stopped engine thread: its submitter is told, not left waiting."""
    if command[0] == "add":
      _, _, loop, queue = command
      with contextlib.suppress(RuntimeError):  # the event loop may be closed already
        loop.call_soon_threadsafe(queue.put_nowait, EngineFailed(self.error or "the engine has stopped"))

  def _send(self, rid: str, item) -> None:
    target = self._live.get(rid)
    if target is None:
      return
    loop, queue = target
    try:
      loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
      self._live.pop(rid, None)

  def _run(self) -> None:
    try:
      while True:
        with self._cv:
          while not self._inbox and not self._stop and not self.engine.has_work():
            self._cv.wait()
          commands, self._inbox = self._inbox, []
          stop = self._stop
        for command in commands:
          self._apply(command)
        if stop:
          break
        if self.engine.has_work():
          for event in self.engine.step():
            self._send(event.request_id, event)
            if event.finished:
              self._live.pop(event.request_id, None)
        self.metrics.set_queue(self.engine.num_waiting, self.engine.num_running)
        self.metrics.set_speculation(getattr(self.engine, "speculation", None))
        self.metrics.set_prefix_cache(getattr(self.engine, "prefix_cache", None))
        self.metrics.set_transfers(getattr(self.engine, "transfers", None))
    except Exception as err:  # noqa: BLE001 -- reported to every waiting request, then the thread ends
      log.exception("engine step failed")
      self.error = f"{type(err).__name__}: {err}"
    finally:
      with self._cv:
        self._closed = True
        leftover, self._inbox = self._inbox, []
      for command in leftover:
        self._refuse(command)
      failure = EngineFailed(self.error) if self.error else None
      for rid in list(self._live):
        if failure is not None:
          self._send(rid, failure)
        else:
          self._send_abort(rid)
      self._live.clear()

  def _apply(self, command: tuple) -> None:
    if command[0] == "add":
      _, request, loop, queue = command
      self._live[request.id] = (loop, queue)
      try:
        self.engine.add(request)
      except ValueError as err:
        self._send(request.id, err)
        self._live.pop(request.id, None)
        return
      self._send(request.id, _ACCEPTED)
    elif command[0] == "abort":
      rid = command[1]
      if rid in self._live:
        self.engine.abort(rid)
        self._send_abort(rid)
        self._live.pop(rid, None)

  def _send_abort(self, rid: str) -> None:
    self._send(rid, _Aborted(rid))


@dataclasses.dataclass
class _Aborted:
  """The engine-side end of an aborted request, in the shape of a TokenEvent."""
  request_id: str
  token_ids: tuple = ()
  logprobs: None = None
  finished: bool = True
  finish_reason: str = "abort"
