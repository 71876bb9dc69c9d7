"""Measured pipeline bubbles against the simulator's, per schedule.

  python bench/pipeline_bubbles.py --config=1b --stages=2 --schedules=gpipe,1f1b,zb-h1 --out=bubbles.json
  python bench/pipeline_bubbles.py --config=1b --stages=2 --costs_only   # one GPU: the action costs

1. Action costs, on one device: one stage's part (n_layers / p layers of the preset) on one
   microbatch, timed as the executor runs each action: F (the part's forward), B (the part re-run
   under `jax.vjp` for its input's gradient, keeping each weight matmul's input and output
   gradient), W (those matmuls' weight gradients), BW (both at once, plain autodiff), and the head
   with its loss, forward and backward (it runs inside the last part's backward).
2. The simulator (`parallel/pipeline/simulate.py`) reads each schedule's table with those costs:
   step time and bubble. Schedules without a B/W split pay BW per backward (b = BW, w = 0).
3. The real train step with `mesh.stage=p` and the schedule on p devices (`bench/train_speed.py`'s
   measurement) gives the step time; the measured bubble is 1 - (the stages' summed work, the
   same costs) / (p x measured time).

The simulator has no transfers and charges the last part's forward F, which the executor folds
into that part's backward; both make the measured bubble a little larger than the simulated one.
A table is printed last; JSON with --out. Flags of `bench/train_speed.py` (config, set, warmup,
steps, windows) apply to the measured steps.
"""

from __future__ import annotations

import json
import math

from absl import app, flags

import configs
from bench.timing import median_call_seconds
from bench.train_speed import measure

FLAGS = flags.FLAGS
flags.DEFINE_integer("stages", 2, "Pipeline stages p (the measured steps need p devices).")
flags.DEFINE_list("schedules", ["gpipe", "1f1b", "zb-h1"], "Schedules.")
flags.DEFINE_integer("microbatches", 8, "Microbatches m per step.")
flags.DEFINE_integer("repeats", 10, "Timed runs per action after a warm-up; the median is kept.")
flags.DEFINE_bool("costs_only", False, "Only time the actions and simulate (one device).")
flags.DEFINE_string("bubbles_out", "", "Write the results as JSON here.")


def action_costs(config: configs.Config, p: int, m: int) -> dict:
  """Seconds per action of one stage on one microbatch, on the first device."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from models.stack import scan_layers  # noqa: PLC0415
  from models.transformer import embed_activations, head_logits  # noqa: PLC0415
  from parallel.pipeline.split_backward import split_backward  # noqa: PLC0415
  from parallel.vocab.dispatch import token_cross_entropy  # noqa: PLC0415
  from training.grad import make_compute_params  # noqa: PLC0415
  from training.state import init_state, setup_from_config  # noqa: PLC0415

  rows = config.data.global_batch // m
  stage = configs.get_config(config.name, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set,
                                           "mesh.data=1", "mesh.stage=1", "sharding.pipeline=none",
                                           "data.microbatches=1", f"data.global_batch={rows}",
                                           f"model.n_layers={config.model.n_layers // p}",
                                           f"model.scan_unroll={math.gcd(config.model.scan_unroll, config.model.n_layers // p)}"])
  setup = setup_from_config(stage, jax.devices()[:1])
  compute = make_compute_params(setup)(init_state(setup)["params"])
  plan, cfg = setup.plan, stage.model
  fn, _ = nnx.merge(setup.graphdef, compute).layer_fn(plan)
  shape = (rows, stage.data.seq_len)
  ids = jnp.zeros(shape, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)
  x = embed_activations(cfg, compute["embed"], ids, positions, None, plan)["x"]
  g = jnp.ones_like(x)

  def part(w, x):
    return scan_layers(fn, w, {"x": x, "positions": positions, "segment_ids": None}, unroll=cfg.scan_unroll)[0]["x"]

  def head(lp, x):
    out = compute["embed"] if cfg.tie_embeddings else lp["out"]
    logits = head_logits(cfg, lp["final_norm"]["scale"], out, x, plan)
    return jnp.sum(token_cross_entropy(logits, ids, plan))

  w, last = compute["layers"], {"final_norm": compute["final_norm"], "out": compute.get("lm_head")}
  # As the executor does: B keeps each weight matmul's input and output gradient (and takes the
  # other weights' gradients), W is those matmuls (parallel/pipeline/split_backward.py).
  split = split_backward(lambda w, x, data: part(w, x), w, x, None)

  def b_only(w, x, g):
    _, pullback = split.b(w, x, None)
    return pullback(g)

  b_fn = jax.jit(b_only)
  saved = b_fn(w, x, g)[2]
  print(f"W: {split.tapped} weight matmuls per layer scan", flush=True)
  w_fn = jax.jit(split.w_grad)
  bw_fn = jax.jit(lambda w, x, g: jax.vjp(part, w, x)[1](g))
  timed = lambda fn, *args: median_call_seconds(fn, *args, repeats=FLAGS.repeats)
  return {"F": timed(jax.jit(part), w, x), "B": timed(b_fn, w, x, g), "W": timed(w_fn, w, saved),
          "BW": timed(bw_fn, w, x, g), "head": timed(jax.jit(jax.grad(head, argnums=(0, 1))), last, x)}


def main(argv):
  del argv
  from parallel.xla_flags import apply_default_flags  # noqa: PLC0415 - as train.py does
  apply_default_flags()
  import jax  # noqa: PLC0415

  from parallel.pipeline.schedule import make_schedule  # noqa: PLC0415
  from parallel.pipeline.simulate import simulate  # noqa: PLC0415

  p, m = FLAGS.stages, FLAGS.microbatches
  base = configs.get_config(FLAGS.config, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set])
  costs = action_costs(base, p, m)
  print("RESULT action costs (ms, one stage, one microbatch): "
        + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in costs.items()), flush=True)
  rows = []
  for name in FLAGS.schedules:
    schedule = make_schedule(name, p, m)
    b, w = (costs["B"], costs["W"]) if schedule.split_backward else (costs["BW"], 0.0)
    sim = simulate(schedule, costs["F"], b, w, head=costs["head"])
    row = {"schedule": name, "stages": p, "microbatches": m, "simulated_s": sim["time"],
           "simulated_bubble": sim["bubble"]}
    if not FLAGS.costs_only:
      if jax.device_count() < p:
        raise SystemExit(f"--stages={p}: only {jax.device_count()} devices are visible (use --costs_only)")
      config = configs.get_config(FLAGS.config, ["data.source=synthetic", "checkpoint.enabled=false", *FLAGS.set,
                                                 "mesh.data=1", f"mesh.stage={p}", f"sharding.pipeline={name}",
                                                 f"data.microbatches={m}"])
      measured = measure(config, FLAGS.warmup, FLAGS.steps, FLAGS.windows)["step_s"]
      work = (1.0 - sim["bubble"]) * sim["time"]  # per stage, on average
      row |= {"measured_s": measured, "measured_bubble": 1.0 - work / measured}
    rows.append(row)
    print(f"RESULT {name}: {row}", flush=True)
  if FLAGS.bubbles_out:
    with open(FLAGS.bubbles_out, "w") as f:
      json.dump({"device_kind": jax.devices()[0].device_kind, "costs_s": costs, "rows": rows}, f, indent=2)
  print(f"\n{'schedule':<10}{'p':>3}{'m':>4}{'sim ms':>9}{'sim bubble':>12}{'meas ms':>10}{'meas bubble':>13}{'ratio':>8}")
  for r in rows:
    meas = (f"{1e3 * r['measured_s']:>10.1f}{100 * r['measured_bubble']:>12.1f}%"
            f"{r['measured_bubble'] / r['simulated_bubble']:>8.2f}") if "measured_s" in r else f"{'-':>10}{'-':>13}{'-':>8}"
    print(f"{r['schedule']:<10}{r['stages']:>3}{r['microbatches']:>4}{1e3 * r['simulated_s']:>9.1f}"
          f"{100 * r['simulated_bubble']:>11.1f}%{meas}")
  by = {r["schedule"]: r for r in rows}
  if "zb-h1" in by and "1f1b" in by:
    key = "measured_bubble" if "measured_s" in by["1f1b"] else "simulated_bubble"
    print(f"ZB-H1 bubble / 1F1B bubble ({key.split('_')[0]}): {by['zb-h1'][key] / by['1f1b'][key]:.2f}")


if __name__ == "__main__":
  app.run(main)
