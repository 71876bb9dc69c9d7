"""What cuDNN's packed-segment ("THD") attention does through JAX's internal primitives, on one GPU:
the layout of its statistics, what it leaves in rows and keys outside every segment, whether its
backward is right when a segment's key offset differs from its query offset, and what unused
segment slots cost. `parallel/attention/documents.py` and `cudnn_blocks.py` rest on these facts
(packed calls only with equal query and key offsets; slots bounded).

Three checks against float32 attention with the same mask (relative errors on covered rows and
keys; stats layouts: A per segment from its start, B per segment by absolute row, C per row),
then forward+backward times of a 16K-token causal block with 1 or 16 documents for several slot
counts M, beside one plain causal call and the 16 documents as 16 batch rows. JSON to
$OUT/probe.json (or /tmp).

  python bench/cudnn_segments_probe.py
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as fa

F32 = jnp.float32
OUT = os.environ.get("OUT", "/tmp")
res = {}


def call_fwd(q, k, v, qlen, klen, qoff, koff, causal, scale):
  unused = jnp.zeros(0, q.dtype)
  mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
  return fa._dot_product_attention_fwd_p_wrapper.bind(
      q, k, v, unused, qlen, klen, qoff, koff, unused, unused, scale=scale, seed=0, dropout_rate=0.0,
      variadic_args=(False, False), mask_type=mask, layout=fa.AttentionLayout.BTNH.value,
      sliding_window_length=None, is_training=True)


def call_bwd(q, k, v, qlen, klen, qoff, koff, causal, scale, stats, o, do):
  unused = jnp.zeros(0, q.dtype)
  mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
  return fa._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, unused, qlen, klen, qoff, koff, unused, unused, stats, o, do, scale=scale, seed=0,
      dropout_rate=0.0, variadic_args=(False, False), mask_type=mask, layout=fa.AttentionLayout.BTNH.value,
      sliding_window_length=None)


def ref_attn(q, k, v, mask, scale):
  b, lq, h, d = q.shape
  kh = k.shape[2]
  qg = q.astype(F32).reshape(b, lq, kh, h // kh, d)
  s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(F32)) * scale
  s = jnp.where(mask[:, None, None], s, -1e30)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  o = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(F32)).reshape(b, lq, h, d)
  return o, lse.transpose(0, 3, 1, 2).reshape(b, lq, h)


def mask_from(segs_q, segs_k, causal, lq, lk):
  """segs: list per batch of (q_off, q_len, k_off, k_len)."""
  m = np.zeros((len(segs_q), lq, lk), bool)
  for b, segs in enumerate(segs_q):
    for (qo, ql, ko, kl) in segs:
      for i in range(ql):
        for j in range(kl):
          if not causal or j <= i:
            m[b, qo + i, ko + j] = True
  return m


def arrays(segs, M):
  B = len(segs)
  qlen = np.zeros((B, M), np.int32); klen = np.zeros((B, M), np.int32)
  qoff = np.full((B, M + 1), -1, np.int32); koff = np.full((B, M + 1), -1, np.int32)
  for b, ss in enumerate(segs):
    for m in range(M):
      if m < len(ss):
        qo, ql, ko, kl = ss[m]
      else:
        qo, ql, ko, kl = 0, 0, 0, 0
      qlen[b, m], klen[b, m], qoff[b, m], koff[b, m] = ql, kl, qo, ko
  return [jnp.asarray(x) for x in (qlen, klen, qoff, koff)]


def check(name, segs, causal, lq, lk, M, H=4, K=2, D=64):
  key = jax.random.PRNGKey(0)
  kq, kk, kv, kd = jax.random.split(key, 4)
  B = len(segs)
  q = jax.random.normal(kq, (B, lq, H, D), jnp.bfloat16)
  k = jax.random.normal(kk, (B, lk, K, D), jnp.bfloat16)
  v = jax.random.normal(kv, (B, lk, K, D), jnp.bfloat16)
  do = jax.random.normal(kd, (B, lq, H, D), jnp.bfloat16)
  scale = D ** -0.5
  mask = jnp.asarray(mask_from(segs, segs, causal, lq, lk))
  covered = np.asarray(mask).any(-1)  # [B, lq]
  ro, rlse = ref_attn(q, k, v, mask, scale)
  qlen, klen, qoff, koff = arrays(segs, M)
  o, stats = jax.jit(call_fwd, static_argnums=(7, 8))(q, k, v, qlen, klen, qoff, koff, causal, scale)
  r = {"stats_shape": list(stats.shape), "o_shape": list(o.shape)}
  o32 = np.asarray(o.astype(F32)); ro = np.asarray(ro); rlse = np.asarray(rlse)
  cov = covered[..., None, None]
  r["o_err_covered"] = float(np.max(np.abs(np.where(cov, o32 - ro, 0))))
  r["o_uncovered_absmax"] = float(np.max(np.abs(np.where(cov, 0, o32)))) if (~covered).any() else None
  r["o_uncovered_nan"] = bool(np.isnan(np.where(cov, 0, o32)).any())
  st = np.asarray(stats).reshape(B, M, H, lq)
  # Hypothesis A: per segment, relative t; B: per segment, absolute row; C: [B, H, lq] row-aligned in seg 0 slot
  hyp = {}
  for hname in ("A", "B", "C"):
    err = 0.0
    for b, ss in enumerate(segs):
      for m, (qo, ql, ko, kl) in enumerate(ss):
        if kl == 0:
          continue
        rows = np.arange(qo, qo + ql)
        if hname == "A":
          got = st[b, m][:, rows - qo]
        elif hname == "B":
          got = st[b, m][:, rows]
        else:
          got = np.asarray(stats)[b][:, rows] if stats.shape[0] == B else st[b, 0][:, rows]
        err = max(err, float(np.max(np.abs(got.T - rlse[b, rows]))))
    hyp[hname] = err
  r["stats_err"] = hyp
  best = min(hyp, key=hyp.get)
  r["best"] = best

  # backward with stats as cuDNN gave them (its own layout), against autodiff of the reference
  def ref_loss(q, k, v):
    return ref_attn(q, k, v, mask, scale)[0]
  _, vjp = jax.vjp(ref_loss, q.astype(F32), k.astype(F32), v.astype(F32))
  rdq, rdk, rdv = vjp(do.astype(F32))
  dq, dk, dv = jax.jit(call_bwd, static_argnums=(7, 8))(q, k, v, qlen, klen, qoff, koff, causal, scale, stats, o, do)
  kcov = np.asarray(mask).any(1)[..., None, None]
  for nm, got, want, c in (("dq", dq, rdq, cov), ("dk", dk, rdk, kcov), ("dv", dv, rdv, kcov)):
    got = np.asarray(got.astype(F32)); want = np.asarray(want)
    scale_ = np.max(np.abs(want)) + 1e-9
    r[nm + "_rel_err_covered"] = float(np.max(np.abs(np.where(c, got - want, 0))) / scale_)
    r[nm + "_uncovered_absmax"] = float(np.max(np.abs(np.where(c, 0, got))))
    r[nm + "_uncovered_nan"] = bool(np.isnan(np.where(c, 0, got)).any())
  r["o_ref_absmax"] = float(np.max(np.abs(ro)))
  res[name] = r
  print(name, json.dumps(r), flush=True)


# own block, causal, docs as runs; batch 1 a single doc; M larger than needed (zero-length pads)
L = 384
check("own_causal", [[(0, 100, 0, 100), (100, 3, 100, 3), (103, 150, 103, 150), (253, 131, 253, 131)],
                     [(0, 384, 0, 384)]], True, L, L, 6)
# off-diagonal: q prefix of 37 rows vs kv suffix of 91 cols; second batch nothing shared; M = 2
check("offdiag", [[(0, 37, L - 91, 91)], [(0, 0, 0, 0)]], False, L, L, 2)
# two shared docs, different offsets, rows in between uncovered
check("two_shared", [[(0, 50, 300, 84), (200, 60, 0, 40)], [(10, 100, 20, 200)]], False, L, L, 2)


# timing: own causal block of 16K tokens, 16 docs of 1024, for M = 16, 64, 256, and plain causal
def timeit(f, *a, n=5):
  jax.block_until_ready(f(*a))
  ts = []
  for _ in range(n):
    t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
  return float(np.median(ts))


T, H, K, D = 16384, 16, 8, 128
key = jax.random.PRNGKey(1)
q = jax.random.normal(key, (1, T, H, D), jnp.bfloat16)
k = jax.random.normal(jax.random.PRNGKey(2), (1, T, K, D), jnp.bfloat16)
v = jax.random.normal(jax.random.PRNGKey(3), (1, T, K, D), jnp.bfloat16)
do = jax.random.normal(jax.random.PRNGKey(4), (1, T, H, D), jnp.bfloat16)
scale = D ** -0.5
timing = {}
for ndocs in (1, 16):
  dl = T // ndocs
  segs = [[(i * dl, dl, i * dl, dl) for i in range(ndocs)]]
  for M in sorted({max(ndocs, 2), 64, 256}):
    qlen, klen, qoff, koff = arrays(segs, M)

    @jax.jit
    def fb(q, k, v, do, qlen=qlen, klen=klen, qoff=qoff, koff=koff):
      o, st = call_fwd(q, k, v, qlen, klen, qoff, koff, True, scale)
      return call_bwd(q, k, v, qlen, klen, qoff, koff, True, scale, st, o, do)
    timing[f"docs{ndocs}_M{M}"] = timeit(fb, q, k, v, do) * 1e3
    print(f"docs{ndocs}_M{M}", timing[f"docs{ndocs}_M{M}"], flush=True)


def plain(q, k, v, do, causal=True):
  unused = jnp.zeros(0, q.dtype)
  m = fa.MaskType.CAUSAL
  kw = dict(seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=m,
            layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
  o, st = fa._dot_product_attention_fwd_p_wrapper.bind(q, k, v, *[unused] * 7, scale=scale, is_training=True, **kw)
  return fa._dot_product_attention_bwd_p_wrapper.bind(q, k, v, *[unused] * 7, st, o, do, scale=scale, **kw)
timing["plain_causal"] = timeit(jax.jit(plain), q, k, v, do) * 1e3
# one doc per 1024 tokens as 16 separate batch rows (the ideal for docs16)
qb, kb, vb, dob = (x.reshape(16, T // 16, *x.shape[2:]) for x in (q, k, v, do))
timing["batched_16x1024_causal"] = timeit(jax.jit(plain), qb, kb, vb, dob) * 1e3
res["timing_ms"] = timing
print(json.dumps(timing, indent=1))
json.dump(res, open(os.path.join(OUT, "probe.json"), "w"), indent=1)
