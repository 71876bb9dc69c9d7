"""Simulated bubble and activation memory of every pipeline schedule, and their timelines as PNGs.

  PYTHONPATH=. python bench/pipeline_tables.py --out=bench/results/cpu/pipeline.json --draw=docs/pipeline

Two cost models: "F = B + W" (forward and whole backward take one tick each, as in the papers'
closed forms) and "F = B = W" (the backward split into two halves as long as the forward, where
zero-bubble schedules pay off). Memory: the most microbatch-parts whose inputs a stage holds.

A second table puts the output layer and its loss in (`--head`, its forward plus backward per
microbatch in units of one stage's forward; about 2 for the `1b` preset, 32K tokens of vocabulary
over 8 stages of 2 layers, and 8 with a 128K vocabulary): on the last stage, or split over all
stages (vocabulary parallelism).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from parallel.pipeline.schedule import SCHEDULES, make_schedule
from parallel.pipeline.simulate import draw, simulate

FLAGS = flags.FLAGS
flags.DEFINE_list("stages", ["4", "8"], "Pipeline stages p.")
flags.DEFINE_list("microbatches", ["8", "16", "32"], "Microbatches m.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("draw", "", "Draw each schedule at p=4, m=8 into this folder.")
flags.DEFINE_float("head", 2.0, "Output layer + loss, forward and backward, per microbatch (one stage's F = 1).")

CHUNKS = {"circular": 2, "interleaved": 2, "zb-v": 2}


def main(argv):
  del argv
  rows = []
  for p in map(int, FLAGS.stages):
    for m in map(int, FLAGS.microbatches):
      for name in SCHEDULES:
        s = make_schedule(name, p, m, CHUNKS.get(name, 1))
        whole, split = simulate(s, 1.0, 1.0, 0.0), simulate(s, 1.0, 1.0, 1.0)
        rows.append({"schedule": name, "stages": p, "microbatches": m, "chunks": s.chunks,
                     "bubble_f_eq_bw": whole["bubble"], "bubble_f_eq_b_eq_w": split["bubble"],
                     "peak_stored": whole["peak_stored"]})
  heads = []
  for p in map(int, FLAGS.stages):
    for name in SCHEDULES:
      s = make_schedule(name, p, 4 * p, CHUNKS.get(name, 1))
      last, split = (simulate(s, 1.0, 1.0, 1.0, head=FLAGS.head, vocab_parallel=vp) for vp in (False, True))
      heads.append({"schedule": name, "stages": p, "microbatches": 4 * p, "head": FLAGS.head,
                    "time_head_last": last["time"], "time_vocab_parallel": split["time"],
                    "bubble_head_last": last["bubble"], "bubble_vocab_parallel": split["bubble"]})
  if FLAGS.draw:
    os.makedirs(FLAGS.draw, exist_ok=True)
    for name in SCHEDULES:
      draw(make_schedule(name, 4, 8, CHUNKS.get(name, 1)), os.path.join(FLAGS.draw, f"{name}.png"))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"schedules": rows, "head": heads}, f, indent=2)
  print(f"{'schedule':<12}{'p':>3}{'m':>4}{'chunks':>7}{'bubble F=B+W':>14}{'bubble F=B=W':>14}  peak stored per stage")
  for r in rows:
    print(f"{r['schedule']:<12}{r['stages']:>3}{r['microbatches']:>4}{r['chunks']:>7}{r['bubble_f_eq_bw']:>14.3f}"
          f"{r['bubble_f_eq_b_eq_w']:>14.3f}  {r['peak_stored']}")
  print(f"\nF = B = W = 1, head = {FLAGS.head}: on the last stage vs split over all stages (vocabulary parallelism)")
  print(f"{'schedule':<12}{'p':>3}{'m':>4}{'time last':>11}{'time split':>12}{'speed-up':>10}{'bubble last':>13}"
        f"{'bubble split':>14}")
  for r in heads:
    print(f"{r['schedule']:<12}{r['stages']:>3}{r['microbatches']:>4}{r['time_head_last']:>11.1f}"
          f"{r['time_vocab_parallel']:>12.1f}{r['time_head_last'] / r['time_vocab_parallel']:>9.2f}x"
          f"{r['bubble_head_last']:>13.3f}{r['bubble_vocab_parallel']:>14.3f}")


if __name__ == "__main__":
  app.run(main)
