"""The training loop: config -> setup -> data -> steps, with logging, eval and checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from configs import Config
from data import make_dataset
from models.hf_moe import config_with_hf, params_from_dir
from models.transformer import flops_per_token
from training.checkpoint import Checkpointer, restore_params
from training.distill import Teacher
from training.lowcomm import LowCommRunner
from training.metrics import MetricsWriter, Throughput, format_duration
from training.state import (TrainSetup, bytes_per_device, has_router_bias, init_state, setup_from_config,
                            split_router_bias)
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


def to_global_batch(setup: TrainSetup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays laid out as the plan's batch sharding."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v) for k, v in local.items()}


def evaluate(setup: TrainSetup, eval_step, params, dataset, n_batches: int, router_bias=None) -> float:
  """Mean loss per counted token over the first `n_batches` validation batches (`router_bias`: the
  state's, for a model with experts)."""
  total = count = 0.0
  for i in range(n_batches):
    loss_sum, n = eval_step(params, to_global_batch(setup, dataset.get_batch(i)), router_bias)
    total, count = total + float(loss_sum), count + float(n)
  return total / max(count, 1.0)


def _describe(setup: TrainSetup, state: Any) -> str:
  mesh = setup.plan.mesh
  axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "single device"
  mib = lambda t: bytes_per_device(t) / 2**20
  strategies = setup.plan.strategies
  context = (f"; attention={strategies.attention} ({strategies.layout})" if mesh.shape["seq"] > 1 else "")
  context += f"; replica={strategies.replica}" if strategies.replica != "sync" else ""
  return (f"mesh: {axes} ({mesh.devices.size} devices, {jax.process_count()} processes); "
          f"zero_stage={setup.config.sharding.zero_stage}{context}\n"
          f"parameters: {setup.n_params:,}; per device: params {mib(state['params']):.2f} MiB, "
          f"optimizer state {mib(state['opt_state']):.2f} MiB")


def _initial_state(setup: TrainSetup, ckpt: Checkpointer | None, train_data, runner=None) -> tuple[dict, int]:
  """(state, first step): the newest own checkpoint, else `init_params_from` or `init_from_hf`,
  else a fresh init.
  `runner`: a low-communication run's `LowCommRunner`, whose state this is."""
  config = setup.config
  abstract = runner.abstract_state if runner else setup.abstract_state
  init = runner.init if runner else lambda params=None: init_state(setup, params)
  restored = ckpt.restore_latest(abstract, config) if ckpt else None
  if restored:
    start, state, data_state = restored
    train_data.set_state(data_state)
    log.info("resumed from the checkpoint at step %d in %s", start, ckpt.directory)
    return state, start
  source = config.checkpoint.init_params_from
  if source:
    step, params = restore_params(source, setup.abstract_state["params"], config)
    log.info("initialised the parameters from step %d of %s (optimizer state new)", step, source)
    return init(params), 0
  if config.checkpoint.init_from_hf:
    params = params_from_dir(config.checkpoint.init_from_hf, config.model)
    if has_router_bias(config):  # zeros on import (HF routers have none): the state's own zeros
      params, _ = split_router_bias(params, setup.abstract_state["router_bias"])
    # Host arrays -> global arrays in the parameters' layout (each process places its own shards).
    params = jax.tree.map(lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda i: x[i]),
                          params, setup.abstract_state["params"])
    log.info("initialised the parameters from %s (optimizer state new)", config.checkpoint.init_from_hf)
    return init(params), 0
  return init(), 0


def train(config: Config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns the last train and eval metrics.

  Validates `config` (raising `ConfigError` before anything is written or compiled), writes
  `config.json`, then trains, logging to `metrics.jsonl` and TensorBoard and checkpointing. With
  `checkpoint.init_from_hf`, the model section is that directory's architecture (written so).
  """
  if config.checkpoint.init_from_hf:
    config = config_with_hf(config, config.checkpoint.init_from_hf)
  setup = setup_from_config(config)
  proc, nproc = jax.process_index(), jax.process_count()
  data_args = dict(vocab_size=config.model.vocab_size, process_index=proc, process_count=nproc)
  balance = setup.plan.data_parallel_size if config.data.balance_attention else 0
  train_data = make_dataset(config.data, split="train", balance_ranks=balance, **data_args)
  val_data = (make_dataset(config.data, split="validation", **data_args)
              if config.data.val_fraction > 0 or config.data.source == "synthetic" else None)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint) if config.checkpoint.enabled else None
  runner = LowCommRunner(setup) if setup.plan.strategies.replica != "sync" else None
  writer = stop = None
  try:
    state, start = _initial_state(setup, ckpt, train_data, runner)
    if proc == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    log.info(_describe(setup, state))
    writer = MetricsWriter(workdir, enabled=proc == 0, resume_step=start)
    stop = StopSignal()
    return _run(setup, state, start, train_data, val_data, ckpt, writer, stop, runner)
  finally:
    if stop:
      stop.restore()
    if ckpt:
      ckpt.close()
    if writer:
      writer.close()


def _run(setup: TrainSetup, state, start: int, train_data, val_data, ckpt, writer, stop, runner=None) -> dict[str, Any]:
  config = setup.config
  train_step = runner.step_fn(start) if runner else make_train_step(setup)
  teacher = Teacher.from_run(setup) if config.distill.teacher else None
  with_teacher = teacher.add_logits if teacher else lambda batch: batch
  eval_step = make_eval_step(setup)
  eval_params = runner.eval_params if runner else lambda state: state["params"]
  tokens_per_step = config.data.global_batch * config.data.seq_len
  meter = Throughput(tokens_per_step, flops_per_token(config.model, setup.n_params, config.data.seq_len))
  step, total = start, config.train.steps
  last = {}
  pending = None  # (step, metrics) of a log step, read once the step after it is queued
  if step >= total:
    log.info("the run in this workdir already reached train.steps=%d; raise it to train further", total)

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
    if "load_imbalance" in last:  # a model with experts (a pipeline logs the load only)
      losses = (f" dropped {100 * last['dropped_fraction']:.1f}% router loss {last['router_loss']:.4f}"
                if "router_loss" in last else "")
      rate = (f" | experts: imbalance {last['load_imbalance']:.2f} (worst layer {last['load_imbalance_max']:.2f})"
              f"{losses}{rate}")
    sent = f" | sent {last['bytes_sent']:.3g} B/replica" if "bytes_sent" in last else ""
    kl = f" distill_kl {last['distill_kl']:.4f}" if "distill_kl" in last else ""
    log.info("step %d/%d loss %.4f%s grad_norm %.3f lr %.2e%s%s", logged_step, total, last["loss"], kl,
             last["grad_norm"], last["lr"], sent, rate)

  t_start = time.perf_counter()
  while step < total and stop.received is None:
    state, metrics = train_step(state, with_teacher(to_global_batch(setup, next(train_data))))
    step += 1
    if step == start + 1:
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
      last["eval_loss"] = evaluate(setup, eval_step, eval_params(state), val_data, config.train.eval_batches,
                                   state.get("router_bias"))
      writer.write(step, {"loss": last["eval_loss"]}, split="eval")
      log.info("step %d eval loss %.4f", step, last["eval_loss"])
      meter.reset(step)
    if ckpt and (ckpt.due(step) or step == total or stop.received is not None):
      ckpt.save(step, state, train_data.get_state(), config)
  report()
  if stop.received is not None:
    log.info("received signal %d: saved step %d, stopping", stop.received, step)
  return {"step": step, **last}
