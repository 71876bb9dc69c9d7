"""Helpers for the HTTP tests: an in-process uvicorn server on the loopback, and a stand-in engine.

`StandInEngine` is NOT the real engine: it has `serving.engine.Engine`'s interface and a trivially
predictable output (each token is the previous one plus one, mod 256, so with the byte tokenizer
"abc" continues "defg..."), so tests of the HTTP layer (queueing, aborts, stop strings, error
mapping) can state exact expectations and control timing. Tests of what the model generates use
the real `Engine`.
"""

from __future__ import annotations

import collections
import signal
import threading
import time

from serving.app import DrainingServer, bind
from serving.engine import Request, TokenEvent


class StandInEngine:
  """Engine's interface with a predictable continuation; `step_s` seconds per step; `fail_on` a
  prompt (bytes) makes `step` raise, as a crashed engine would."""

  def __init__(self, *, slots: int = 4, max_len: int = 64, eos_id: int | None = 256, step_s: float = 0.0,
               fail_on: bytes | None = None):
    self.slots, self.max_len, self.eos_id, self.step_s, self.fail_on = slots, max_len, eos_id, step_s, fail_on
    self._waiting: collections.deque[Request] = collections.deque()
    self._running: dict[str, tuple[Request, list[int]]] = {}
    self._aborts: set[str] = set()
    self.prompts: list[tuple[int, ...]] = []  # every accepted prompt, in order
    self.aborted: list[str] = []

  def add(self, request: Request) -> None:
    if len(request.prompt_ids) + request.sampling.max_tokens > self.max_len:
      raise ValueError(f"prompt plus max_tokens exceeds max_len={self.max_len}")
    self.prompts.append(request.prompt_ids)
    self._waiting.append(request)

  def abort(self, request_id: str) -> None:
    self._aborts.add(request_id)

  def has_work(self) -> bool:
    return bool(self._waiting or self._running or self._aborts)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  def step(self) -> list[TokenEvent]:
    time.sleep(self.step_s)
    events = []
    for rid in self._aborts:
      self._waiting = collections.deque(r for r in self._waiting if r.id != rid)
      if self._running.pop(rid, None) is not None:
        self.aborted.append(rid)
        events.append(TokenEvent(rid, [], None, True, "abort"))
    self._aborts.clear()
    while self._waiting and len(self._running) < self.slots:
      r = self._waiting.popleft()
      if self.fail_on is not None and bytes(r.prompt_ids) == self.fail_on:
        raise RuntimeError("stand-in engine failure")
      self._running[r.id] = (r, [])
    for rid, (r, out) in list(self._running.items()):
      token = ((out[-1] if out else r.prompt_ids[-1]) + 1) % 256
      out.append(token)
      stop = token in r.sampling.stop_token_ids or token == self.eos_id
      length = len(out) >= r.sampling.max_tokens
      finished = stop or length
      events.append(TokenEvent(rid, [token], [-0.5] if r.sampling.logprobs else None, finished,
                               "stop" if stop else "length" if length else None))
      if finished:
        del self._running[rid]
    return events


class Server:
  """serve.py's server (`DrainingServer`) for `app` on 127.0.0.1 (a free port) in a daemon thread;
  `stop()` shuts it down as SIGTERM would."""

  def __init__(self, app, engine, graceful_s: float = 5.0):
    self._sock = bind("127.0.0.1", 0)
    self.port = self._sock.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.server = DrainingServer(app, engine, graceful_s=graceful_s)
    self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError("uvicorn did not start")
      time.sleep(0.01)

  def stop(self) -> None:
    self.server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
    self._thread.join(30)
    self._sock.close()
