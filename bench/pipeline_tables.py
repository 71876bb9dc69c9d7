"""Simulated bubble and activation memory of every pipeline schedule, and their timelines as PNGs.

  PYTHONPATH=. python bench/pipeline_tables.py --out=bench/results/cpu/pipeline.json --draw=docs/pipeline

Two cost models: "F = B + W" (forward and whole backward take one tick each, as in the papers'
closed forms) and "F = B = W" (the backward split into two halves as long as the forward, where
zero-bubble schedules pay off). Memory: the most microbatch-parts whose inputs a stage holds.
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
  if FLAGS.draw:
    os.makedirs(FLAGS.draw, exist_ok=True)
    for name in SCHEDULES:
      draw(make_schedule(name, 4, 8, CHUNKS.get(name, 1)), os.path.join(FLAGS.draw, f"{name}.png"))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=2)
  print(f"{'schedule':<12}{'p':>3}{'m':>4}{'chunks':>7}{'bubble F=B+W':>14}{'bubble F=B=W':>14}  peak stored per stage")
  for r in rows:
    print(f"{r['schedule']:<12}{r['stages']:>3}{r['microbatches']:>4}{r['chunks']:>7}{r['bubble_f_eq_bw']:>14.3f}"
          f"{r['bubble_f_eq_b_eq_w']:>14.3f}  {r['peak_stored']}")


if __name__ == "__main__":
  app.run(main)
