"""Next-token sampling on the device, one set of parameters per row: greedy, temperature, top-k,
top-p (nucleus, Holtzman et al. 2020), a per-request seed, and log-probabilities.

Order (as vLLM and `transformers` apply them): logits / temperature, then top-k, then top-p over
the probabilities that remain; then a categorical draw. Temperature 0 is greedy (argmax).

The random key of a row is `fold_in(key(seed), index)`, `index` being the position of the token in
the request's output: a request's tokens depend on its seed and its own logits only, never on which
other requests share the batch or on how many decode steps run per dispatch.

Log-probabilities are those of the model: `log_softmax` of the raw logits (before temperature and
filtering), at the chosen token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_V: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """One row's logits / temperature with everything outside top-k and top-p set to -inf [V].

  top_k <= 0 and top_p >= 1 turn those filters off. Ties at the top-k boundary keep the lower token
  ids (a stable sort). Top-p keeps the smallest prefix of tokens (most probable first) whose
  probability reaches top_p, and always the most probable token.
  """
  scaled = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, stable=True)
  sorted_ = scaled[order]
  rank = jnp.arange(scaled.shape[0])
  keep = (top_k <= 0) | (rank < top_k)
  probs = jax.nn.softmax(jnp.where(keep, sorted_, -jnp.inf))
  before = jnp.cumsum(probs) - probs  # probability of the more probable tokens
  keep &= (top_p >= 1.0) | (before < top_p)
  keep_vocab = jnp.zeros_like(keep).at[order].set(keep)
  return jnp.where(keep_vocab, scaled, -jnp.inf)


def row_keys(seeds_B: jax.Array, indices_B: jax.Array) -> jax.Array:
  """The key of each row's draw: fold_in(key(seed), index of the token in the request's output)."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, indices_B)


def sample(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
           seeds_B: jax.Array, indices_B: jax.Array, *, greedy: bool = False) -> tuple[jax.Array, jax.Array]:
  """Next tokens int32 [B] and their log-probabilities float32 [B] under the model.

  `greedy` (static; the caller knows every row has temperature 0) compiles the argmax alone: no sort
  over the vocabulary, no random draw, and no `lax.cond` on the device (a conditional on a device
  value makes the GPU runtime read the predicate back to the host, stalling every decode step).
  Otherwise rows with temperature 0 still take the argmax and the others draw.
  """
  logits = logits_BxV.astype(jnp.float32)
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if greedy:  # the chosen logit is the maximum: log p = -log(sum(exp(logits - max))), no gather
    top = jnp.max(logits, axis=-1, keepdims=True)
    return tokens, -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  filtered = jax.vmap(filter_logits)(logits, temperature_B, top_k_B, top_p_B)
  keys = row_keys(seeds_B, indices_B)
  drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
  tokens = jnp.where(temperature_B > 0, drawn, tokens)
  chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
  return tokens, logprobs
