"""How a sequence is laid out over the `seq` devices, for causal load balance.

With causal attention, a device holding the end of the sequence has far more work than one
holding its start. A layout permutes the tokens once, at the input, so that each device's
contiguous block of the permuted sequence holds an even share of the work:

  contiguous  device i holds tokens [i*L/n, (i+1)*L/n)                  (no balance)
  zigzag      2n chunks of L/(2n); device i holds chunks i and 2n-1-i  (Ring Flash Attention's
              zigzag; Llama 3's context parallelism uses the same split)
  striped     device i holds tokens i, i+n, i+2n, ...                  (Striped Attention,
              Brandon et al. 2023)

Positions, segment ids, targets and the loss mask travel with the tokens (`permute_batch`), so
RoPE, document masking and the summed loss are unchanged. The attention ops need each local
token's index in the original sequence to apply the causal mask: `permutation` gives them, and
each device receives its slice of it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str, length: int, n: int) -> None:
  """Raises ValueError unless a sequence of `length` splits over `n` devices in `layout`."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r}: choose one of {LAYOUTS}")
  parts = 2 * n if layout == "zigzag" else n
  if length % parts:
    raise ValueError(f"a sequence of {length} tokens does not split into {parts} equal parts "
                     f"({layout} layout over {n} devices)")


def device_tokens(layout: str, length: int, n: int) -> np.ndarray:
  """[n, length // n]: row i lists, in local order, the original indices of device i's tokens."""
  check_layout(layout, length, n)
  if layout == "contiguous":
    return np.arange(length).reshape(n, length // n)
  if layout == "striped":
    return np.arange(length).reshape(length // n, n).T.copy()
  chunk = length // (2 * n)
  chunks = np.arange(length).reshape(2 * n, chunk)
  return np.stack([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def permutation(layout: str, length: int, n: int) -> np.ndarray:
  """[length]: permuted[j] = original[perm[j]]; device i's block of the permuted sequence is its tokens."""
  return device_tokens(layout, length, n).reshape(-1)


def permute_batch(batch: dict, layout: str, n: int) -> dict:
  """Reorders every [B, L] array of a batch along L into `layout` over `n` devices."""
  if layout == "contiguous" or n == 1:
    return batch
  perm = permutation(layout, next(iter(batch.values())).shape[1], n)
  return {k: jnp.take(v, perm, axis=1) for k, v in batch.items()}
