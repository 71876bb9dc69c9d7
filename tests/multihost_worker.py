"""Started by tests/test_multihost.py as one of two processes: prints which process owns each device
of the meshes that `make_mesh` builds across hosts, as one JSON line.

  python tests/multihost_worker.py --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.mesh import initialize_distributed, make_mesh  # noqa: E402

# name -> non-trivial axis sizes, as the tests name the layouts
LAYOUTS = {"data_parallel": {"data": 8}, "hybrid": {"data": 2, "fsdp": 4}, "fsdp_tensor": {"fsdp": 4, "tensor": 2}}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  args = parser.parse_args()
  initialize_distributed(args.coordinator, args.num_processes, args.process_id)

  import jax
  import numpy as np
  out = {}
  for name, sizes in LAYOUTS.items():
    mesh = make_mesh(sizes)
    owners = np.vectorize(lambda d: d.process_index)(mesh.devices)
    out[name] = {"axes": list(mesh.axis_names), "shape": list(owners.shape), "process": owners.tolist(),
                 "process_count": jax.process_count()}
  print("MESHES " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
