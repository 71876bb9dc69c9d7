"""The device side of the engine: the model's own pieces run over a KV cache, compiled once per shape.

Two compiled calls, both pure functions of (parameters, cache, small inputs) with the cache donated
so XLA updates it in place:

  prefill   the prompt chunks of a step, one row per request, [R, C] in one forward pass (R and C
            powers of two, so the number of compilations is bounded), each row written into its
            request's slot from its own position; returns the next token sampled after each row's
            last real token.
  decode    `steps` decode steps for every slot ([slots, 1] per step) in a `lax.fori_loop` on the
            device: one dispatch and one host transfer per `steps` tokens. Slots not marked active
            compute but write nothing (their cache position is `max_len`, which the scatter drops).
            The loop reads only the first `span` positions of every slot's cache (a static power of
            two above the longest active sequence): at 32-128 slots of a long context the cache, not
            the weights, is most of the bytes a step reads. Those positions are copied once per
            loop into a window that every step reads and writes, and the loop's new positions are
            copied back into the cache at its end: a slice of the positions axis read in every
            step would be a copy in every step.

Both are compiled per `greedy` (static): a step whose requests are all greedy compiles the argmax
alone, with no sort over the vocabulary and no conditional on a device value (which the GPU
runtime would evaluate by reading the predicate back to the host, stalling every decode step).

Each step runs `Transformer.embed_tokens`, `Transformer.forward_layers_cached` (the layer stack with
each layer's KV-cache slice as its layer input) and `Transformer.head`: the model's code, not a
copy of it.

Sharding: parameters by the plan's `params` table (Megatron column/row parallel over `tensor`), the
cache by `models.cache.CACHE_AXES` under the `activations` table (slots over the batch axes, kv
heads over `tensor`). XLA inserts the all-reduce after each row-parallel matmul, as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import ModelConfig
from models.attention import reads_cache_in_place, reads_pages_in_place
from models.cache import CACHE_AXES, KVCache, write_back
from models.paged_cache import PAGE_AXES, PagedKVCache
from models.fused import fuse_projections
from models.transformer import Transformer, abstract_params
from parallel.plan import ShardingPlan
from serving.sampling import sample

MIN_BUCKET = 16
MIN_SPAN = 16
# The cache holds at least this many slots, so a decode step multiplies at least two rows by each
# weight: with one row XLA:GPU rewrites the projections whose weights have fewer than ~10M
# elements (q, k, v, o at `1b`) as a multiply and a reduction that materialises x * w, 2-4x
# slower than the matrix product. A spare slot is never active: it costs its share of the
# attention over the cache span, not a second read of the weights.
MIN_DECODE_ROWS = 2
# Prefill runs its layers in a scan, one layer per iteration, whatever `model.scan_unroll` says
# (the decode loop keeps it): a chunk's products are matrix-matrix, which unrolled layers do not
# speed up, and a scanned stack compiles 2-3x faster (`1b` on the CPU: 2.5-2.8 s against 6.5-6.9 s
# per prefill shape). A server compiles one program per (rows, chunk length) it meets.
PREFILL_UNROLL = 1


def buckets(token_budget: int) -> tuple[int, ...]:
  """Prefill chunk lengths: powers of two from MIN_BUCKET up to the first >= token_budget."""
  out = [MIN_BUCKET]
  while out[-1] < token_budget:
    out.append(out[-1] * 2)
  return tuple(out)


def serving_params(cfg: ModelConfig, params: Any, plan: ShardingPlan, fused_projections: bool = True) -> Any:
  """The parameters in the compute dtype (decode reads every weight once per token: bf16 halves
  the bytes), with q/k/v and gate/up fused (`models.fused`) unless told not to, laid out by the
  plan's `params` table."""
  shardings = lambda fused: jax.tree.map(lambda a: a.sharding, abstract_params(cfg, plan, fused_projections=fused))
  dtype = jnp.dtype(cfg.compute_dtype)
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  params = jax.device_put(params, shardings(False))  # may move them: a data-parallel replica holds its own copy
  fuse = (lambda p: fuse_projections(cfg, p)) if fused_projections else (lambda p: p)
  return jax.jit(lambda p: jax.tree.map(cast, fuse(p)), out_shardings=shardings(fused_projections))(params)


class ModelRunner:
  """Holds the graph of the model, its parameters and the cache; runs prefill chunks and decode loops."""

  def __init__(self, cfg: ModelConfig, params: Any, *, plan: ShardingPlan, slots: int, max_len: int,
               fused_projections: bool = True, page_size: int = 0, pages: int = 0):
    """`params`: the model's (separate projections, as trained); `fused_projections`: serve them
    fused (`models.fused`; off only to measure the difference). `page_size` > 0: a paged cache
    (`models.paged_cache`) of `pages` pages, whose tables `assign_pages` fills."""
    if cfg.decode_attention == "pallas" and plan.mesh.size > 1:
      raise ValueError(f"model.decode_attention='pallas' runs on one device, but this engine's mesh has "
                       f"{plan.mesh.size} ({dict(plan.mesh.shape)}): the kernel is not partitioned; use 'auto' or 'xla'")
    if cfg.decode_split_k > 1 and plan.mesh.size > 1:
      raise ValueError(f"model.decode_split_k={cfg.decode_split_k} runs on one device, but this engine's mesh has "
                       f"{plan.mesh.size} ({dict(plan.mesh.shape)}): the split would cut sharded contractions; use 0 (auto) or 1")
    self.cfg, self.plan, self.max_len, self.slots = cfg, plan, max_len, slots
    slots = max(slots, MIN_DECODE_ROWS)
    model = lambda: Transformer(cfg, rngs=nnx.Rngs(0), fused_projections=fused_projections)
    self.graphdef, _ = nnx.split(nnx.eval_shape(model))
    self.params = serving_params(cfg, params, plan, fused_projections)
    dims = (cfg.n_layers, slots, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    if page_size:
      shape = (cfg.n_layers, pages, cfg.n_kv_heads, page_size, cfg.resolved_head_dim)
      self.cache = PagedKVCache.zeros(*dims, dtype=jnp.dtype(cfg.compute_dtype), page_size=page_size, pages=pages,
                                      sharding=plan.sharding(PAGE_AXES, plan.activations, shape))
    else:
      shape = (cfg.n_layers, slots, cfg.n_kv_heads, max_len, cfg.resolved_head_dim)
      self.cache = KVCache.zeros(*dims, dtype=jnp.dtype(cfg.compute_dtype),
                                 sharding=plan.sharding(CACHE_AXES, plan.activations, shape))
    self.reads_cache_in_place = reads_cache_in_place(cfg, plan)  # the decode kernel, which also writes
    # Decode steps read the paged cache's pages in place (the decode kernel), not gathered rows.
    self.reads_pages_in_place = bool(page_size) and reads_pages_in_place(cfg, plan, page_size)
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,), static_argnames=("greedy",))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,), static_argnames=("steps", "span", "greedy"))

  def forward(self, params, cache: KVCache, tokens_BxT, positions_BxT, slot_ids_B, cache_len_B, write_pos_BxT,
               new_len_B, window: KVCache | None = None, unroll: int | None = None):
    """The model over new tokens with the cache, or with `window` (`KVCache.window`) read and
    written in its place (the cache then unchanged: `models.cache.write_back`); returns the updated
    cache and window and the last hidden states [B, T, D]. `unroll`: layers per scan iteration
    (default: the config's)."""
    model = nnx.merge(self.graphdef, params)
    carry = model.embed_tokens(tokens_BxT, positions_BxT, plan=self.plan)
    carry["cache_lengths"] = cache_len_B
    # A decode step of every slot (no window) reads the pages in place.
    if self.reads_pages_in_place and window is None and slot_ids_B is None and tokens_BxT.shape[1] == 1:
      rows = cache.pages_in_place()
    else:
      rows = (cache if window is None else window).rows(slot_ids_B)
    if self.reads_cache_in_place and tokens_BxT.shape[1] == 1 and slot_ids_B is None:  # the kernel writes them
      carry["cache_write_positions"] = write_pos_BxT[:, 0]
    carry, new_kv = model.forward_layers_cached(carry, rows, plan=self.plan, unroll=unroll)
    if "written" in new_kv:  # written where they were read (the decode kernel): only the lengths are left
      update = lambda c: dataclasses.replace(c, k=new_kv["written"]["k"], v=new_kv["written"]["v"],
                                             lengths=new_len_B.astype(jnp.int32))
    else:
      new_kv = _after(new_kv, carry["x"])
      update = lambda c: c.write(new_kv, slot_ids_B, write_pos_BxT, new_len_B)
    if window is None:
      cache = update(cache)
    else:
      window = update(window)
    return cache, window, carry["x"], model

  def _prefill_fn(self, params, cache, tokens_RxC, slots_R, starts_R, n_valid_R, sampling, *, greedy):
    r, c = tokens_RxC.shape
    positions = starts_R[:, None] + jnp.arange(c)[None]
    write_pos = jnp.where(jnp.arange(c)[None] < n_valid_R[:, None], positions, self.max_len)
    cache, _, x, model = self.forward(params, cache, tokens_RxC, positions, slots_R, starts_R, write_pos,
                                       starts_R + n_valid_R, unroll=PREFILL_UNROLL)
    last = jnp.take_along_axis(x, jnp.maximum(n_valid_R - 1, 0)[:, None, None], axis=1)  # [R, 1, D]
    logits = model.head(last, plan=self.plan)[:, 0]
    return cache, sample(logits, *sampling, greedy=greedy)

  def _decode_fn(self, params, cache, tokens_S, active_S, sampling, *, steps, span, greedy):
    temperature, top_k, top_p, seeds, indices = sampling
    slots = tokens_S.shape[0]

    def body(i, state):
      cache, window, tokens, out_tokens, out_logprobs = state
      lengths = (cache if window is None else window).lengths
      write_pos = jnp.where(active_S, lengths, self.max_len)[:, None]
      new_len = jnp.where(active_S, jnp.minimum(lengths + 1, self.max_len), lengths)
      cache, window, x, model = self.forward(params, cache, tokens[:, None], lengths[:, None], None, lengths,
                                              write_pos, new_len, window)
      logits = model.head(x, plan=self.plan)[:, 0]
      tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, indices + i, greedy=greedy)
      return cache, window, tokens, out_tokens.at[i].set(tokens), out_logprobs.at[i].set(logprobs)

    # Positions [0, span) copied once for the whole loop (see KVCache.window); all of them, or pages
    # the decode kernel reads in place: none.
    window = cache.window(span) if span < self.max_len and not self.reads_pages_in_place else None
    init = (cache, window, tokens_S, jnp.zeros((steps, slots), jnp.int32), jnp.zeros((steps, slots), jnp.float32))
    cache, window_out, _, out_tokens, out_logprobs = jax.lax.fori_loop(0, steps, body, init)
    if window is not None:
      cache = write_back(cache, window_out, cache.lengths, active_S, steps)
    return cache, out_tokens[:, :self.slots], out_logprobs[:, :self.slots]  # the padding rows cut here, not by the host

  def assign_pages(self, slot: int, pages: list[int]) -> None:
    """The paged cache's table of `slot`: its pages in position order."""
    self.cache = self.cache.with_pages(slot, pages)

  def prefill(self, chunks: list[tuple[np.ndarray, int, int]], bucket: int, sampling: tuple) -> tuple:
    """Writes prompt chunks, (tokens, slot, first position) each, one per slot, into the cache in one
    forward pass of [R, bucket] tokens (R: the number of chunks rounded up to a power of two; padding
    rows write nothing) and returns (next token [R], its log-probability [R]) as device arrays, row i
    sampled after the last token of chunk i. `sampling`: (temperature, top_k, top_p, seed, index),
    one row per chunk."""
    n = len(chunks)
    rows = 1 << (n - 1).bit_length()
    tokens = np.zeros((rows, bucket), np.int32)
    slots = np.full(rows, self.cache.slots, np.int32)  # out of range: the padding rows write nothing
    starts, n_valid = np.zeros(rows, np.int32), np.ones(rows, np.int32)
    for i, (chunk, slot, start) in enumerate(chunks):
      tokens[i, :len(chunk)] = chunk
      slots[i], starts[i], n_valid[i] = slot, start, len(chunk)
    sampling = _row_arrays(tuple(np.pad(np.asarray(a), (0, rows - n), mode="edge") for a in sampling))  # valid rows
    self.cache, (token, logprob) = self._prefill(self.params, self.cache, tokens, slots, starts, n_valid, sampling,
                                                 greedy=not np.any(sampling[0] > 0))
    return token, logprob

  def decode(self, tokens_S: np.ndarray, active_S: np.ndarray, sampling: tuple, steps: int,
             span: int | None = None) -> tuple:
    """`steps` tokens for every slot: (tokens [steps, slots], log-probabilities [steps, slots]),
    device arrays. `sampling`: (temperature, top_k, top_p, seed, index of the first new token), [slots] each.
    `span`: the caller's bound on the cache positions the loop reads and writes (every active
    slot's length + steps must be <= span), rounded up by `span_bucket`; None reads all of max_len."""
    args, static = self.decode_args(tokens_S, active_S, sampling, steps, span)
    self.cache, tokens, logprobs = self._decode(self.params, self.cache, *args, **static)
    return tokens, logprobs

  def warm_up(self, steps: int) -> int:
    """Compiles the decode loop of `steps` steps for every span bucket, greedy and sampled, and runs
    each once with no active slot (nothing is written), so no request waits for a compilation when
    its sequence grows into the next span. Returns the number of programs."""
    tokens, inactive = np.zeros(self.slots, np.int32), np.zeros(self.slots, bool)
    rows = (np.zeros(self.slots), np.zeros(self.slots), np.ones(self.slots), np.zeros(self.slots), np.zeros(self.slots))
    spans = sorted({span_bucket(1 << i, self.max_len) for i in range(self.max_len.bit_length() + 1)})
    for span in spans:
      for greedy in (True, False):
        args, static = self.decode_args(tokens, inactive, rows, steps, span)
        self.cache, _, _ = self._decode(self.params, self.cache, *args, **{**static, "greedy": greedy})
    return 2 * len(spans)

  def warm_up_prefill(self, chunk_lengths: tuple[int, ...], token_budget: int) -> int:
    """Compiles the prefill of every shape a step can ask for, greedy and sampled, and runs each
    once with padding rows only (nothing is written); returns the number of programs. A step's
    chunks fit the token budget and its longest one sets the chunk length C (a bucket: longer than
    the bucket below), so with C there are at most 1 + budget - (that length) chunks, and the rows
    are their number rounded up to a power of two."""
    shapes = []
    for i, c in enumerate(chunk_lengths):
      longest = 1 if i == 0 else chunk_lengths[i - 1] + 1
      chunks = min(self.slots, 1 + max(token_budget - longest, 0))
      shapes += [(1 << j, c) for j in range((chunks - 1).bit_length() + 1)]
    for r, c in shapes:
      rows = _row_arrays((np.ones(r), np.zeros(r), np.ones(r), np.zeros(r), np.zeros(r)))
      for greedy in (True, False):
        self.cache, _ = self._prefill(self.params, self.cache, np.zeros((r, c), np.int32),
                                      np.full(r, self.cache.slots, np.int32), np.zeros(r, np.int32),
                                      np.ones(r, np.int32), rows, greedy=greedy)
    return 2 * len(shapes)

  def compiled_decode(self, tokens_S: np.ndarray, active_S: np.ndarray, sampling: tuple, steps: int,
                      span: int | None = None):
    """The compiled program `decode` would run for these arguments (for reading its HLO)."""
    args, static = self.decode_args(tokens_S, active_S, sampling, steps, span)
    return self._decode.lower(self.params, self.cache, *args, **static).compile()

  def decode_args(self, tokens_S, active_S, sampling, steps, span) -> tuple[tuple, dict]:
    """The device arguments of a decode call (padded to the cache's slots) and its static ones."""
    span = self.max_len if span is None else span_bucket(span, self.max_len)
    sampling = _row_arrays(sampling)
    greedy = not np.any(sampling[0][active_S] > 0)
    spare = self.cache.slots - len(tokens_S)  # spare slots: inactive, with the last slot's settings
    pad = lambda a: np.pad(np.asarray(a), (0, spare), mode="edge")
    active = np.pad(np.asarray(active_S, bool), (0, spare))
    args = (pad(tokens_S).astype(np.int32), active, tuple(map(pad, sampling)))
    return args, {"steps": steps, "span": span, "greedy": greedy}


def span_bucket(need: int, max_len: int) -> int:
  """The cache positions a decode loop reads: `need` rounded up to a power of two (at least
  MIN_SPAN, at most max_len), so a loop reads about what its longest sequence holds while the
  number of compilations stays logarithmic in max_len."""
  return min(max_len, max(MIN_SPAN, 1 << (max(need, 1) - 1).bit_length()))


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
