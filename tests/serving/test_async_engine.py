"""AsyncEngine without HTTP: admission, refusals and aborts, on StandInEngine (tests/serving/http_helpers.py)."""

from __future__ import annotations

import asyncio

import pytest

from data.tokenizer import ByteTokenizer
from serving.async_engine import AsyncEngine, Draining, QueueFull
from serving.engine import SamplingParams
from tests.serving.http_helpers import StandInEngine


def _run(coro_fn, engine: StandInEngine, **kw):
  async def main():
    async_engine = AsyncEngine(engine, ByteTokenizer(), **kw)
    async_engine.start()
    try:
      return await asyncio.wait_for(coro_fn(async_engine), 30)
    finally:
      async_engine.shutdown()
  return asyncio.run(main())


def test_the_engines_refusal_reaches_the_caller_and_nothing_else():
  async def go(e: AsyncEngine):
    ok = await e.submit(list(b"ab"), SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="max_len"):
      await e.submit(list(b"ab"), SamplingParams(max_tokens=100))  # the stand-in's max_len is 64
    return "".join([o.text async for o in ok.stream()]), e.num_outstanding

  assert _run(go, StandInEngine()) == ("cde", 0)


def test_admission_bound_and_draining():
  async def go(e: AsyncEngine):
    held = [await e.submit(list(b"a"), SamplingParams(max_tokens=50)) for _ in range(3)]  # 1 slot + 2 waiting
    with pytest.raises(QueueFull):
      await e.submit(list(b"a"), SamplingParams(max_tokens=1))
    held[0].close()  # a place frees up at once
    more = await e.submit(list(b"a"), SamplingParams(max_tokens=1))
    e.draining = True
    with pytest.raises(Draining):
      await e.submit(list(b"a"), SamplingParams(max_tokens=1))
    e.abort_all()
    return [[o.finish_reason async for o in h.stream()][-1] for h in held[1:] + [more]]

  assert _run(go, StandInEngine(slots=1, step_s=0.01), max_waiting=2) == ["abort", "abort", "abort"]


def test_leaving_a_stream_early_aborts_the_request():
  engine = StandInEngine(step_s=0.01)

  async def go(e: AsyncEngine):
    handle = await e.submit(list(b"a"), SamplingParams(max_tokens=50))
    async for out in handle.stream():
      break  # the consumer goes away after the first output
    for _ in range(200):
      if engine.aborted:
        break
      await asyncio.sleep(0.01)
    return e.num_outstanding

  assert _run(go, engine) == 0
  assert len(engine.aborted) == 1 and engine.num_running == 0
