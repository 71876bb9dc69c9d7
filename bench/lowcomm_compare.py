"""DDP against every low-communication algorithm over `replica`, side by side.

Every method trains the same small model on the built-in corpus for the same steps, on identical
batches in the same order (the same data seed and global batch): the only change between runs is
`sharding.replica` (the A/B toggle) and that algorithm's knobs. Each run goes through the training
loop (`training.loop.train`), as `train.py` would. The table printed last gives, per method, the
final train and eval loss, the gap to DDP, and the bytes sent per replica over the run, whose
ratio to DDP's is the communication saving. JSON and two PNGs (loss against tokens, loss against
bytes sent per replica on a log scale) are written beside it.

Bytes per replica: what a replica puts into collectives over `replica` (parallel/lowcomm/outer.py).
DDP's is its float32 gradient's share of the step's reduction: 4 bytes x parameters per step.

  python bench/lowcomm_compare.py --out=bench/results/lowcomm     # CPU: 8 emulated devices
  # a sweep: DiLoCo at three H, each with two outer (learning rate/momentum) settings, 4 runs at a time
  python bench/lowcomm_compare.py --out=sweep --methods=ddp,diloco --inner_steps=100,25,10 \
      --outer=0.7/0.9,1.0/0.0 --jobs=4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if "--gpu" not in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # LLVM level 0: at these sizes compiling dominates; the HLO, and so every value, is unchanged.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                             " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402
from training.loop import train  # noqa: E402

MODEL = ["model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=192",
         "model.vocab_size=264", "data.seq_len=64", "data.global_batch=16", "data.max_corpus_bytes=2000000"]
METHODS = {
    "ddp": ["sharding.replica=sync"],
    "diloco": ["sharding.replica=diloco"],
    "streaming_diloco": ["sharding.replica=streaming_diloco", "lowcomm.fragments=2", "lowcomm.delay=1",
                         "lowcomm.mix=0.5", "lowcomm.quant_bits=4"],
    "sparseloco": ["sharding.replica=sparseloco", "lowcomm.topk_fraction=0.02", "lowcomm.quant_bits=2",
                   "lowcomm.outer_lr=1.0", "lowcomm.outer_momentum=0.95"],
    "noloco": ["sharding.replica=noloco", "lowcomm.noloco_gamma=0.5"],
    "co2": ["sharding.replica=co2", "lowcomm.staleness_penalty=0.5", "lowcomm.momentum_clip=0"],
}


def records(workdir: str, split: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def label(name: str, inner_steps: int, outer: str) -> str:
  """A run's name in the table: the method, then (for the DiLoCo family) H and the outer lr/momentum."""
  if name == "ddp":
    return name
  return name + f" H={inner_steps}" + (f" outer {outer}" if outer else "")


def run(name: str, inner_steps: int, outer: str, args) -> dict:
  """One training run of `name` (H = `inner_steps`; `outer` "LR/MOMENTUM" or "" for METHODS' own)."""
  knobs = list(METHODS[name])
  if outer and name != "ddp":
    lr, momentum = outer.split("/")
    knobs += [f"lowcomm.outer_lr={float(lr)}", f"lowcomm.outer_momentum={float(momentum)}"]
  overrides = MODEL + [f"mesh.replica={args.replicas}", "mesh.data=-1", f"train.steps={args.steps}",
                       f"lowcomm.inner_steps={inner_steps}", f"train.eval_every={args.eval_every}",
                       "train.eval_batches=8", "train.log_every=1", "checkpoint.enabled=false"] + knobs + args.set
  config = configs.get_config("tiny", overrides)
  workdir = tempfile.mkdtemp(prefix=f"lowcomm-{name}-")
  t0 = time.perf_counter()
  result = train(config, workdir)
  wall = time.perf_counter() - t0
  tokens_per_step = config.data.global_batch * config.data.seq_len
  train_rec, eval_rec = records(workdir, "train"), records(workdir, "eval")
  if name == "ddp":
    from training.state import setup_from_config
    per_step = 4.0 * setup_from_config(config).n_params
    sent = [per_step] * args.steps
  else:
    # log_every=1: every step has its record.
    by_step = {r["step"]: r.get("bytes_sent", 0.0) for r in train_rec}
    sent = [by_step.get(s, 0.0) for s in range(1, args.steps + 1)]
  cumulative = []
  total = 0.0
  for b in sent:
    total += b
    cumulative.append(total)
  return {"name": label(name, inner_steps, outer), "method": name, "overrides": overrides, "wall_s": wall, "final_train_loss": result["loss"],
          "final_eval_loss": result.get("eval_loss"),
          "train": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"],
                     "bytes": cumulative[r["step"] - 1]} for r in train_rec],
          "eval": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"],
                    "bytes": cumulative[r["step"] - 1]} for r in eval_rec],
          "bytes_per_replica": total}


def plot(results: list[dict], out: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for x_key, x_label, log_x, fname in (("tokens", "tokens", False, "loss_vs_tokens.png"),
                                       ("bytes", "bytes sent per replica", True, "loss_vs_bytes.png")):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
      pts = [p for p in r["eval"] if not log_x or p["bytes"] > 0]
      ax.plot([p[x_key] for p in pts], [p["loss"] for p in pts], marker="o", ms=3, label=r["name"])
    ax.set_xlabel(x_label)
    ax.set_ylabel("eval loss")
    if log_x:
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, fname)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def run_all(runs: list[tuple], args) -> list[dict]:
  """Every run, in this process (--jobs=1) or `args.jobs` at a time, each as this script on one run."""
  if args.jobs <= 1:
    results = []
    for spec in runs:
      results.append(run(*spec, args))
      print(f"{results[-1]['name']}: eval {results[-1]['final_eval_loss']:.4f} in {results[-1]['wall_s']:.0f}s",
            flush=True)
    return results
  import subprocess
  pending, active, parts = list(enumerate(runs)), [], {}
  while pending or active:
    while pending and len(active) < args.jobs:
      i, (name, h, outer) = pending.pop(0)
      part = os.path.join(args.out, f"part{i}")
      cmd = [sys.executable, os.path.abspath(__file__), f"--out={part}", f"--methods={name}", f"--inner_steps={h}",
             f"--outer={outer}", f"--steps={args.steps}", f"--eval_every={args.eval_every}",
             f"--replicas={args.replicas}", "--no_plots"] + [f"--set={o}" for o in args.set] + (["--gpu"] if args.gpu else [])
      active.append((i, part, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1)
    for entry in [a for a in active if a[2].poll() is not None]:
      active.remove(entry)
      i, part, proc = entry
      if proc.returncode:
        raise RuntimeError(f"run {runs[i]} exited with {proc.returncode}")
      with open(os.path.join(part, "results.json")) as f:
        parts[i] = json.load(f)["results"][0]
      print(f"{parts[i]['name']}: eval {parts[i]['final_eval_loss']:.4f} in {parts[i]['wall_s']:.0f}s", flush=True)
  return [parts[i] for i in range(len(runs))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for results.json and the PNGs")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--inner_steps", default="100", help="H of the DiLoCo family (comma-separated: one run each)")
  parser.add_argument("--outer", default="", help="outer LR/MOMENTUM settings, comma-separated, one run each "
                      "(default: each method's own in METHODS); DiLoCo's paper uses 0.7/0.9")
  parser.add_argument("--set", action="append", default=[], help="a config override for every run (e.g. "
                      "data.global_batch=64), as train.py's --set")
  parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
  parser.add_argument("--eval_every", type=int, default=100)
  parser.add_argument("--replicas", type=int, default=4)
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument("--gpu", action="store_true", help="run on the default JAX backend instead of 8 CPU devices")
  parser.add_argument("--ddp_from", default="", help="a results.json whose DDP run (same steps, model and data) "
                      "is the baseline, instead of training DDP again")
  parser.add_argument("--no_plots", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  runs = [(name, int(h), outer) for name in args.methods.split(",")
          for h in (args.inner_steps.split(",") if name != "ddp" else [args.inner_steps.split(",")[0]])
          for outer in (args.outer.split(",") if name != "ddp" else [""])]
  results = run_all(runs, args)
  if args.ddp_from:
    with open(args.ddp_from) as f:
      results.insert(0, next(r for r in json.load(f)["results"] if r["name"] == "ddp"))
  ddp = next((r for r in results if r["name"] == "ddp"), None)
  for r in results:
    r["gap_to_ddp"] = (r["final_eval_loss"] / ddp["final_eval_loss"] - 1) if ddp else None
    r["bytes_saving_vs_ddp"] = (ddp["bytes_per_replica"] / r["bytes_per_replica"]
                                if ddp and r["bytes_per_replica"] else None)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"args": vars(args), "results": results}, f, indent=1)
  if args.no_plots:
    return
  paths = plot(results, args.out)
  print(f"\nwrote {os.path.join(args.out, 'results.json')}, {', '.join(paths)}")
  print(f"{args.steps} steps, {args.replicas} replicas, identical batches\n")
  print(f"{'method':<34}{'train loss':>11}{'eval loss':>11}{'gap to DDP':>12}{'bytes/replica':>15}{'fewer bytes':>13}")
  for r in results:
    gap = f"{100 * r['gap_to_ddp']:+.2f}%" if r["gap_to_ddp"] is not None else "-"
    saving = f"{r['bytes_saving_vs_ddp']:.0f}x" if r["bytes_saving_vs_ddp"] else "-"
    print(f"{r['name']:<34}{r['final_train_loss']:>11.4f}{r['final_eval_loss']:>11.4f}{gap:>12}"
          f"{r['bytes_per_replica']:>15.3g}{saving:>13}")


if __name__ == "__main__":
  main()
