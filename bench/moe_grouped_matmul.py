"""The expert layer's grouped matmuls on one GPU, forward+backward, against a dense matmul of the
same FLOPs; and the dropless layer's dispatch overhead (routing, sort, gather, unsort, combine).

Rows are the routed token-expert pairs, sorted by expert (group sizes from --balance: `balanced`,
every expert M/E rows; `router`, the sizes a random softmax router picks for M/K tokens, top-K;
`skewed`, sizes rising linearly from 0.23 to 1.77 times the mean: the max/mean load 1.77 that the
learned router of the `moe` preset showed in training).
Each formulation computes the SwiGLU experts down(silu(x gate_e) * (x up_e)) on the sorted rows:

  dense          one [M, D] x [D, F] SwiGLU with shared weights: the same FLOPs, the ceiling
  ragged_xla     `jax.lax.ragged_dot` (parallel/experts/grouped_matmul.py, impl xla)
  tokamax        `tokamax.ragged_dot` (when importable)
  *_f32out       the same grouped matmuls asked for float32 outputs (cast back to bf16): does the
                 kernel then accumulate the weight gradient in float32, and at what cost?
  padded         the sorted rows scattered into [E, C, D] slots (C = the largest group, rounded up
                 to 128), dense batched matmuls, gathered back: wasted FLOPs under skew, but
                 plain batched GEMMs (the timing includes the two layout changes)
  batched_only   the [E, C, D] batched matmuls alone (what `padded` costs without its layout change)
  tiled          `sharding.grouped_matmul=tiled` (parallel/experts/tiled.py): each group padded to
                 whole tiles (static bound: ceil(M / tile) + E tiles), batched matmuls over the
                 tiles with each tile's expert weights picked by a one-hot matmul
  rounds         `sharding.grouped_matmul=rounds` (parallel/experts/rounds.py): [E, C, D] slots at
                 the mean group size (C multiple of 128), batched matmuls, and the overflowing
                 groups' rows in spill rounds (a while loop; none when balanced); `rounds_x1.25`
                 etc. set the slots' factor over the mean group size

Forward+backward TFLOP/s counts 3 x the forward FLOPs of the real rows (2 M D F x 3 matmuls), so
padding is not credited. Every gradient (rows, w_gate, w_up, w_down) is compared with a float32
reference (per-group einsums at highest precision on the same bf16-rounded inputs): relative
Frobenius error.

Dispatch overhead: the whole dropless layer (route, sort, gather, grouped matmuls, unsort,
combine; `dispatch.experts_mlp` on one device) against its grouped matmuls alone, forward+backward:
the non-GEMM share of the layer's time. Pass --profile_dir to write a profiler trace of both.

  python bench/moe_grouped_matmul.py --out=moe_grouped_matmul.json
  python bench/moe_grouped_matmul.py --balance=router --out=moe_grouped_matmul_router.json
  python bench/moe_grouped_matmul.py --balance=skewed --out=moe_grouped_matmul_skewed.json
  (CPU smoke test: --experts=4 --d_model=64 --d_ff=32 --rows=1024 --repeats=1)
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.timing import median_call_seconds
from parallel.experts.dispatch import experts_mlp
from parallel.experts.ffn import batched_ffn, grouped_ffn
from parallel.experts.grouped_matmul import grouped_matmul, tokamax_available
from parallel.experts.rounds import CAPACITY_FACTOR, rounds_ffn
from parallel.experts.routing import route
from parallel.mesh import single_device_mesh
from parallel.plan import Strategies, make_plan

FLAGS = flags.FLAGS
flags.DEFINE_integer("experts", 16, "Routed experts E.")
flags.DEFINE_integer("d_model", 2048, "D.")
flags.DEFINE_integer("d_ff", 1408, "Expert width F.")
flags.DEFINE_integer("rows", 65536, "Routed rows M (token-expert pairs).")
flags.DEFINE_integer("top_k", 4, "K: the layer-overhead measurement routes M / K tokens.")
flags.DEFINE_enum("balance", "balanced", ["balanced", "router", "skewed"],
                  "Group sizes: equal, a random router's, or skewed to max/mean 1.77.")
flags.DEFINE_list("impls", ["dense", "ragged_xla", "tokamax", "ragged_xla_f32out", "tokamax_f32out", "padded",
                            "batched_only", "tiled", "rounds", "rounds_x1.25"],
                  "Formulations to time.")
flags.DEFINE_string("layer_grouped_matmul", "auto", "sharding.grouped_matmul of the dispatch-overhead layer.")
flags.DEFINE_integer("repeats", 10, "Timed calls after one warm-up; the median is reported.")
flags.DEFINE_string("profile_dir", "", "Write a profiler trace of the dispatch-overhead measurement here.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

DTYPE = jnp.bfloat16


def _group_sizes(rng: np.random.Generator) -> np.ndarray:
  e, m = FLAGS.experts, FLAGS.rows
  if FLAGS.balance == "balanced":
    sizes = np.full(e, m // e)
    sizes[: m - sizes.sum()] += 1
    return sizes
  if FLAGS.balance == "skewed":
    sizes = np.floor(m / e * np.linspace(0.23, 1.77, e)).astype(int)
    sizes[: m - sizes.sum()] += 1
    return sizes
  logits = rng.normal(size=(m // FLAGS.top_k, e)) * 1.0
  chosen = np.argsort(-logits, axis=1)[:, :FLAGS.top_k]
  return np.bincount(chosen.reshape(-1), minlength=e)


def _slots(sizes: np.ndarray, cap: int) -> np.ndarray:
  """For each [E, C] slot, the sorted row it holds (M for an empty slot)."""
  m = int(sizes.sum())
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  slot = np.full((len(sizes), cap), m, np.int32)
  for e, (s, n) in enumerate(zip(starts, sizes)):
    slot[e, :n] = np.arange(s, s + n)
  return slot


def _formulations(sizes: np.ndarray):
  e, m = FLAGS.experts, int(sizes.sum())
  cap = int(math.ceil(sizes.max() / 128) * 128)
  slot = jnp.asarray(_slots(sizes, cap))
  row_of = np.zeros(m, np.int32)  # sorted row -> its flat slot
  flat = _slots(sizes, cap).reshape(-1)
  row_of[flat[flat < m]] = np.nonzero(flat < m)[0]
  row_of = jnp.asarray(row_of)
  gs = jnp.asarray(sizes, jnp.int32)

  def padded(rows, wg, wu, wd):
    x = jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])[slot]
    return batched_ffn(x, wg, wu, wd).reshape(e * cap, -1)[row_of]

  def dense(rows, wg, wu, wd):
    return batched_ffn(rows[None], wg[0][None], wu[0][None], wd[0][None])[0]

  fns = {"dense": dense, "tiled": lambda r, *w: grouped_ffn(r, gs, *w, impl="tiled"),
         "ragged_xla": lambda r, *w: grouped_ffn(r, gs, *w, impl="xla"),
         "padded": padded, "batched_only": lambda x, *w: batched_ffn(x, *w)}
  def f32out(impl):
    def ffn(rows, wg, wu, wd):
      mm = lambda x, w: grouped_matmul(x, w, gs, impl, out_dtype=jnp.float32).astype(rows.dtype)
      gate, up = mm(rows, wg), mm(rows, wu)
      return mm((jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(rows.dtype), wd)
    return ffn

  fns["ragged_xla_f32out"] = f32out("xla")
  for name in FLAGS.impls:
    if name == "rounds" or name.startswith("rounds_x"):
      factor = float(name[len("rounds_x"):]) if name != "rounds" else CAPACITY_FACTOR
      fns[name] = lambda r, wg, wu, wd, factor=factor: rounds_ffn(r, gs, wg, wu, wd, batched_ffn, factor=factor)
  if tokamax_available():
    fns["tokamax"] = lambda r, *w: grouped_ffn(r, gs, *w, impl="tokamax")
    fns["tokamax_f32out"] = f32out("tokamax")
  return fns, cap


def _reference(sizes):
  """Per-group float32 einsums at highest precision."""
  bounds = np.concatenate([[0], np.cumsum(sizes)])

  def ref(rows, wg, wu, wd):
    outs = []
    for e in range(len(sizes)):
      x = rows[bounds[e]:bounds[e + 1]]
      g = jnp.dot(x, wg[e], precision="highest")
      u = jnp.dot(x, wu[e], precision="highest")
      outs.append(jnp.dot(jax.nn.silu(g) * u, wd[e], precision="highest"))
    return jnp.concatenate(outs)
  return ref


def _fwd_bwd(fn):
  def run(args, cot):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(cot))
  return jax.jit(run)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def grouped_matmuls(sizes: np.ndarray) -> list[dict]:
  e, d, f, m = FLAGS.experts, FLAGS.d_model, FLAGS.d_ff, int(sizes.sum())
  keys = jax.random.split(jax.random.key(0), 5)
  rows = jax.random.normal(keys[0], (m, d), jnp.float32)
  ws = [jax.random.normal(keys[1], (e, d, f)) / math.sqrt(d), jax.random.normal(keys[2], (e, d, f)) / math.sqrt(d),
        jax.random.normal(keys[3], (e, f, d)) / math.sqrt(f)]
  cot = jax.random.normal(keys[4], (m, d), jnp.float32)
  # The reference sees the same bf16-rounded inputs in float32: the errors are the computation's.
  exact = lambda a: a.astype(DTYPE).astype(jnp.float32)
  want = jax.jit(lambda a, c: _fwd_bwd(_reference(sizes))(a, c))(tuple(map(exact, (rows, *ws))), exact(cot))
  fns, cap = _formulations(sizes)
  flops = 3 * 2 * m * d * f * 3
  results = []
  for name in FLAGS.impls:
    if name not in fns:
      print(f"{name}: not available here, skipped")
      continue
    args = [rows, *ws]
    if name == "batched_only":
      args = [jax.random.normal(keys[0], (e, cap, d), jnp.float32)] + ws
    args = [a.astype(DTYPE) for a in args]
    c = (cot if name != "batched_only" else jax.random.normal(keys[4], (e, cap, d))).astype(DTYPE)
    step = _fwd_bwd(fns[name])
    seconds = median_call_seconds(step, args, c, repeats=FLAGS.repeats)
    row = {"impl": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12}
    if name not in ("dense", "batched_only"):
      got = step(args, c)
      row.update({k: _rel(g, w) for k, g, w in zip(("out", "d_rows", "d_gate", "d_up", "d_down"), got, want)})
    results.append(row)
  dense = next((r["ms"] for r in results if r["impl"] == "dense"), None)
  for r in results:
    r["of_dense"] = dense / r["ms"] if dense else None
  return results


def dispatch_overhead() -> dict:
  """Whole dropless layer vs its grouped matmuls alone, forward+backward, on one device."""
  e, d, f, k = FLAGS.experts, FLAGS.d_model, FLAGS.d_ff, FLAGS.top_k
  t = FLAGS.rows // k
  keys = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(keys[0], (t, d), DTYPE)
  router = jax.random.normal(keys[1], (d, e), jnp.float32) / math.sqrt(d)
  ws = [(jax.random.normal(keys[2 + i], shape) / math.sqrt(shape[1])).astype(DTYPE)
        for i, shape in enumerate([(e, d, f), (e, d, f), (e, f, d)])]
  plan = make_plan(single_device_mesh(), strategies=Strategies(expert_dispatch="dropless",
                                                               grouped_matmul=FLAGS.layer_grouped_matmul))

  def layer(x, router, wg, wu, wd):
    routing = route(jnp.dot(x.astype(jnp.float32), router), top_k=k)
    return experts_mlp(x, routing, wg, wu, wd, plan, compute_dtype=DTYPE)[0]

  sizes = np.asarray(jax.jit(lambda x, r: jnp.bincount(route(jnp.dot(x.astype(jnp.float32), r), top_k=k)
                                                       .experts.reshape(-1), length=e))(x, router))
  gs = jnp.asarray(sizes, jnp.int32)
  rows = jax.random.normal(keys[5], (t * k, d), DTYPE)
  gemm = lambda r, wg, wu, wd: grouped_ffn(r, gs, wg, wu, wd, plan.strategies.grouped_matmul)
  layer_step, gemm_step = _fwd_bwd(layer), _fwd_bwd(gemm)
  cot_layer, cot_rows = jnp.ones((t, d), DTYPE), jnp.ones((t * k, d), DTYPE)
  whole = median_call_seconds(layer_step, (x, router, *ws), cot_layer, repeats=FLAGS.repeats)
  gemms = median_call_seconds(gemm_step, (rows, *ws), cot_rows, repeats=FLAGS.repeats)
  if FLAGS.profile_dir:
    with jax.profiler.trace(FLAGS.profile_dir):
      jax.block_until_ready(layer_step((x, router, *ws), cot_layer))
      jax.block_until_ready(gemm_step((rows, *ws), cot_rows))
  return {"tokens": t, "layer_ms": whole * 1e3, "grouped_matmuls_ms": gemms * 1e3,
          "non_gemm_share": 1 - gemms / whole, "group_sizes": sizes.tolist()}


def main(_):
  sizes = _group_sizes(np.random.default_rng(0))
  results = grouped_matmuls(sizes)
  overhead = dispatch_overhead()
  out = {"device": str(jax.devices()[0]), "experts": FLAGS.experts, "d_model": FLAGS.d_model, "d_ff": FLAGS.d_ff,
         "rows": FLAGS.rows, "balance": FLAGS.balance, "group_sizes": sizes.tolist(), "results": results,
         "dispatch_overhead": overhead}
  if FLAGS.out:
    with open(FLAGS.out, "w") as fh:
      json.dump(out, fh, indent=1)
  print(f"dispatch overhead ({overhead['tokens']} tokens, top-{FLAGS.top_k}): layer {overhead['layer_ms']:.2f} ms, "
        f"grouped matmuls {overhead['grouped_matmuls_ms']:.2f} ms, non-GEMM share {overhead['non_gemm_share']:.1%}")
  print(f"\n{FLAGS.experts} experts, {FLAGS.d_model} -> {FLAGS.d_ff}, {FLAGS.rows} rows ({FLAGS.balance}), bf16, "
        f"forward+backward")
  print(f"{'impl':<19}{'ms':>9}{'TFLOP/s':>10}{'of dense':>10}"
        + "".join(f"{k:>10}" for k in ("out", "d_rows", "d_gate", "d_up", "d_down")))
  for r in results:
    errs = "".join(f"{r[k]:>10.2e}" if k in r else f"{'-':>10}" for k in ("out", "d_rows", "d_gate", "d_up", "d_down"))
    print(f"{r['impl']:<19}{r['ms']:>9.3f}{r['tflops']:>10.1f}{r['of_dense']:>10.1%}{errs}")


if __name__ == "__main__":
  app.run(main)
