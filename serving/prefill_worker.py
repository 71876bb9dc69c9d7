"""Disaggregation across processes: a prefill worker that computes prompts in its own process (its
own devices, on this host or another) and an engine that decodes them, the keys and values sent
over a TCP connection, the slow link between the two (DistServe, Splitwise).

  python -m serving.prefill_worker --config=tiny --checkpoint=runs/tiny --slots=8 --port=7000
  python serve.py --config=tiny --checkpoint=runs/tiny --slots=8 --prefill_worker=127.0.0.1:7000

The worker holds a `ModelRunner` with the engine's slots and context (the same model: give both
the same --config, --set and --checkpoint or --hf), paged as the engine's cache is (the same
--page_size and --num_pages), and with a draft model a second runner for the draft's prompts (the
same --draft_config, --draft_set and --draft_checkpoint or --draft_hf). It answers:
  info          its slots, context, vocabulary, pages and draft (checked when the engine connects)
  prefill       a step's prompt chunks for one model, as `ModelRunner.prefill` takes them; returns
                each row's next token and log-probability
  take          one slot's keys and values over its first `span` positions (a contiguous cache)
  take_pages    the keys and values of the given pages (a paged cache)
  assign_pages  one slot's page table (the engine assigns a request's pages on both sides)
Every request but `info` names its model ("target" or "draft"). `connect` is the engine's side: a
`RemotePrefill` per model stands where that model's prefill runner would, and
`serving.disaggregation.KVTransfer` moves what `take` or `take_pages` returns into the decode cache.

Messages are a JSON header and raw arrays (dtype and shape in the header), each length-prefixed:
no pickle, nothing executed from the wire. The link is meant for machines of one cluster; the
worker listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import json
import socket
import struct

import jax
import numpy as np

from models.paged_cache import PagedKVCache
from serving.disaggregation import take_pages, take_slot

_LEN = struct.Struct("!Q")


def _send(sock: socket.socket, header: dict, arrays: list[np.ndarray] = ()) -> None:
  arrays = [np.ascontiguousarray(a) for a in arrays]
  header = {**header, "arrays": [[str(a.dtype), list(a.shape)] for a in arrays]}
  parts = [json.dumps(header).encode()] + [a.tobytes() for a in arrays]
  sock.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
  buf = bytearray()
  while len(buf) < n:
    chunk = sock.recv(min(n - len(buf), 1 << 20))
    if not chunk:
      raise ConnectionError("the prefill link closed")
    buf += chunk
  return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, list[np.ndarray]]:
  header = json.loads(_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]))
  arrays = []
  for dtype, shape in header.pop("arrays"):
    data = _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])
    arrays.append(np.frombuffer(data, dtype=_dtype(dtype)).reshape(shape))
  return header, arrays


def _dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # noqa: PLC0415 - numpy has no bf16 of its own; JAX installs ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class _Link:
  """The connection to a prefill worker at `address` ("host:port")."""

  def __init__(self, address: str, timeout_s: float):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"prefill_worker={address!r}: give host:port")
    self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)

  def call(self, header: dict, arrays: list[np.ndarray] = ()) -> tuple[dict, list[np.ndarray]]:
    _send(self.sock, header, arrays)
    reply, out = _recv(self.sock)
    if "error" in reply:
      raise RuntimeError(f"prefill worker: {reply['error']}")
    return reply, out


class RemotePrefill:
  """One model ("target" or "draft") of a prefill worker: stands where its prefill runner would."""

  def __init__(self, link: _Link, model: str, slots: int, max_len: int, pages: int):
    self._link, self.model = link, model
    self.slots, self.max_len, self.pages = slots, max_len, pages  # pages: 0 for a contiguous cache

  def _call(self, header: dict, arrays: list[np.ndarray] = ()) -> list[np.ndarray]:
    return self._link.call({**header, "model": self.model}, arrays)[1]

  def prefill(self, chunks: list[tuple[np.ndarray, int, int]], bucket: int, sampling: tuple) -> tuple:
    """`ModelRunner.prefill` on the worker: (next token [R], log-probability [R]) as numpy arrays."""
    header = {"op": "prefill", "bucket": bucket, "slots": [int(s) for _, s, _ in chunks],
              "starts": [int(st) for _, _, st in chunks]}
    tokens, logprobs = self._call(header, [np.asarray(c, np.int32) for c, _, _ in chunks] +
                                  [np.asarray(a) for a in sampling])
    return tokens, logprobs

  def take(self, slot: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The worker's keys and values of `slot`, positions [0, span): [layers, kv heads, span, head dim] each."""
    k, v = self._call({"op": "take", "slot": slot, "span": span})
    return k, v

  def take_pages(self, index_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The worker's pages `index` ([layers, N, kv heads, page size, head dim] each; zeros where out of range)."""
    k, v = self._call({"op": "take_pages"}, [np.asarray(index_N, np.int32)])
    return k, v

  def assign_pages(self, slot: int, pages: list[int]) -> None:
    """`ModelRunner.assign_pages` on the worker."""
    self._call({"op": "assign_pages", "slot": slot, "pages": [int(p) for p in pages]})

  def warm_up_prefill(self, chunk_lengths: tuple[int, ...], token_budget: int) -> int:
    """`ModelRunner.warm_up_prefill` on the worker: the number of programs it compiled."""
    (count,) = self._call({"op": "warm_up_prefill", "chunk_lengths": [int(c) for c in chunk_lengths],
                           "token_budget": int(token_budget)})
    return int(count[0])


def connect(address: str, *, slots: int, max_len: int, vocab_size: int, pages: int = 0, page_size: int = 0,
            draft_vocab_size: int | None = None, timeout_s: float = 600.0) -> tuple[RemotePrefill, RemotePrefill | None]:
  """Connects to the worker at `address` and checks that it serves what this engine needs (slots,
  context, vocabulary, pages, and a draft model with `draft_vocab_size`); returns the target's
  `RemotePrefill` and the draft's (None without a draft)."""
  link = _Link(address, timeout_s)
  info = link.call({"op": "info"})[0]
  want = {"slots": slots, "max_len": max_len, "vocab_size": vocab_size, "page_size": page_size, "pages": pages,
          "draft_vocab_size": draft_vocab_size}
  if {k: info.get(k) for k in want} != want:
    link.sock.close()
    raise ValueError(f"prefill worker at {address} serves {info}, but this engine needs {want}: start it with the "
                     "engine's --slots, context length, model, --page_size, --num_pages and draft model")
  target = RemotePrefill(link, "target", slots, max_len, pages)
  return target, None if draft_vocab_size is None else RemotePrefill(link, "draft", slots, max_len, pages)


def serve(runners: dict, host: str, port: int, on_listen=print) -> None:
  """Answers engines' requests with `runners` ({"target": a `ModelRunner`, and "draft": another
  with a draft model}), one connected engine at a time, until the process is stopped."""
  with socket.create_server((host, port)) as server:
    on_listen(f"prefill worker listening on {host}:{server.getsockname()[1]}")
    while True:
      conn, _ = server.accept()
      with conn:
        _answer(runners, conn)


def _info(runners: dict) -> dict:
  runner, draft = runners["target"], runners.get("draft")
  paged = isinstance(runner.cache, PagedKVCache)
  return {"slots": runner.slots, "max_len": runner.max_len, "vocab_size": runner.cfg.vocab_size,
          "page_size": runner.cache.page_size if paged else 0, "pages": runner.cache.pages if paged else 0,
          "draft_vocab_size": None if draft is None else draft.cfg.vocab_size}


def _answer(runners: dict, conn: socket.socket) -> None:
  """One engine's requests, until it disconnects."""
  while True:
    try:
      header, arrays = _recv(conn)
    except ConnectionError:
      return
    try:
      op = header["op"]
      if op == "info":
        _send(conn, _info(runners))
        continue
      runner = runners.get(header["model"])
      if runner is None:
        raise ValueError(f"this worker serves no {header['model']} model")
      if op == "prefill":
        n = len(header["slots"])
        chunks = list(zip(arrays[:n], header["slots"], header["starts"]))
        out = runner.prefill(chunks, header["bucket"], tuple(arrays[n:]))
      elif op == "take":
        out = take_slot(runner.cache, header["slot"], span=header["span"])
      elif op == "take_pages":
        out = take_pages(runner.cache, arrays[0])
      elif op == "assign_pages":
        runner.assign_pages(header["slot"], header["pages"])
        out = ()
      elif op == "warm_up_prefill":
        out = (np.asarray([runner.warm_up_prefill(tuple(header["chunk_lengths"]), header["token_budget"])]),)
      else:
        raise ValueError(f"unknown op {op!r}")
      _send(conn, {}, [np.asarray(a) for a in jax.device_get(out)])
    except Exception as err:  # noqa: BLE001 -- reported to the engine, which raises it
      _send(conn, {"error": f"{type(err).__name__}: {err}"})


def main(argv) -> None:
  del argv
  from absl import flags  # noqa: PLC0415

  import configs  # noqa: PLC0415
  from serving.loading import load, load_draft  # noqa: PLC0415
  from serving.runner import ModelRunner  # noqa: PLC0415

  f = flags.FLAGS
  config = configs.get_config(f.config, f.set)
  loaded = load(config, checkpoint=f.checkpoint, hf=f.hf)
  model = loaded.config.model
  max_len = f.max_len or model.max_seq_len
  paged = {}
  if f.page_size:  # as serve.py sizes the engine's pool
    paged = {"page_size": f.page_size, "pages": f.num_pages or f.slots * (max_len // f.page_size)}
  runners = {"target": ModelRunner(model, loaded.params, plan=loaded.plan, slots=f.slots, max_len=max_len, **paged)}
  if f.draft_checkpoint or f.draft_hf or f.draft_config:
    draft = load_draft(loaded.config, loaded.plan, preset=f.draft_config or f.config, overrides=f.draft_set,
                       checkpoint=f.draft_checkpoint, hf=f.draft_hf)
    runners["draft"] = ModelRunner(draft.config.model, draft.params, plan=loaded.plan, slots=f.slots, max_len=max_len,
                                   **paged)
  serve(runners, f.host, f.port, on_listen=lambda line: print(line, flush=True))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("config", "tiny", "Preset, as serve.py's --config.")
  flags.DEFINE_multi_string("set", [], "Config overrides, as serve.py's --set.")
  flags.DEFINE_string("checkpoint", None, "A shardlab run directory (the engine's).")
  flags.DEFINE_string("hf", None, "A Hugging Face directory (the engine's).")
  flags.DEFINE_integer("slots", 8, "The engine's --slots.")
  flags.DEFINE_integer("max_len", 0, "The engine's context length (0: model.max_seq_len).")
  flags.DEFINE_integer("page_size", 0, "The engine's --page_size (0: a contiguous cache).")
  flags.DEFINE_integer("num_pages", 0, "The engine's --num_pages (0: as serve.py sizes it).")
  flags.DEFINE_string("draft_config", None, "The engine's --draft_config (given alone: a random draft).")
  flags.DEFINE_multi_string("draft_set", [], "The engine's --draft_set.")
  flags.DEFINE_string("draft_checkpoint", None, "The engine's --draft_checkpoint.")
  flags.DEFINE_string("draft_hf", None, "The engine's --draft_hf.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 0, "Port (0: any free one; printed).")
  app.run(main)
