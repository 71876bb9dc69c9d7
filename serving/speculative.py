"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one
forward pass, and the standard rejection rule keeps the output distributed exactly as the target's
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

One round, for every active slot at once (`SpeculativeRunner.rounds` runs up to `rounds` of them
in one compiled call, a loop on the device, so that the host pays one dispatch and one transfer
per call, as the plain decode loop does per `steps` tokens; a call that may finish every request
stops once it has, see the end of this docstring):

  1. the draft decodes k steps from the slot's last token: step i reads position L + i and
     proposes d_{i+1} from its filtered distribution q_{i+1} (the request's temperature, top-k and
     top-p; the argmax at temperature 0). Its steps are unrolled (k is small and static).
     d_k's keys and values are not computed: where the round accepts all k, the next round's
     first step runs [d_k, its last token] as one two-token chunk and writes both (a round trip
     through the draft costs about the same for two tokens as for one), and a call's last round
     is followed by one draft step that writes the missing position alone, so that between calls
     the draft's cache holds every position the target's holds. (A draft that decoded k + 1 steps
     per round, the last only to write d_k, spent a whole draft step per round on it.)
  2. the target runs [last token, d_1 .. d_k] at positions L .. L + k as one chunk over its cache
     (as a prompt chunk is) and gives k + 1 filtered distributions p_1 .. p_{k+1}.
  3. proposal i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the
     first rejection; at the first rejected position n + 1 one token is drawn from the residual
     max(0, p - q) renormalised, or from p_{k+1} when all k were accepted. A round emits n + 1
     tokens (1 to k + 1), and both caches keep L + n + 1 positions: what was written past them is
     ignored (the lengths say which positions hold keys) and overwritten by the next round.

At temperature 0 both distributions are one-hot, the rule accepts exactly the proposals that equal
the target's argmax and the residual is the target's argmax: greedy output is plain greedy decoding's.
The program compiled for calls where every slot is greedy computes exactly that and nothing else
(argmaxes, no distributions and no random draws: fewer kernels per round, which at batch 1 are
what a round's time is mostly made of).
With sampling the output follows the target's distribution, but it is not the token-for-token
text plain decoding draws for the same seed (other draws are made). The draws of a request come from
its seed and the index of the output token (`serving.sampling.row_keys`), folded with one number
per purpose (draft draw, acceptance, residual), so a seeded request repeats its text.

Log-probabilities are the target's (log_softmax of its raw logits) at the emitted tokens, as in
plain decoding. The round reads the whole cache (no span window).

Between the rounds of one call the device carries each slot's last token, the index of its next
output token and how many tokens it may still emit (`remaining`: its max_tokens left). A round
emits 1 to k + 1 tokens, so how many rounds a request needs is not known when the call starts.
Two loops, compiled apart (static `stop_early`), picked per call by the host:
  - when some active slot has more tokens left than the call's rounds can emit (`rounds` x (k + 1)),
    no request can end by its length in this call: a `lax.fori_loop` runs every round. Its trip
    count is static, so the GPU runtime runs it without reading anything back to the host.
  - otherwise a `lax.while_loop` runs until every active slot's `remaining` is spent (or `rounds`
    rounds have run); the rounds it did not run emit nothing (their counts are 0). Its predicate
    is a device value that the GPU runtime reads back to the host once per round (one profile on
    an H100, `1b` with a 2-layer draft at k = 3, showed 0.31 ms between rounds, a later one
    0.09 ms; BENCHMARKS.md), a cost worth paying only where rounds would otherwise run for nothing
    after the last request's end: up to `rounds` - 1 of them, so at batch 1, 8 rounds per call and
    about 2.5 tokens a round, a 128-token request ran 56 rounds for the 50 it needed. On that
    bench: 1.36x plain decoding with the static loop in every call, 1.57x with the stopping loop
    in every call, 1.79x with the loop picked per call (1.83x at 16 rounds per call).
A request may also end on a stop token, which the device does not look for: the rounds after it
still run for its slot and the host drops what they emit, as it drops the plain loop's tokens past
a request's end; their cache writes past max_len (or past a paged slot's pages) are dropped and the
next request in the slot starts from its own prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from serving.runner import ModelRunner
from serving.sampling import filter_logits, row_keys

DRAFT, ACCEPT, RESIDUAL = 1, 2, 3  # what a random key is for, folded into the token's key


def filtered_probs(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                   top_p_B: jax.Array) -> jax.Array:
  """Each row's sampling distribution float32 [B, V]: softmax of the filtered logits
  (`serving.sampling.filter_logits`), one-hot at the argmax where the temperature is 0."""
  logits = logits_BxV.astype(jnp.float32)
  onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  probs = jax.nn.softmax(jax.vmap(filter_logits)(logits, temperature_B, top_k_B, top_p_B), axis=-1)
  return jnp.where((temperature_B > 0)[:, None], probs, onehot)


def accept(p_BxK1xV: jax.Array, q_BxKxV: jax.Array, proposals_BxK: jax.Array, uniforms_BxK: jax.Array,
           residual_keys_BxK1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The rejection rule. p: the target's distributions at the k + 1 positions, q: the draft's at
  the k proposals, `uniforms` in [0, 1), `residual_keys` one key per position (the residual is
  drawn at the first rejected one). Returns (accepted proposals n in [0, k] [B], the token drawn
  after them [B])."""
  b, k = proposals_BxK.shape
  take = lambda dist, idx: jnp.take_along_axis(dist, idx[..., None], axis=-1)[..., 0]
  p_x, q_x = take(p_BxK1xV[:, :k], proposals_BxK), take(q_BxKxV, proposals_BxK)
  ok = uniforms_BxK * q_x < p_x  # u < p / q, with q > 0 for a token the draft drew
  n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
  rows = jnp.arange(b)
  q_pad = jnp.concatenate([q_BxKxV, jnp.zeros_like(q_BxKxV[:, :1])], axis=1)  # at n = k: p_{k+1} itself
  residual = jnp.maximum(p_BxK1xV[rows, n] - q_pad[rows, n], 0.0)
  residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_BxK1xV[rows, n])  # rounding guard
  token = jax.vmap(jax.random.categorical)(residual_keys_BxK1[rows, n], jnp.log(residual)).astype(jnp.int32)
  return n, token


def _keys(seeds_B: jax.Array, indices_BxN: jax.Array, purpose: int) -> jax.Array:
  """Keys [B, N]: the key of output token `indices` of each row (`row_keys`), folded with `purpose`."""
  b, n = indices_BxN.shape
  keys = row_keys(jnp.repeat(seeds_B, n), indices_BxN.reshape(-1))
  return jax.vmap(lambda key: jax.random.fold_in(key, purpose))(keys).reshape(b, n)


class SpeculativeRunner:
  """A target and a draft `ModelRunner` over the same slots; `round` runs one speculative round."""

  def __init__(self, target: ModelRunner, draft: ModelRunner, tokens: int):
    if tokens < 1:
      raise ValueError(f"speculative_tokens={tokens} must be >= 1")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
      raise ValueError(f"the draft model's vocab_size={draft.cfg.vocab_size} differs from the target's "
                       f"{target.cfg.vocab_size}: both must share one tokenizer")
    if (draft.slots, draft.max_len) != (target.slots, target.max_len):
      raise ValueError(f"the draft's slots and max_len {(draft.slots, draft.max_len)} must be the target's "
                       f"{(target.slots, target.max_len)}")
    self.target, self.draft, self.k = target, draft, tokens
    self._rounds = jax.jit(self._rounds_fn, donate_argnums=(1, 3), static_argnames=("rounds", "greedy", "stop_early"))

  def rounds(self, tokens_S: np.ndarray, active_S: np.ndarray, sampling: tuple, rounds: int = 1,
             greedy: bool | None = None, remaining_S: np.ndarray | None = None,
             stop_early: bool | None = None) -> tuple:
    """Up to `rounds` rounds for every slot: (tokens [rounds, k + 1, slots], log-probabilities
    [rounds, k + 1, slots], tokens emitted per round and slot [rounds, slots]: 1 + accepted
    proposals, 0 for a round that did not run), device arrays. `sampling` as for
    `ModelRunner.decode` (the index is that of the slot's next output token); `greedy` (default:
    whether every active slot is) picks the compiled program; `remaining_S`: how many tokens each
    slot may still emit (default: no limit, every round runs); where every active slot's fits in
    the call's rounds, the call stops once none has any left (module docstring; `stop_early`
    picks that program whatever the slots need)."""
    t, d = self.target, self.draft
    args, static = t.decode_args(tokens_S, active_S, sampling, 1, None)
    greedy = static["greedy"] if greedy is None else greedy
    remaining = np.zeros(len(args[0]), np.int32)  # padded as decode_args pads (spare rows are inactive)
    remaining[:len(tokens_S)] = np.iinfo(np.int32).max if remaining_S is None else remaining_S
    if stop_early is None:
      stop_early = bool(np.all(remaining[args[1]] <= rounds * (self.k + 1)))
    t.cache, d.cache, out = self._rounds(t.params, t.cache, d.params, d.cache, *args, remaining, rounds=rounds,
                                         greedy=greedy, stop_early=stop_early)
    return out

  def _rounds_fn(self, tparams, tcache, dparams, dcache, tokens_S, active_S, sampling, remaining_S, *, rounds, greedy,
                 stop_early):
    temperature, top_k, top_p, seeds, indices = sampling
    k, slots = self.k, tokens_S.shape[0]

    def more(state):  # a round left to run, and an active slot with tokens left to emit
      r, remaining = state[0], state[6]
      return (r < rounds) & jnp.any(active_S & (remaining > 0))

    def body(state):
      r, tcache, dcache, last, lacks, index, remaining, out_tokens, out_logprobs, out_counts = state
      tcache, dcache, lacks, (emitted, logprobs, n1) = self._round_fn(
          tparams, tcache, dparams, dcache, last, lacks, active_S, (temperature, top_k, top_p, seeds, index),
          greedy=greedy)
      # Each active slot's last emitted token, next output index and tokens left; inactive slots keep theirs.
      last = jnp.where(active_S, jnp.take_along_axis(emitted, (n1 - 1)[None], axis=0)[0], last)
      index = index + jnp.where(active_S, n1, 0)
      remaining = remaining - jnp.where(active_S, n1, 0)
      return (r + 1, tcache, dcache, last, lacks, index, remaining, out_tokens.at[r].set(emitted),
              out_logprobs.at[r].set(logprobs), out_counts.at[r].set(n1))

    no_lack = (jnp.zeros(slots, bool), jnp.zeros(slots, jnp.int32))
    init = (jnp.int32(0), tcache, dcache, tokens_S, no_lack, indices, remaining_S,
            jnp.zeros((rounds, k + 1, slots), jnp.int32), jnp.zeros((rounds, k + 1, slots), jnp.float32),
            jnp.zeros((rounds, slots), jnp.int32))
    if stop_early:
      state = jax.lax.while_loop(more, body, init)
    else:
      state = jax.lax.fori_loop(0, rounds, lambda r, state: body(state), init)
    _, tcache, dcache, _, lacks, _, _, out_tokens, out_logprobs, out_counts = state
    n = self.target.slots  # the padding rows cut here, not by the host
    return tcache, self._catch_up(dparams, dcache, lacks), (out_tokens[..., :n], out_logprobs[..., :n], out_counts[:, :n])

  def _catch_up(self, dparams, dcache, lacks):
    """The draft's keys and values of the slots' second-to-last position, where a round accepted every
    proposal (`lacks`: (which slots, the token there)): one draft step that writes that position
    alone, so that a call leaves the draft's cache holding every position the target's holds."""
    lack, token = lacks
    lengths = dcache.lengths
    pos = jnp.maximum(lengths - 1, 0)
    write = jnp.where(lack, pos, self.draft.max_len)[:, None]
    dcache, _, _, _ = self.draft.forward(dparams, dcache, token[:, None], pos[:, None], None, pos, write, lengths)
    return dcache

  def _draft_fn(self, dparams, dcache, tokens_S, lacks, active_S, sampling, *, greedy):
    """The draft's k proposals [S, k] and their distributions [S, k, V] (module docstring, step 1).

    Its first step also writes the position before the slot's last token where the previous round
    accepted every proposal (`lacks`): the k-th proposal's keys were never computed (that round's
    draft stopped at it). That step runs two tokens per row: [the k-th proposal, the last token] at
    the two positions where the draft lacks one, else [the last token, a copy of it] with the copy
    written nowhere and read by nothing (a chunk's causal mask goes by the order of its tokens)."""
    temperature, top_k, top_p, seeds, indices = sampling
    d, k, max_len = self.draft, self.k, self.draft.max_len
    lengths = dcache.lengths
    lack, before = lacks
    drop = jnp.full_like(lengths, max_len)

    def step(dcache, i, token):
      pos = lengths + i
      new_len = jnp.where(active_S, jnp.minimum(pos + 1, max_len), lengths)
      if i == 0:
        chunk = jnp.stack([jnp.where(lack, before, token), token], axis=1)
        positions = jnp.stack([jnp.where(lack, pos - 1, pos), jnp.where(lack, pos, pos + 1)], axis=1)
        write = jnp.stack([jnp.where(active_S & lack, pos - 1, jnp.where(active_S, pos, max_len)),
                           jnp.where(active_S & lack, pos, drop)], axis=1)
        dcache, _, x, model = d.forward(dparams, dcache, chunk, positions, None, jnp.where(lack, pos - 1, pos),
                                        write, new_len)
        x = jnp.take_along_axis(x, lack.astype(jnp.int32)[:, None, None], axis=1)  # the last token's state
      else:
        write = jnp.where(active_S, pos, max_len)[:, None]
        dcache, _, x, model = d.forward(dparams, dcache, token[:, None], pos[:, None], None, pos, write, new_len)
      logits = model.head(x, plan=d.plan)[:, 0]
      if greedy:  # every row's distribution is one-hot at its argmax: no distribution is kept
        return dcache, jnp.argmax(logits, axis=-1).astype(jnp.int32), None
      dist = filtered_probs(logits, temperature, top_k, top_p)
      keys = _keys(seeds, (indices + i)[:, None], DRAFT)[:, 0]
      return dcache, jax.vmap(jax.random.categorical)(keys, jnp.log(dist)).astype(jnp.int32), dist

    proposals, q, token = [], [], tokens_S
    for i in range(k):  # k is small and static: unrolled, the first step has its own shape
      dcache, token, dist = step(dcache, i, token)
      proposals.append(token)
      q.append(dist)
    return dcache, jnp.stack(proposals, axis=1), None if greedy else jnp.stack(q, axis=1)

  def _round_fn(self, tparams, tcache, dparams, dcache, tokens_S, lacks, active_S, sampling, *, greedy):
    """One round (module docstring): the caches, which slots' draft lacks its second-to-last position
    (and the token there), and (tokens [k + 1, S], log-probabilities [k + 1, S], tokens emitted [S])."""
    temperature, top_k, top_p, seeds, indices = sampling
    t, k = self.target, self.k
    max_len = t.max_len
    lengths = tcache.lengths
    dcache, proposals, q = self._draft_fn(dparams, dcache, tokens_S, lacks, active_S, sampling, greedy=greedy)

    seq = jnp.concatenate([tokens_S[:, None], proposals], axis=1)  # [S, k + 1]
    pos = lengths[:, None] + jnp.arange(k + 1)[None]
    write = jnp.where(active_S[:, None], pos, max_len)
    tcache, _, x, model = t.forward(tparams, tcache, seq, pos, None, lengths, write,
                                    jnp.where(active_S, jnp.minimum(lengths + k + 1, max_len), lengths))
    logits = model.head(x, plan=t.plan).astype(jnp.float32)  # [S, k + 1, V]
    if greedy:  # the rule with one-hot p and q: the proposals that equal the target's argmax, then its argmax
      best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S, k + 1]
      n = jnp.sum(jnp.cumprod(proposals == best[:, :k], axis=1), axis=1).astype(jnp.int32)
      last = jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    else:
      p = jax.vmap(lambda l: filtered_probs(l, temperature, top_k, top_p), in_axes=1, out_axes=1)(logits)
      out_idx = indices[:, None] + jnp.arange(k + 1)[None]  # output index of each position's token
      uniforms = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key)))(_keys(seeds, out_idx[:, :k], ACCEPT))
      n, last = accept(p, q, proposals, uniforms, _keys(seeds, out_idx, RESIDUAL))

    j = jnp.arange(k + 1)[None]
    emitted = jnp.where(j < n[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), jnp.where(j == n[:, None], last[:, None], 0))
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), emitted[..., None], axis=-1)[..., 0]
    kept = jnp.where(active_S, jnp.minimum(lengths + n + 1, max_len), lengths)
    tcache, dcache = dataclasses.replace(tcache, lengths=kept), dataclasses.replace(dcache, lengths=kept)
    # All k accepted: the draft never wrote the k-th proposal, at the new second-to-last position.
    lacks = (active_S & (n == k), proposals[:, k - 1])
    return tcache, dcache, lacks, (emitted.T, logprobs.T, n + 1)

  def warm_up(self, rounds: int = 1) -> int:
    """Compiles the call of `rounds` rounds, greedy and sampled, each with both loops, running each
    with no active slot; returns 4."""
    slots = self.target.slots
    rows = (np.zeros(slots), np.zeros(slots), np.ones(slots), np.zeros(slots), np.zeros(slots))
    for greedy in (True, False):
      for stop_early in (True, False):
        self.rounds(np.zeros(slots, np.int32), np.zeros(slots, bool), rows, rounds, greedy=greedy,
                    stop_early=stop_early)
    return 4
