"""The ragged all-to-all against the padded one inside a compiled train step, on every visible GPU.

A public JAX MoE codebase found XLA's latency-hiding scheduler corrupting the first backward pass
of `jax.lax.ragged_all_to_all` with large expert banks. This runs the same few SGD steps of an
expert layer (router + experts over the `expert` axis, all visible devices) with
`sharding.expert_all_to_all` = padded and = ragged, with shardlab's GPU XLA flags (the
latency-hiding scheduler on), and compares the loss and every gradient at every step, the first
backward included: relative Frobenius differences, which should be at rounding level (the two
paths do the same arithmetic on differently laid out rows).

  PYTHONPATH=. python bench/moe_ragged_check.py --out=moe_ragged_check.json      (2+ GPUs)
  (CPU smoke test of the script: --kinds=padded,padded --experts=8 --d_model=32 --d_ff=16
   --tokens_per_device=64, with XLA_FLAGS=--xla_force_host_platform_device_count=4)
"""

from __future__ import annotations

import json
import math

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("kinds", ["padded", "ragged"], "The two all-to-all kinds to compare (first is the reference).")
flags.DEFINE_integer("experts", 64, "Routed experts (a large bank).")
flags.DEFINE_integer("d_model", 1024, "D.")
flags.DEFINE_integer("d_ff", 512, "Expert width F.")
flags.DEFINE_integer("top_k", 4, "Experts per token.")
flags.DEFINE_integer("tokens_per_device", 4096, "Tokens each device dispatches.")
flags.DEFINE_integer("steps", 3, "SGD steps compared.")
flags.DEFINE_integer("chunks", 1, "sharding.expert_chunks.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (weights stay float32).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def run(kind: str) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from parallel.experts.dispatch import experts_mlp
  from parallel.experts.routing import route
  from parallel.mesh import make_mesh
  from parallel.plan import Strategies, make_plan

  n = jax.device_count()
  mesh = make_mesh({"expert": n})
  plan = make_plan(mesh, strategies=Strategies(expert_all_to_all=kind, expert_chunks=FLAGS.chunks),
                   expert_tensor_axes=())
  e, d, f, k = FLAGS.experts, FLAGS.d_model, FLAGS.d_ff, FLAGS.top_k
  t = FLAGS.tokens_per_device * n
  keys = jax.random.split(jax.random.key(0), 6)
  experts = NamedSharding(mesh, P("expert"))
  params = {"router": jax.random.normal(keys[0], (d, e)) / math.sqrt(d),
            "w_gate": jax.device_put(jax.random.normal(keys[1], (e, d, f)) / math.sqrt(d), experts),
            "w_up": jax.device_put(jax.random.normal(keys[2], (e, d, f)) / math.sqrt(d), experts),
            "w_down": jax.device_put(jax.random.normal(keys[3], (e, f, d)) / math.sqrt(f), experts)}
  tokens = NamedSharding(mesh, P("expert", None))
  x = jax.device_put(jax.random.normal(keys[4], (t, d)), tokens)
  target = jax.device_put(jax.random.normal(keys[5], (t, d)), tokens)
  dtype = jnp.dtype(FLAGS.dtype)

  def loss_fn(p, x, target):
    routing = route(jnp.dot(x, p["router"], precision="highest"), top_k=k)
    y, _ = experts_mlp(x.astype(dtype), routing, p["w_gate"].astype(dtype), p["w_up"].astype(dtype),
                       p["w_down"].astype(dtype), plan, compute_dtype=dtype)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))

  @jax.jit
  def step(p, x, target):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, target)
    return jax.tree.map(lambda w, g: w - 0.5 * g, p, grads), loss, grads

  records = []
  for _ in range(FLAGS.steps):
    params, loss, grads = step(params, x, target)
    records.append({"loss": jax.device_get(loss), "grads": jax.device_get(grads)})
  return records


def main(_):
  from parallel.xla_flags import apply_default_flags
  apply_default_flags()  # the GPU defaults, the latency-hiding scheduler among them
  import jax
  import numpy as np

  if "ragged" in FLAGS.kinds and jax.device_count() < 2:
    raise app.UsageError("the ragged path runs over 2+ devices (one device has nothing to exchange)")
  want, got = (run(kind) for kind in FLAGS.kinds)
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))
  rows = []
  for i, (w, g) in enumerate(zip(want, got)):
    row = {"step": i, "loss_" + FLAGS.kinds[0]: float(w["loss"]), "loss_" + FLAGS.kinds[1]: float(g["loss"]),
           "loss": rel(g["loss"], w["loss"])}
    row.update({name: rel(g["grads"][name], w["grads"][name]) for name in w["grads"]})
    rows.append(row)
  out = {"devices": jax.device_count(), "device": str(jax.devices()[0]), "kinds": FLAGS.kinds,
         "flags": {k: FLAGS[k].value for k in ("experts", "d_model", "d_ff", "top_k", "tokens_per_device", "chunks",
                                                "dtype")}, "steps": rows}
  if FLAGS.out:
    with open(FLAGS.out, "w") as fh:
      json.dump(out, fh, indent=1)
  names = ["loss", "router", "w_gate", "w_up", "w_down"]
  print(f"\n{FLAGS.kinds[1]} vs {FLAGS.kinds[0]} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{FLAGS.experts} experts, {FLAGS.dtype}: relative differences")
  print(f"{'step':<6}" + "".join(f"{n:>12}" for n in names))
  for r in rows:
    print(f"{r['step']:<6}" + "".join(f"{r[n]:>12.2e}" for n in names))


if __name__ == "__main__":
  app.run(main)
