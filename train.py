"""Train a shardlab model.

  python train.py --config=tiny --workdir=runs/tiny
  python train.py --config=1b --set mesh.fsdp=8 --set sharding.zero_stage=3 --workdir=runs/1b

A workdir that already holds checkpoints is resumed. Multi-host: start one process per host with
the same --coordinator and --num_processes and its own --process_id. A configuration error is
printed as one line naming the field, the value and the rule, and the exit status is 2.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags

import configs
from configs.entry import run_entry_point

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", f"Preset to start from: one of {sorted(configs.PRESETS)}.")
flags.DEFINE_multi_string("set", [], "Override one config field, as section.field=value "
                          "(e.g. --set model.d_model=256 --set mesh.fsdp=4). Repeatable; applied in order.")
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics.jsonl, TensorBoard "
                    "events and config.json. An existing run there is resumed.")
flags.DEFINE_string("coordinator", None, "Multi-host: host:port of process 0's coordinator service. "
                    "Leave unset for a single process.")
flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
flags.DEFINE_list("local_device_ids", None, "Multi-host: device ids this process owns (default: all visible).")


def _run() -> None:
  config = configs.get_config(FLAGS.config, FLAGS.set)
  # XLA flags and multi-host start-up must come before anything touches a JAX backend.
  from parallel.xla_flags import apply_default_flags
  apply_default_flags(device_loops=config.model.n_experts > 0)
  from parallel.mesh import initialize_distributed
  ids = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
  initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, ids)
  from training.loop import train
  result = train(config, FLAGS.workdir)
  logging.getLogger("shardlab").info("done: %s", json.dumps(result))


def main(argv):
  del argv
  run_entry_point(_run)


if __name__ == "__main__":
  app.run(main)
