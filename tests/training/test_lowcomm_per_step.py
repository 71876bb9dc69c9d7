"""1-bit Adam as the islands' update in the low-communication runner, on replica=4 x fsdp=2
(ZeRO-3 inside each island), past its freeze step: the islands stay identical and the byte
account the rule logs equals the compiled program's collectives over `replica`. (EControl runs the
same path; its exchange on islands of two devices is checked against the compiled program in
tests/parallel/test_econtrol.py. Before the freeze step: tests/training/test_lowcomm.py.)"""

import jax
import numpy as np

from configs.base import OptimizerConfig
from tests.training import hlo_collectives
from tests.training.test_lowcomm import R, batches, config, host, run_lowcomm

MESH = {"replica": R, "fsdp": 2}
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, grad_clip=1.0)


def test_compressed_steps_bytes_match_compiled_collectives():
  runner, state, losses, records = run_lowcomm(config(MESH, replica="onebit_adam", zero=3, optimizer=OPT,
                                                      freeze_step=1), batches(1) * 3)
  # (a variance frozen after one step is a poor preconditioner: only finiteness is asked here;
  # tests/parallel/test_onebit_adam.py shows convergence with a real warm-up)
  assert all(np.isfinite(losses))
  warm, compressed = records[0]["bytes_sent"], records[1]["bytes_sent"]
  assert records[2]["bytes_sent"] == compressed and compressed < warm / 10
  for r in range(1, R):  # the islands' parameters stay identical without being sent
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[r], x[0]), host(state["params"]))

  mesh_shape = tuple(runner.mesh.devices.shape)
  axis = list(runner.mesh.axis_names).index("replica")
  island = int(np.prod(mesh_shape)) // R
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=runner.setup.batch_sharding)
           for k, v in batches(1)[0].items()}
  hlo = runner.program(runner.algorithm.events(1)).lower(runner.abstract_state, batch).compile().as_text()
  across = [c for c in hlo_collectives.collectives(hlo) if hlo_collectives.crosses_axis(c["groups"], mesh_shape, axis)]
  assert all(hlo_collectives.only_along_axis(c["groups"], mesh_shape, axis) for c in across)
  # the program holds both branches of the rule (warm-up psum and compressed exchange)
  assert island * sum(c["operand_bytes"] for c in across) == warm + compressed
