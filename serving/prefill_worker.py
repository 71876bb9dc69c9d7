"""Disaggregation across processes: a prefill worker that computes prompts in its own process (its
own devices, on this host or another) and an engine that decodes them, the keys and values sent
over a TCP connection, the slow link between the two (DistServe, Splitwise).

  python -m serving.prefill_worker --config=tiny --checkpoint=runs/tiny --slots=8 --port=7000
  python serve.py --config=tiny --checkpoint=runs/tiny --slots=8 --prefill_worker=127.0.0.1:7000

The worker holds a `ModelRunner` with the engine's slots and context (the same model: give both
the same --config, --set and --checkpoint or --hf) and answers three requests: `info` (its slots,
context and vocabulary, checked when the engine connects), `prefill` (a step's prompt chunks, as
`ModelRunner.prefill` takes them; returns each row's next token and log-probability) and `take`
(one slot's keys and values over its first `span` positions, as numpy arrays).
`RemotePrefill` is the engine's side: it stands where the engine's prefill runner would, and
`serving.disaggregation.KVTransfer` moves what `take` returns into the decode cache.

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

from serving.disaggregation import take_slot

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


class RemotePrefill:
  """The engine's side of a prefill worker at `address` ("host:port")."""

  def __init__(self, address: str, *, slots: int, max_len: int, vocab_size: int, timeout_s: float = 600.0):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"prefill_worker={address!r}: give host:port")
    self._sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    info = self._call({"op": "info"})[0]
    want = {"slots": slots, "max_len": max_len, "vocab_size": vocab_size}
    if {k: info[k] for k in want} != want:
      self._sock.close()
      raise ValueError(f"prefill worker at {address} serves {info}, but this engine needs {want}: start it with the "
                       "engine's --slots, context length and model")
    self.slots, self.max_len = slots, max_len
    self.address = address

  def _call(self, header: dict, arrays: list[np.ndarray] = ()) -> tuple[dict, list[np.ndarray]]:
    _send(self._sock, header, arrays)
    reply, out = _recv(self._sock)
    if "error" in reply:
      raise RuntimeError(f"prefill worker: {reply['error']}")
    return reply, out

  def prefill(self, chunks: list[tuple[np.ndarray, int, int]], bucket: int, sampling: tuple) -> tuple:
    """`ModelRunner.prefill` on the worker: (next token [R], log-probability [R]) as numpy arrays."""
    header = {"op": "prefill", "bucket": bucket, "slots": [int(s) for _, s, _ in chunks],
              "starts": [int(st) for _, _, st in chunks]}
    _, (tokens, logprobs) = self._call(header, [np.asarray(c, np.int32) for c, _, _ in chunks] +
                                       [np.asarray(a) for a in sampling])
    return tokens, logprobs

  def take(self, slot: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The worker's keys and values of `slot`, positions [0, span): [layers, kv heads, span, head dim] each."""
    _, (k, v) = self._call({"op": "take", "slot": slot, "span": span})
    return k, v

  def close(self) -> None:
    self._sock.close()


def serve(runner, host: str, port: int, on_listen=print) -> None:
  """Answers engines' requests with `runner` (a `ModelRunner`), one connected engine at a time,
  until the process is stopped."""
  with socket.create_server((host, port)) as server:
    on_listen(f"prefill worker listening on {host}:{server.getsockname()[1]}")
    while True:
      conn, _ = server.accept()
      with conn:
        _answer(runner, conn)


def _answer(runner, conn: socket.socket) -> None:
  """One engine's requests, until it disconnects."""
  while True:
    try:
      header, arrays = _recv(conn)
    except ConnectionError:
      return
    try:
      if header["op"] == "info":
        _send(conn, {"slots": runner.slots, "max_len": runner.max_len, "vocab_size": runner.cfg.vocab_size})
      elif header["op"] == "prefill":
        n = len(header["slots"])
        chunks = list(zip(arrays[:n], header["slots"], header["starts"]))
        out = runner.prefill(chunks, header["bucket"], tuple(arrays[n:]))
        _send(conn, {}, [np.asarray(a) for a in jax.device_get(out)])
      elif header["op"] == "take":
        k, v = take_slot(runner.cache, header["slot"], span=header["span"])
        _send(conn, {}, [np.asarray(a) for a in jax.device_get((k, v))])
      else:
        _send(conn, {"error": f"unknown op {header['op']!r}"})
    except Exception as err:  # noqa: BLE001 -- reported to the engine, which raises it
      _send(conn, {"error": f"{type(err).__name__}: {err}"})


def main(argv) -> None:
  del argv
  from absl import flags  # noqa: PLC0415

  import configs  # noqa: PLC0415
  from serving.loading import load  # noqa: PLC0415
  from serving.runner import ModelRunner  # noqa: PLC0415

  f = flags.FLAGS
  config = configs.get_config(f.config, f.set)
  loaded = load(config, checkpoint=f.checkpoint, hf=f.hf)
  model = loaded.config.model
  runner = ModelRunner(model, loaded.params, plan=loaded.plan, slots=f.slots, max_len=f.max_len or model.max_seq_len)
  serve(runner, f.host, f.port, on_listen=lambda line: print(line, flush=True))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("config", "tiny", "Preset, as serve.py's --config.")
  flags.DEFINE_multi_string("set", [], "Config overrides, as serve.py's --set.")
  flags.DEFINE_string("checkpoint", None, "A shardlab run directory (the engine's).")
  flags.DEFINE_string("hf", None, "A Hugging Face directory (the engine's).")
  flags.DEFINE_integer("slots", 8, "The engine's --slots.")
  flags.DEFINE_integer("max_len", 0, "The engine's context length (0: model.max_seq_len).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 0, "Port (0: any free one; printed).")
  app.run(main)
