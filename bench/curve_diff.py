"""Compares two runs' metrics.jsonl: the largest relative difference of the train losses, and eval.

  python bench/curve_diff.py cpu/metrics.jsonl gpu/metrics.jsonl
"""

from __future__ import annotations

import json
import sys


def losses(path: str) -> tuple[dict[int, float], dict[int, float]]:
  train, evals = {}, {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      (train if r["split"] == "train" else evals)[r["step"]] = r["loss"]
  return train, evals


def main(ref_path: str, other_path: str) -> None:
  (ref, ref_eval), (other, other_eval) = losses(ref_path), losses(other_path)
  if sorted(ref) != sorted(other):
    raise SystemExit(f"different logged steps: {sorted(ref)} vs {sorted(other)}")
  worst = max(abs(other[s] - ref[s]) / abs(ref[s]) for s in ref)
  first, last = min(ref), max(ref)
  print(f"CURVE {len(ref)} steps, loss {ref[first]:.4f} -> {ref[last]:.4f}; max relative difference {worst:.2e}; "
        f"eval {', '.join(f'{other_eval[s]:.5f} vs {ref_eval[s]:.5f}' for s in sorted(ref_eval))}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
