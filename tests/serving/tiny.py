"""Shared by the engine tests: a tiny decoder, a briefly trained copy of it, an engine over it and a
loop that runs one, and the reference decoder every engine result is checked against: the full
forward pass re-run over the whole sequence for every new token (no cache), argmax and
log_softmax taken in numpy."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import ModelConfig
from models.transformer import Transformer
from parallel.plan import single_device_plan
from serving.engine import Engine, Request, SamplingParams

CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
MAX_LEN = 64
PATTERN = np.arange(7, 7 + 23) % CFG.vocab_size  # the trained model learns to continue this cycle


def params_of(model: Transformer):
  return nnx.to_pure_dict(nnx.state(model))


@functools.cache
def random_params(seed: int = 0):
  return params_of(Transformer(CFG, rngs=nnx.Rngs(seed)))


@functools.cache
def trained_params(steps: int = 60, cfg: ModelConfig = CFG):
  """The random model after `steps` Adam steps on a repeating cycle, so its predictions are peaked
  like a trained model's (greedy decode then follows the cycle)."""
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
  params = nnx.to_pure_dict(params)
  tx = optax.adam(1e-2)
  seq = np.tile(PATTERN, 4)[:33]
  rows = np.stack([np.roll(seq, -i) for i in range(8)])
  inputs, targets = jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])

  def loss(p):
    logits = nnx.merge(graphdef, p)(inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(p, o):
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = step(params, opt)
  return params


@functools.cache
def forward_fn(cfg: ModelConfig):
  """The jitted full forward pass of `cfg`: (params, tokens [B, L]) -> float32 logits."""
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]
  return jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens).astype(jnp.float32))


def reference_decode(params, prompt, n: int, cfg: ModelConfig = CFG, length: int = MAX_LEN):
  """Greedy continuation of `prompt` by the full forward pass at every step: (tokens, logprobs, logits)."""
  seq, tokens, logprobs, logits = list(prompt), [], [], []
  for _ in range(n):
    padded = np.zeros((1, length), np.int32)  # causal: padding after the sequence changes nothing before it
    padded[0, :len(seq)] = seq
    row = np.asarray(forward_fn(cfg)(params, padded))[0, len(seq) - 1].astype(np.float64)
    logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
    token = int(np.argmax(row))
    tokens.append(token)
    logprobs.append(float(logp[token]))
    logits.append(row)
    seq.append(token)
  return tokens, logprobs, logits


SLOTS, BUDGET = 3, 16


def make_engine(params, cfg: ModelConfig = CFG, **kw):
  kw = {"slots": SLOTS, "token_budget": BUDGET, "max_len": MAX_LEN, "eos_id": None, "plan": single_device_plan(),
        **kw}
  return Engine(cfg, params, **kw)


def run(engine, requests, joins=None):
  """Steps until idle; `joins` {step: [requests]} adds requests later. Returns {id: (tokens, logprobs, reason)}."""
  for r in requests:
    engine.add(r)
  out, step, joins = {}, 0, dict(joins or {})
  while engine.has_work() or joins:
    for r in joins.pop(step, []):
      engine.add(r)
    for e in engine.step():
      tokens, logprobs, _ = out.get(e.request_id, ([], [], None))
      out[e.request_id] = (tokens + e.token_ids, logprobs + (e.logprobs or []), e.finish_reason)
    step += 1
  return out


def greedy(rid, prompt, n, **kw):
  return Request(rid, tuple(int(t) for t in prompt), SamplingParams(max_tokens=n, temperature=0.0, logprobs=True, **kw))


@contextlib.contextmanager
def compiled_programs():
  """Collects the name of every program XLA compiles inside the block (from JAX's compile events)."""
  names = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

