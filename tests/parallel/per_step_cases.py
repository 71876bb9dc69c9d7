"""The replica mesh, leaf shapes and shard_map harness shared by the tests of the per-step
algorithms over `replica` (1-bit Adam, EControl): a replica axis of 4, one bias-like leaf of 13
values (padding inside the last chunk) left out of weight decay and one matrix decayed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.mesh import make_mesh

R = 4
SHAPES = {"b": (13,), "w": (6, 10)}  # 13 values: padding inside the last server's chunk
MASK = {"b": False, "w": True}


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"replica": R}, jax.devices()[:R])


def update_fn(opt, mesh):
  """As training/lowcomm.py runs it: every array one copy per replica, [R, ...] split over `replica`."""
  def body(grads, state, params, step, lr):
    own = lambda tree: jax.tree.map(lambda x: x[0], tree)
    params, state, sent = opt.update(own(grads), own(state), own(params), axis="replica", step=step, lr=lr)
    return jax.tree.map(lambda x: x[None], (params, state)), sent

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("replica"), P("replica"), P("replica"), P(), P()),
                               out_specs=(P("replica"), P()), axis_names=frozenset({"replica"}), check_vma=True))


def tile(tree):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (R, *x.shape)), tree)


def single(stacked):
  """The replicas' copies, checked equal; returns the first."""
  for leaf in jax.tree.leaves(stacked):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  return jax.tree.map(lambda x: x[0], stacked)
