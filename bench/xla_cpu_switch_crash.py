"""The smallest program that crashes XLA:CPU in JAX 0.11.2, and the form the ring ops use instead.

Ring attention and its successors (all-gather-KV, TokenRing, USP) merge each arriving block into
the rows it touches, choosing the rows with a `lax.switch` on the block's position. With JAX
0.11.2 on CPU, compiling a `switch` inside a `shard_map` over two or more devices segfaults when
its branches mix a full-range update of an operand (`o.at[:].set(...)`) with a partial one
(`o.at[0:4].set(...)`). JAX 0.10.2 and 0.12 compile it. `parallel/attention/ring.py` writes a
full-range update as a plain value (`_set_rows`, `_add_rows`): the same values, and no crash.

Each variant runs in its own subprocess (a crash ends the process), on 2 emulated CPU devices:

  python bench/xla_cpu_switch_crash.py [--json out.json]

prints one row per variant (exit status: -11 is the segmentation fault) and the JAX version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROGRAM = """
import jax, jax.numpy as jnp
full_range = {full_range}
def branches(x):
  full = (lambda o: o.at[:].set(x * 2.0)) if full_range else (lambda o: x * 2.0)
  return [full, lambda o: o.at[0:4].set(x[0:4] * 2.0)]
mesh = jax.make_mesh((2,), ("s",), axis_types=(jax.sharding.AxisType.Auto,))
local = lambda o, x: jax.lax.switch(jax.lax.axis_index("s"), branches(x), o)
f = jax.shard_map(local, mesh=mesh, in_specs=(jax.P("s"),) * 2, out_specs=jax.P("s"), check_vma=True)
print(float(jax.jit(f)(jnp.zeros(16), jnp.ones(16)).sum()))
"""
VARIANTS = {"full-range .at[:].set in one branch (crashes on 0.11.2)": True,
            "the whole value instead (what ring.py does)": False}


def run(full_range: bool) -> tuple[int, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", PROGRAM.format(full_range=full_range)], env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout.strip()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="", help="where to write the results as JSON")
  args = parser.parse_args()
  import jax
  rows = []
  for name, full_range in VARIANTS.items():
    rc, out = run(full_range)
    rows.append({"variant": name, "exit_status": rc, "sum": out or None})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)
  print(f"JAX {jax.__version__} (CPU, 2 devices); both variants should print sum 24.0")
  for r in rows:
    print(f"{r['variant']:<58} exit {r['exit_status']:>4}  sum {r['sum']}")


if __name__ == "__main__":
  main()
