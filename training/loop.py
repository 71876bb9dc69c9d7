"""The training loop: config -> mesh -> model -> data -> steps, with logging, eval and checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from configs import Config, validate
from data import make_dataset
from models.transformer import flops_per_token
from parallel.mesh import make_mesh
from parallel.rules import make_plan
from training.checkpoint import Checkpointer
from training.metrics import MetricsWriter, Throughput, format_duration
from training.state import TrainSetup, build_setup, bytes_per_device, init_state
from training.step import make_eval_step, make_train_step

log = logging.getLogger("shardlab")


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag so the loop can save a checkpoint and exit cleanly."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, _frame):
    self.received = signum

  def restore(self) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def setup_for(config: Config) -> TrainSetup:
  """Validates the config against the devices present and builds mesh, plan and train setup."""
  sizes = validate(config, jax.device_count())
  mesh = make_mesh(sizes, hybrid=config.mesh.hybrid)
  s = config.sharding
  plan = make_plan(mesh, zero_stage=s.zero_stage, sequence_parallel=s.sequence_parallel,
                   vocab_parallel=s.vocab_parallel)
  return build_setup(config, plan)


def to_global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays laid out as the plan's batch sharding."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v) for k, v in local.items()}


def evaluate(setup: TrainSetup, eval_step, params, dataset, n_batches: int) -> float:
  """Mean token loss over the first `n_batches` validation batches."""
  total = count = 0.0
  for i in range(n_batches):
    loss_sum, n = eval_step(params, to_global_batch(setup, dataset.get_batch(i)))
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)


def _describe(setup: TrainSetup, state: Any) -> str:
  mesh = setup.plan.mesh
  axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "single device"
  mib = lambda t: bytes_per_device(t) / 2**20
  return (f"mesh: {axes} ({mesh.devices.size} devices, {jax.process_count()} processes); "
          f"zero_stage={setup.config.sharding.zero_stage}\n"
          f"parameters: {setup.n_params:,}; per device: params {mib(state['params']):.2f} MiB, "
          f"optimizer state {mib(state['opt_state']):.2f} MiB")


def train(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the last train and eval metrics."""
  setup = setup_for(config)
  proc, nproc = jax.process_index(), jax.process_count()
  train_data = make_dataset(config.data, vocab_size=config.model.vocab_size, split="train",
                            process_index=proc, process_count=nproc)
  val_data = (make_dataset(config.data, vocab_size=config.model.vocab_size, split="validation",
                           process_index=proc, process_count=nproc)
              if config.data.val_fraction > 0 or config.data.source == "synthetic" else None)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint) if config.checkpoint.enabled else None

  restored = ckpt.restore_latest(setup.abstract_state) if ckpt else None
  if restored:
    start, state, data_state = restored
    train_data.set_state(data_state)
    log.info("resumed from the checkpoint at step %d in %s", start, workdir)
  else:
    state = init_state(setup)
  log.info(_describe(setup, state))

  train_step, eval_step = make_train_step(setup), make_eval_step(setup)
  tokens_per_step = config.data.global_batch * config.data.seq_len
  meter = Throughput(tokens_per_step, flops_per_token(config.model, setup.n_params, config.data.seq_len))
  writer = MetricsWriter(workdir, enabled=proc == 0)
  stop = StopSignal()
  step, total = int(state["step"]), config.train.steps
  first_step, last = step, {}
  pending = None  # (step, metrics) of a log step, read once the step after it is queued

  def report() -> None:
    """Logs the pending step's metrics (reading them waits for that step), if any."""
    nonlocal last, pending
    if pending is None:
      return
    (logged_step, metrics), pending = pending, None
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step
    last.update(meter.measure(logged_step))
    writer.write(logged_step, last)
    rate = ""
    if "step_time_s" in last:
      mfu = f" mfu {100 * last['mfu']:.1f}%" if "mfu" in last else ""
      rate = (f" | {last['step_time_s']:.3f}s/step {last['tokens_per_s']:.0f} tokens/s{mfu}"
              f" | eta {format_duration(last['step_time_s'] * (total - logged_step))}")
    log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e%s", logged_step, total, last["loss"],
             last["grad_norm"], last["lr"], rate)

  t_start = time.perf_counter()
  try:
    while step < total and stop.received is None:
      state, metrics = train_step(state, to_global_batch(setup, next(train_data)))
      step += 1
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        log.info("step %d compiled and ran in %.1fs", step, time.perf_counter() - t_start)
        meter.reset(step)
      # The previous log step is read only now, with this step queued behind it, so the device
      # stays busy while the host logs and prepares the next batch.
      report()
      if step % config.train.log_every == 0 or step == total:
        pending = (step, metrics)
      if val_data is not None and (step % config.train.eval_every == 0 or step == total):
        report()
        last["eval_loss"] = evaluate(setup, eval_step, state["params"], val_data, config.train.eval_batches)
        writer.write(step, {"loss": last["eval_loss"]}, split="eval")
        log.info("step %d eval loss %.4f", step, last["eval_loss"])
        meter.reset(step)
      if ckpt and (ckpt.due(step) or step == total or stop.received is not None):
        ckpt.save(step, state, train_data.get_state())
    report()
    if stop.received is not None:
      log.info("received signal %d: saved step %d, stopping", stop.received, step)
  finally:
    stop.restore()
    if ckpt:
      ckpt.close()
    writer.close()
  return {"step": step, **last}
