"""The dense recurrent reference of decayed linear attention: one token at a time, the state
reset at each document's first token. Written from the recurrence alone, not from the chunked op."""

import jax
import jax.numpy as jnp


def recurrent_linear_attention(q, k, v, segment_ids, decay):
  """float32 [B, L, H, Dv]: S_t = a_t S_{t-1} + k_t^T v_t, o_t = (q_t / sqrt(D)) S_t, with
  a_t = decay if token t continues token t-1's document, else 0."""
  b, l, h, d = q.shape
  kh = k.shape[2]
  q = q.astype(jnp.float32).reshape(b, l, kh, h // kh, d) * d ** -0.5
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  cont = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)
  a = cont[:, :, None] * jnp.asarray(decay, jnp.float32)[None, None]  # [B, L, K]

  def step(state, x):
    qt, kt, vt, at = x
    state = at[:, :, None, None] * state + jnp.einsum("bkd,bke->bkde", kt, vt)
    return state, jnp.einsum("bkgd,bkde->bkge", qt, state)

  xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), a.swapaxes(0, 1))
  _, out = jax.lax.scan(step, jnp.zeros((b, kh, d, v.shape[-1]), jnp.float32), xs)
  return out.swapaxes(0, 1).reshape(b, l, h, -1)
