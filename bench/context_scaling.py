"""Context-parallel scaling over N devices: attention throughput against N x one device, and the
longest trainable context.

  python bench/context_scaling.py --devices=1,2 --tokens_per_device=16384 --out=context_scaling.json
  python bench/context_scaling.py --devices=1,2 --fit --out=...     # + the longest context that fits

Attention: one sequence of N x T tokens (T = --tokens_per_device), [1, N*T, H, D] bf16, forward
and backward with a fixed cotangent. Each method (`--methods`, the real ops of
`parallel/attention/` with cuDNN blocks) runs it on a `seq` mesh of N devices, the sequence in
the method's layout (zigzag for causal, contiguous for full attention); the reference is one
device running one monolithic cuDNN call over all N x T tokens. Strong scaling, so the ideal is N
times faster: efficiency = t(one device, monolithic) / (N x t(N devices, method)). Full attention
and causal are both measured; the outputs must agree with the reference (bf16 tolerance).

Longest trainable context (`--fit`): the `1b` preset's train step, batch 1, `remat=full`,
`sharding.attention=ring`, compiled for `mesh.seq=N` (nothing runs); the longest sequence whose
compiled memory fits one device, by doubling and then bisection to `--fit_step` x 2N tokens.

A table is printed last; JSON with --out. On a CPU, try it with --implementation=xla and small
sizes (XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel.attention.allgather import allgather_attention
from parallel.attention.layout import permutation
from parallel.attention.ring import ring_attention
from parallel.mesh import make_mesh
from bench.compare import fwd_bwd, rel_err
from bench.timing import median_call_seconds

FLAGS = flags.FLAGS
flags.DEFINE_list("devices", ["1", "2"], "Device counts N (at most the visible devices).")
flags.DEFINE_list("methods", ["ring", "allgather"], "Context-parallel ops.")
flags.DEFINE_list("masks", ["full", "causal"], "full and/or causal.")
flags.DEFINE_integer("tokens_per_device", 16384, "T: tokens of the sequence on each device.")
flags.DEFINE_integer("heads", 16, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("repeats", 5, "Timed runs after one warm-up; the median is reported.")
flags.DEFINE_string("implementation", "cudnn", "cudnn (GPU), or xla to try the script on a CPU.")
flags.DEFINE_bool("fit", False, "Also find the longest trainable context of the `1b` preset per N.")
flags.DEFINE_string("fit_config", "1b", "Preset for --fit.")
flags.DEFINE_multi_string("fit_set", [], "Extra overrides for --fit, section.field=value.")
flags.DEFINE_integer("fit_step", 1024, "--fit resolution: multiples of this x 2N tokens.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

METHODS = {"ring": ring_attention, "allgather": allgather_attention}


def _inputs(total: int):
  h, kh, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
  keys = jax.random.split(jax.random.key(total), 4)
  dev = jax.devices()[0]
  make = lambda key, heads: jax.device_put(jax.random.normal(key, (1, total, heads, d), jnp.bfloat16), dev)
  return make(keys[0], h), make(keys[1], kh), make(keys[2], kh), make(keys[3], h)


def reference(total: int, causal: bool) -> tuple[float, tuple]:
  """One device, one monolithic call over the whole sequence: time, (output, dq)."""
  q, k, v, cot = _inputs(total)
  attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=FLAGS.implementation)
  fn = jax.jit(lambda q, k, v: fwd_bwd(attend, q, k, v, cot)[:2])
  return median_call_seconds(fn, q, k, v, repeats=FLAGS.repeats), fn(q, k, v)


def scaled(method: str, n: int, total: int, causal: bool) -> tuple[float, tuple]:
  """N devices, the method over `seq`: time, (output, dq) back in sequence order."""
  mesh = make_mesh({"seq": n}, jax.devices()[:n])
  layout = "zigzag" if causal else "contiguous"
  perm = jnp.asarray(permutation(layout, total, n))
  spread = NamedSharding(mesh, P(None, "seq"))
  q, k, v, cot = (jax.device_put(jnp.take(x, perm, axis=1), spread) for x in _inputs(total))
  op = lambda q, k, v: METHODS[method](q, k, v, None, mesh=mesh, axis="seq", layout=layout,
                                       implementation=FLAGS.implementation, causal=causal)
  fn = jax.jit(lambda q, k, v: fwd_bwd(op, q, k, v, cot)[:2])
  t = median_call_seconds(fn, q, k, v, repeats=FLAGS.repeats)
  inverse = jnp.argsort(perm)
  return t, tuple(jnp.take(jax.device_put(x, jax.devices()[0]), inverse, axis=1) for x in fn(q, k, v))


def attention_rows() -> list[dict]:
  rows = []
  for mask in FLAGS.masks:
    causal = mask == "causal"
    for n in map(int, FLAGS.devices):
      total = n * FLAGS.tokens_per_device
      t_ref, (o_ref, dq_ref) = reference(total, causal)
      for method in FLAGS.methods:
        t, (o, dq) = scaled(method, n, total, causal)
        # Forward FLOPs of the whole sequence (causal: half); the backward is about 2.5x.
        flops = 3.5 * 4 * total * total * FLAGS.heads * FLAGS.head_dim * (0.5 if causal else 1.0)
        rows.append({"method": method, "mask": mask, "devices": n, "tokens": total,
                     "tokens_per_device": FLAGS.tokens_per_device, "ms": 1e3 * t, "one_device_ms": 1e3 * t_ref,
                     "efficiency": t_ref / (n * t), "tflops_per_device": flops / t / n / 1e12,
                     "out_rel_err": rel_err(o, o_ref), "dq_rel_err": rel_err(dq, dq_ref)})
        print(f"RESULT {method} {mask} N={n}: {1e3 * t:.1f} ms vs one device {1e3 * t_ref:.1f} ms, "
              f"efficiency {100 * rows[-1]['efficiency']:.1f}%", flush=True)
  return rows


def fit_rows() -> list[dict]:
  import configs  # noqa: PLC0415 - only --fit needs the training stack
  from bench.fit import bisect, largest  # noqa: PLC0415

  limit = jax.local_devices()[0].memory_stats()["bytes_limit"]
  rows = []
  for n in map(int, FLAGS.devices):
    over = ["data.source=synthetic", "checkpoint.enabled=false", "mesh.data=1", f"mesh.seq={n}",
            "sharding.attention=ring", "model.remat=full", "data.global_batch=1", *FLAGS.fit_set]
    config_for = lambda s: configs.get_config(FLAGS.fit_config, [*over, f"data.seq_len={s}", f"model.max_seq_len={s}"])
    step = FLAGS.fit_step * 2 * n
    start = 16 * step
    best, tried = largest(config_for, [start * 2 ** i for i in range(12)], limit)
    if best is not None and len(tried) > 1 and tried[-1]["value"] > best:
      best = bisect(config_for, best, tried[-1]["value"], step, limit, tried)
    rows.append({"devices": n, "longest_context": best, "tried": tried})
    print(f"FIT N={n}: longest trainable context {best} tokens", flush=True)
  return rows


def main(argv):
  del argv
  if FLAGS.implementation != "xla":
    from parallel.xla_flags import apply_default_flags  # noqa: PLC0415 - as train.py does
    apply_default_flags()
  available = len(jax.devices())
  if max(map(int, FLAGS.devices)) > available:
    raise SystemExit(f"--devices={','.join(FLAGS.devices)}: only {available} devices are visible")
  rows = attention_rows()
  fits = fit_rows() if FLAGS.fit else []
  result = {"device_kind": jax.devices()[0].device_kind, "attention": rows, "fit": fits}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)
  print(f"\n{'method':<10}{'mask':<8}{'N':>3}{'tokens':>9}{'ms':>10}{'1-dev ms':>10}{'efficiency':>12}"
        f"{'TFLOP/s/dev':>13}{'out err':>9}{'dq err':>9}")
  for r in rows:
    print(f"{r['method']:<10}{r['mask']:<8}{r['devices']:>3}{r['tokens']:>9}{r['ms']:>10.1f}{r['one_device_ms']:>10.1f}"
          f"{100 * r['efficiency']:>11.1f}%{r['tflops_per_device']:>13.1f}{r['out_rel_err']:>9.1e}{r['dq_rel_err']:>9.1e}")
  if fits:
    base = fits[0]["longest_context"]
    for r in fits:
      ratio = f"{r['longest_context'] / base:.2f}x" if base and r["longest_context"] else "-"
      print(f"longest trainable context, N={r['devices']}: {r['longest_context']} tokens ({ratio} of N={fits[0]['devices']})")


if __name__ == "__main__":
  app.run(main)
