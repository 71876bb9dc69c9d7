"""The device side of the engine: the model's own pieces run over a KV cache, compiled once per shape.

Two compiled calls, both pure functions of (parameters, cache, small inputs) with the cache donated
so XLA updates it in place:

  prefill   one chunk of one request's prompt, [1, C] with C from a few buckets (powers of two, so
            the number of compilations is bounded), written into the request's slot from position
            `start`; returns the next token sampled from the chunk's last real token.
  decode    `steps` decode steps for every slot ([slots, 1] per step) in a `lax.fori_loop` on the
            device: one dispatch and one host transfer per `steps` tokens. Slots not marked active
            compute but write nothing (their cache position is `max_len`, which the scatter drops).

Each step runs `Transformer.embed_tokens`, `Transformer.forward_layers_cached` (the layer stack with
each layer's KV-cache slice as its layer input) and `Transformer.head`: the model's code, not a
copy of it.

Sharding: parameters by the plan's `params` table (Megatron column/row parallel over `tensor`), the
cache by `models.cache.CACHE_AXES` under the `activations` table (slots over the batch axes, kv
heads over `tensor`). XLA inserts the all-reduce after each row-parallel matmul, as in training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import ModelConfig
from models.cache import CACHE_AXES, KVCache
from models.transformer import Transformer, logical_axes
from parallel.plan import ShardingPlan
from serving.sampling import sample

MIN_BUCKET = 16


def buckets(token_budget: int) -> tuple[int, ...]:
  """Prefill chunk lengths: powers of two from MIN_BUCKET up to the first >= token_budget."""
  out = [MIN_BUCKET]
  while out[-1] < token_budget:
    out.append(out[-1] * 2)
  return tuple(out)


def serving_params(cfg: ModelConfig, params: Any, plan: ShardingPlan) -> Any:
  """The parameters in the compute dtype (decode reads every weight once per token: bf16 halves
  the bytes), laid out by the plan's `params` table."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  shardings = plan.tree_shardings(logical_axes(state), nnx.to_pure_dict(state), plan.params)
  dtype = jnp.dtype(cfg.compute_dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  params = jax.device_put(params, shardings)  # may move them: a data-parallel replica holds its own copy
  return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


class ModelRunner:
  """Holds the graph of the model, its parameters and the cache; runs prefill chunks and decode loops."""

  def __init__(self, cfg: ModelConfig, params: Any, *, plan: ShardingPlan, slots: int, max_len: int):
    self.cfg, self.plan, self.max_len = cfg, plan, max_len
    self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    self.params = serving_params(cfg, params, plan)
    shape = (cfg.n_layers, slots, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    self.cache = KVCache.zeros(*shape[:1], slots, max_len, *shape[3:], dtype=jnp.dtype(cfg.compute_dtype),
                               sharding=plan.sharding(CACHE_AXES, plan.activations, shape))
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("steps",))

  def _forward(self, params, cache: KVCache, tokens_BxT, positions_BxT, slot_ids_B, cache_len_B, write_pos_BxT,
               new_len_B):
    """The model over new tokens with the cache; returns the updated cache and logits [B, T, V]."""
    model = nnx.merge(self.graphdef, params)
    carry = model.embed_tokens(tokens_BxT, positions_BxT, plan=self.plan)
    carry["cache_lengths"] = cache_len_B
    carry, new_kv = model.forward_layers_cached(carry, cache.rows(slot_ids_B), plan=self.plan)
    cache = cache.write(_after(new_kv, carry["x"]), slot_ids_B, write_pos_BxT, new_len_B)
    return cache, carry["x"], model

  def _prefill_fn(self, params, cache, tokens_1xC, slot, start, n_valid, sampling):
    c = tokens_1xC.shape[1]
    positions = start + jnp.arange(c)[None]
    write_pos = jnp.where(jnp.arange(c)[None] < n_valid, positions, self.max_len)
    cache, x, model = self._forward(params, cache, tokens_1xC, positions, slot[None], start[None], write_pos,
                                    (start + n_valid)[None])
    last = jax.lax.dynamic_slice_in_dim(x, n_valid - 1, 1, axis=1)
    logits = model.head(last, plan=self.plan)[:, 0]
    return cache, sample(logits, *sampling)

  def _decode_fn(self, params, cache, tokens_S, active_S, sampling, *, steps):
    temperature, top_k, top_p, seeds, indices = sampling
    slots = tokens_S.shape[0]

    def body(i, state):
      cache, tokens, out_tokens, out_logprobs = state
      lengths = cache.lengths
      write_pos = jnp.where(active_S, lengths, self.max_len)[:, None]
      new_len = jnp.where(active_S, jnp.minimum(lengths + 1, self.max_len), lengths)
      cache, x, model = self._forward(params, cache, tokens[:, None], lengths[:, None], None, lengths, write_pos,
                                      new_len)
      logits = model.head(x, plan=self.plan)[:, 0]
      tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, indices + i)
      return cache, tokens, out_tokens.at[i].set(tokens), out_logprobs.at[i].set(logprobs)

    init = (cache, tokens_S, jnp.zeros((steps, slots), jnp.int32), jnp.zeros((steps, slots), jnp.float32))
    cache, _, out_tokens, out_logprobs = jax.lax.fori_loop(0, steps, body, init)
    return cache, out_tokens, out_logprobs

  def prefill(self, tokens: np.ndarray, bucket: int, slot: int, start: int, sampling: tuple) -> tuple:
    """Writes `tokens` (one request's next prompt chunk) into `slot` at positions start.. and returns
    (next token [1], its log-probability [1]) as device arrays sampled after the last one.
    `sampling`: (temperature, top_k, top_p, seed, index), each an array of one row."""
    padded = np.zeros((1, bucket), np.int32)
    padded[0, :len(tokens)] = tokens
    self.cache, (token, logprob) = self._prefill(self.params, self.cache, padded, np.int32(slot), np.int32(start),
                                                 np.int32(len(tokens)), _row_arrays(sampling))
    return token, logprob

  def decode(self, tokens_S: np.ndarray, active_S: np.ndarray, sampling: tuple, steps: int) -> tuple:
    """`steps` tokens for every slot: (tokens [steps, slots], log-probabilities [steps, slots]),
    device arrays. `sampling`: (temperature, top_k, top_p, seed, index of the first new token), [slots] each."""
    self.cache, tokens, logprobs = self._decode(self.params, self.cache, tokens_S.astype(np.int32), active_S,
                                                _row_arrays(sampling), steps=steps)
    return tokens, logprobs


def _after(new_kv: dict, x: jax.Array) -> dict:
  """`new_kv` made to depend on `x` (the last layer's output), adding an exact zero.

  The last layer's new keys and values do not depend on its attention, so with unrolled layers
  nothing orders that attention's read of the cache before the in-place write of the cache, and
  XLA then copies the whole cache twice per decode step (an `optimization_barrier` is expanded
  before copy insertion and does not help). The dependency orders the write after every read.
  """
  zero = jnp.nan_to_num(jnp.sum(x.astype(jnp.float32))) * 0.0
  return jax.tree.map(lambda a: a + zero.astype(a.dtype), new_kv)


def _row_arrays(sampling: tuple) -> tuple:
  temperature, top_k, top_p, seeds, indices = sampling
  return (np.asarray(temperature, np.float32), np.asarray(top_k, np.int32), np.asarray(top_p, np.float32),
          np.asarray(seeds, np.uint32), np.asarray(indices, np.int32))
