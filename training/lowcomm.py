"""The runner that makes `replica` the axis across which islands train on their own.

With `sharding.replica` other than "sync", every train step is one compiled program: a
`jax.shard_map` manual over `replica` only, inside which one island runs the repo's own pure step
(`training.step.make_train_step_fn`) on its rows of the batch, exactly as a run on the island's
devices alone would: DDP, ZeRO-1/2/3, tensor and sequence parallelism inside the island are the
plan's rules, unchanged (they leave the manual `replica` out of every spec; a pipeline or context
parallelism inside an island is refused by validation for now). Around that inner
step the algorithm of `parallel/lowcomm/` (`dispatch.algorithm`) runs its outer work, the only
thing that crosses `replica`.

State (a pure pytree; every per-island array has a leading [replica] dimension split over
`replica`, so each island holds exactly its own, as a replicated array would take):

  params     [R, ...] each island's parameters
  opt_state  [R, ...] each island's inner AdamW state
  step       [] int32, the number of inner steps taken
  outer      [R, ...] the algorithm's outer state (outer parameters, momentum, error feedback, ...)

It is checkpointed and restored with the rest (`training.checkpoint`), onto another mesh too, as
long as `mesh.replica` is the same. Which outer work runs around inner step t is static
(`algorithm.events(t)`): the host picks one of a few compiled programs per step, so a program
without an outer step holds no collective over `replica` at all. Bytes sent per replica
(`parallel/lowcomm/outer.py`'s account) are logged with the metrics as `bytes_sent`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import P
from jax.sharding import NamedSharding

import optax

from parallel.lowcomm import dispatch
from parallel.lowcomm.econtrol import EControl
from parallel.lowcomm.onebit_adam import OneBitAdam
from parallel.lowcomm.zeroth_order import zo_init, zo_step
from training.grad import make_compute_params, make_grad_fn
from training.loss import loss_sum_and_count, uses_segments
from training.optimizer import learning_rate_schedule, matrix_mask
from training.state import TrainSetup, init_state
from training.step import make_train_step_fn

AXIS = "replica"
PER_STEP = ("onebit_adam", "econtrol", "zeroth_order")  # they replace the optimizer's update, every step


def _specs(tree: Any) -> Any:
  """NamedShardings -> their PartitionSpecs: inside the shard_map, constraints name only the
  island's axes, on the context's (partly manual) mesh."""
  return jax.tree.map(lambda s: s.spec, tree)


def island_setup(setup: TrainSetup) -> TrainSetup:
  """`setup` with the constraints the step applies inside an island expressed as bare specs."""
  return dataclasses.replace(setup, grad_shardings=_specs(setup.grad_shardings),
                             opt_param_shardings=_specs(setup.opt_param_shardings))


class LowCommRunner:
  """Builds the state, the per-step programs and the helpers of a low-communication run."""

  def __init__(self, setup: TrainSetup):
    self.setup = setup
    self.mesh = setup.plan.mesh
    cfg = setup.config
    self.replicas = self.mesh.shape[AXIS]
    name = setup.plan.strategies.replica
    self.per_step = name in PER_STEP
    if self.per_step:
      self.algorithm = _PerStep(island_setup(setup), name, self.replicas)
    else:
      self.algorithm = dispatch.algorithm(name, cfg.lowcomm, cfg.model.n_layers, self.replicas)
      self.inner = make_train_step_fn(island_setup(setup))
    self._programs: dict[Any, Callable] = {}
    self.bytes_by_events: dict[Any, int] = {}

    stack = lambda s: NamedSharding(self.mesh, P(AXIS, *s.spec))
    base = setup.abstract_state
    abstract_outer = jax.eval_shape(self.algorithm.init, base["params"])
    params_def = jax.tree.structure(base["params"])
    # Outer trees shaped like the parameters live where the optimizer state does (ZeRO-1 and up:
    # sharded); anything else is replicated inside the island.
    like_params = lambda v: jax.tree.structure(v) == params_def
    outer_sh = jax.tree.map(lambda v: setup.opt_param_shardings if like_params(v) else setup.plan.replicated,
                            abstract_outer, is_leaf=like_params)
    # A per-step algorithm keeps its own optimizer state (in `outer`); the inner AdamW's is empty.
    opt_sh = {} if self.per_step else setup.state_shardings["opt_state"]
    self.state_shardings = {"params": jax.tree.map(stack, setup.state_shardings["params"]),
                            "opt_state": jax.tree.map(stack, opt_sh),
                            "step": setup.plan.replicated,
                            "outer": jax.tree.map(stack, outer_sh)}
    with_r = lambda x, s: jax.ShapeDtypeStruct((self.replicas, *x.shape), x.dtype, sharding=s)
    self.abstract_state = {
        "params": jax.tree.map(with_r, base["params"], self.state_shardings["params"]),
        "opt_state": jax.tree.map(with_r, {} if self.per_step else base["opt_state"],
                                  self.state_shardings["opt_state"]),
        "step": base["step"],
        "outer": jax.tree.map(with_r, abstract_outer, self.state_shardings["outer"])}
    self._metric_sharding = NamedSharding(self.mesh, P(AXIS))

  # ---- state -------------------------------------------------------------------------------

  def init(self, params: Any = None) -> dict:
    """Every island starts from the same parameters (a fresh init, or `params`) and a fresh state."""
    base = init_state(self.setup, params)
    r = self.replicas

    def stack(base):
      tile = lambda x: jnp.broadcast_to(x, (r, *x.shape))
      opt = {} if self.per_step else base["opt_state"]
      return {"params": jax.tree.map(tile, base["params"]), "opt_state": jax.tree.map(tile, opt),
              "step": base["step"], "outer": jax.tree.map(tile, self.algorithm.init(base["params"]))}

    return jax.jit(stack, in_shardings=(self.setup.state_shardings,), out_shardings=self.state_shardings)(base)

  def eval_params(self, state: dict) -> Any:
    """The islands' mean parameters, in the plan's parameter layout (an evaluation-time average,
    not part of training's traffic). Right after a DiLoCo sync every island holds exactly these."""
    if not hasattr(self, "_mean"):
      self._mean = jax.jit(lambda p: jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), p),
                           out_shardings=self.setup.state_shardings["params"])
    return self._mean(state["params"])

  # ---- steps -------------------------------------------------------------------------------

  def program(self, events: Any) -> Callable:
    """The compiled step for `events`: (state, batch) -> (state, per-replica metrics [R])."""
    if events in self._programs:
      return self._programs[events]
    algorithm = self.algorithm

    def island(state, batch):
      own = jax.tree.map(lambda x: x[0], {k: state[k] for k in ("params", "opt_state", "outer")})
      if self.per_step:
        params, outer, metrics = algorithm.step(own["params"], own["outer"], state["step"], batch)
        new = {"opt_state": own["opt_state"], "step": state["step"] + 1}
      else:
        params, outer, sent_before = algorithm.before(events, own["params"], own["outer"], axis=AXIS)
        new, metrics = self.inner({"params": params, "opt_state": own["opt_state"], "step": state["step"]}, batch)
        params, outer, sent_after = algorithm.after(events, new["params"], outer, axis=AXIS)
        self.bytes_by_events[events] = sent_before + sent_after  # static: known at trace time
      out = jax.tree.map(lambda x: x[None], {"params": params, "opt_state": new["opt_state"], "outer": outer})
      return {**out, "step": new["step"]}, jax.tree.map(lambda x: jnp.asarray(x)[None], metrics)

    specs = {"params": P(AXIS), "opt_state": P(AXIS), "outer": P(AXIS), "step": P()}
    # check_vma=False, as the pipeline executor's: the island's own shard_maps (vocabulary-parallel
    # embedding and loss, context-parallel attention) are built on the context mesh, and with
    # value-variance tracking their outputs, varying over the manual `replica`, name it again,
    # which Shardy rejects ("already bound by a parent"). Collectives are unchanged.
    local = jax.shard_map(island, mesh=self.mesh, axis_names=frozenset({AXIS}), in_specs=(specs, P(AXIS)),
                          out_specs=(specs, P(AXIS)), check_vma=False)
    fn = jax.jit(local, in_shardings=(self.state_shardings, self.setup.batch_sharding),
                 out_shardings=(self.state_shardings, self._metric_sharding), donate_argnums=0)
    self._programs[events] = fn
    return fn

  def summarize(self, metrics: dict) -> dict:
    """Per-replica metrics [R] -> the run's: mean loss, grad norm and rate, summed tokens (a
    separate small program, so the step's own holds only the algorithm's collectives)."""
    if not hasattr(self, "_summary"):
      self._summary = jax.jit(lambda m: {k: (jnp.sum(v) if k == "tokens" else jnp.mean(v)) for k, v in m.items()},
                              out_shardings=self.setup.plan.replicated)
    return self._summary(metrics)

  def step_fn(self, start: int) -> Callable:
    """(state, batch) -> (state, metrics) for steps start, start + 1, ... in order (the host
    counts steps to pick each one's program without waiting for the device)."""
    counter = [start]

    def step(state, batch):
      events = self.algorithm.events(counter[0])
      counter[0] += 1
      state, metrics = self.program(events)(state, batch)
      if self.per_step:  # bytes_sent is among the metrics (warm-up and compressed steps differ)
        return state, self.summarize(metrics)
      return state, {**self.summarize(metrics), "bytes_sent": float(self.bytes_by_events[events])}

    return step


class _PerStep:
  """1-bit Adam, EControl or the zeroth-order step in place of the inner AdamW update, every step:
  the island's gradients (not averaged over `replica`: the plan's gradient layout, reduced inside
  the island only) go to the algorithm, which does its own compressed exchange over `replica`.
  Its state is the runner's `outer` state; `events` is always () (one program)."""

  def __init__(self, setup: TrainSetup, name: str, replicas: int):
    cfg = setup.config
    self.name, self.replicas, self.cfg = name, replicas, cfg
    self.schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    mask = matrix_mask(setup.axes)
    if name == "onebit_adam":
      self.rule = OneBitAdam.from_config(cfg.optimizer, cfg.lowcomm, replicas, decay_mask=mask)
    elif name == "econtrol":
      self.rule = EControl.from_config(cfg.optimizer, cfg.lowcomm, decay_mask=mask)
    if name == "zeroth_order":
      masked, to_compute = uses_segments(cfg), make_compute_params(setup)

      def loss_fn(params, batch):
        loss_sum, count = loss_sum_and_count(setup.graphdef, to_compute(params), batch, setup.plan, masked)
        return loss_sum / jnp.maximum(count, 1.0)
      self.loss_fn = loss_fn
    else:
      self.grad_fn = make_grad_fn(setup)

  def init(self, params: Any) -> Any:
    if self.name == "zeroth_order":
      return zo_init(self.replicas, self.cfg.lowcomm.zo_directions)
    return self.rule.init(params)

  def events(self, step: int) -> tuple:
    return ()

  def step(self, params, state, step, batch):
    """(params, state, metrics with bytes_sent) after one step of this island."""
    lr = self.schedule(step)
    if self.name == "zeroth_order":
      c = self.cfg.lowcomm
      params, state, metrics, sent = zo_step(self.loss_fn, params, batch, state, axis=AXIS, seed=c.seed, step=step,
                                             eps=c.zo_eps, lr=lr, directions=c.zo_directions)
      tokens = jnp.sum(batch["loss_mask"])
      return params, state, {"loss": metrics["loss"], "grad_norm": jnp.zeros(()), "lr": lr, "tokens": tokens,
                             "bytes_sent": jnp.asarray(sent, jnp.float32)}
    # (expert statistics: {} here, as validation refuses a mixture of experts inside islands)
    grads, loss, count, _ = self.grad_fn(params, batch)
    params, state, sent = self.rule.update(grads, state, params, axis=AXIS, step=step, lr=lr)
    return params, state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr, "tokens": count,
                           "bytes_sent": jnp.asarray(sent, jnp.float32)}
