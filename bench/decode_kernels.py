"""How fast the Pallas products of `bench/pallas_gemv.py` stream a `1b` step's weights, against XLA.

For each of the `1b` layer's products (fused q/k/v with its norm, the output projection with its
residual, gate/up with its norm and SwiGLU, down with its residual; and the head), 16 distinct
weights (one per layer, so nothing stays in L2) are streamed by one jitted program:

  xla      `jnp.dot` of the rows by input-major [K, N] weights, with the same elementwise work
           around it written in jnp (what the decode loop runs today)
  pallas   the kernel on output-major [N, K] weights, for every block configuration of the sweep

and the weights' bytes over the time per layer are printed against the HBM bandwidth measured in
the same run. Then the time of one product against its width (K = 2048), fitted as a fixed cost
plus bytes over a rate, for XLA and both Pallas kernels; then a 16-layer chain of the four
products (attention left out: the first H x hd outputs of q/k/v stand in for its output) shows
what a step's products cost end to end. Every Pallas result is checked against the XLA one
(relative error). `--persistent` adds the same chain run by one resident kernel
(`bench/persistent_chain.py`: a grid barrier between products instead of a launch per product);
`--persistent_only` runs just XLA's chain and that. Prints a table last, writes JSON.

  PYTHONPATH=. python bench/decode_kernels.py --out=decode_kernels.json
  PYTHONPATH=. python bench/decode_kernels.py --persistent_only --persistent=128/2,4/256,512/4,8 --out=persistent.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

LAYERS = 16


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=2, help="rows per product (the engine decodes at least 2)")
  ap.add_argument("--fma", default="4/1024/4", help="block_n/block_k/num_warps values of the fma kernels")
  ap.add_argument("--dot", default="32,64/256/4/3,5", help="block_n/block_k/num_warps/num_stages of the dot kernels")
  ap.add_argument("--persistent", default="",
                  help="programs/block_n/block_k/num_warps values of bench/persistent_chain.py's one-launch chain "
                       "(e.g. 128/2,4/256,512/4,8); empty: not run")
  ap.add_argument("--persistent_only", action="store_true",
                  help="skip the per-product sweep and the fit: XLA's chain and the one-launch chain only")
  ap.add_argument("--repeats", type=int, default=30)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)
  import jax
  import jax.numpy as jnp

  from bench import pallas_gemv as dk
  from bench.serve_decode import hbm_bandwidth
  from bench.timing import queued_call_seconds
  from models.layers import rms_norm, swiglu

  bw = max(hbm_bandwidth(4.0).values())
  d, f, qkv, v = 2048, 5632, 4096, 32000
  b = args.rows
  key = iter(jax.random.split(jax.random.key(0), 4096))
  normal = lambda shape: (0.02 * jax.random.normal(next(key), shape)).astype(jnp.bfloat16)
  x = normal((b, d)) * 50
  g = 1.0 + normal((d,))
  # name: (N, K, the stacked count, Pallas call, XLA call); weights are [N, K] (Pallas) / [K, N] (XLA)
  xla_norm = lambda x: rms_norm(x, g, 1e-6).astype(jnp.bfloat16)
  cases = {
      "qkv+norm": (qkv, d, LAYERS, lambda x, w, c: dk.gemv(x, w, norm_scale_K=g, **c),
                   lambda x, w: jnp.dot(xla_norm(x), w)),
      "o+residual": (d, d, LAYERS, lambda x, w, c: dk.gemv(x, w, residual_BxN=x, **c),
                     lambda x, w: x + jnp.dot(x, w)),
      "gate_up+norm+swiglu": (f, d, LAYERS, lambda x, w, c: dk.gemv_swiglu(x, w, norm_scale_K=g, **c),
                              lambda x, w: (lambda y: swiglu(y[:, 0], y[:, 1]))(jnp.einsum("bd,dtf->btf", xla_norm(x), w))),
      "down+residual": (d, f, LAYERS, lambda x, w, c: dk.gemv(x, w, residual_BxN=x[:, :d], **c),
                        lambda x, w: x[:, :d] + jnp.dot(x, w)),
      "head+norm": (v, d, 1, lambda x, w, c: dk.gemv(x, w, norm_scale_K=g, **c),
                    lambda x, w: jnp.dot(xla_norm(x), w)),
  }
  if args.persistent_only:
    cases = {}
  report = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "hbm_bytes_per_s": bw,
            "rows": b, "cases": []}
  grid = lambda spec: itertools.product(*(map(int, part.split(",")) for part in spec.split("/")))
  configs = [{"method": "fma", "block_n": bn, "block_k": bk, "num_warps": nw} for bn, bk, nw in grid(args.fma)]
  configs += [{"method": "dot", "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": ns}
              for bn, bk, nw, ns in grid(args.dot)]
  best = {}
  for name, (n, k, count, pallas, xla) in cases.items():
    swig = name.startswith("gate_up")
    wp = [normal((n, 2, k) if swig else (n, k)) for _ in range(count)]
    wx = [jnp.transpose(w, (2, 1, 0)) if swig else w.T for w in wp]  # input-major copies for XLA
    xin = normal((b, k)) * 50
    nbytes = sum(w.nbytes for w in wp) / count
    t_xla = queued_call_seconds(jax.jit(lambda x, ws: [xla(x, w) for w in ws]), xin, wx, repeats=args.repeats) / count
    ref = jax.jit(xla)(xin, wx[0]).astype(jnp.float32)
    row = {"case": name, "n": n, "k": k, "bytes": nbytes, "xla_us": t_xla * 1e6, "xla_frac": nbytes / t_xla / bw,
           "pallas": []}
    for cfg in configs:
      if n % cfg["block_n"] or k % cfg["block_k"]:
        continue
      try:
        fn = jax.jit(lambda x, ws, cfg=cfg: [pallas(x, w, cfg) for w in ws])
        t = queued_call_seconds(fn, xin, wp, repeats=args.repeats) / count
        out = fn(xin, wp[:1])[0].astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
      except Exception as e:  # noqa: BLE001 - a configuration the compiler refuses is reported, not fatal
        row["pallas"].append({**cfg, "error": str(e)[:200]})
        continue
      row["pallas"].append({**cfg, "us": t * 1e6, "frac": nbytes / t / bw, "rel_err": err})
    ok = [p for p in row["pallas"] if "us" in p]
    row["best"] = min(ok, key=lambda p: p["us"]) if ok else None
    best[name] = row["best"]
    report["cases"].append(row)
    print(name, "xla", f"{t_xla * 1e6:.1f} us", "best", row["best"], flush=True)

  # What one product costs beyond its bytes: time against bytes over widths N (K = 2048), fitted
  # as t = fixed + bytes / rate, for XLA and for each Pallas way to sum.
  widths = (1024, 2048, 4096, 8192, 16384)
  fit_cfgs = {"xla": None, "pallas fma": {"method": "fma", "block_n": 4, "block_k": 1024, "num_warps": 4},
              "pallas dot": {"method": "dot", "block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 3}}
  report["fixed_cost"] = {}
  for label, cfg in fit_cfgs.items() if cases else ():
    pts = []
    for n in widths:
      wp = [normal((n, d)) for _ in range(LAYERS)]
      if cfg is None:
        fn, ws = jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws]), [w.T for w in wp]
      else:
        fn, ws = jax.jit(lambda x, ws, cfg=cfg: [dk.gemv(x, w, **cfg) for w in ws]), wp
      pts.append((2 * n * d, queued_call_seconds(fn, x, ws, repeats=args.repeats) / LAYERS))
    nbytes, secs = map(np.array, zip(*pts))
    slope, fixed = np.polyfit(nbytes, secs, 1)
    report["fixed_cost"][label] = {"points_bytes_s": pts, "fixed_us": fixed * 1e6, "rate_bytes_per_s": 1 / slope}
    print(label, "fixed", f"{fixed * 1e6:.2f} us", "rate", f"{1 / slope / 1e9:.0f} GB/s", flush=True)

  # A step's products, 16 layers chained (attention left out).
  keys = ("method", "block_n", "block_k", "num_warps", "num_stages")
  cfgs = {name: {k: best[name][k] for k in keys if k in best[name]} for name in best if best[name]}
  sweep_chain = bool(cases) and len(cfgs) == len(cases)
  if sweep_chain or args.persistent:
    layer = lambda shape: [normal(shape) for _ in range(LAYERS)]
    ws = wq, wo, wgu, wd = layer((qkv, d)), layer((d, d)), layer((f, 2, d)), layer((d, f))
    xs = [w.T for w in wq], [w.T for w in wo], [jnp.transpose(w, (2, 1, 0)) for w in wgu], [w.T for w in wd]

    def chain_xla(x, wq, wo, wgu, wd):
      for i in range(LAYERS):
        y = jnp.dot(xla_norm(x), wq[i])
        h = x + jnp.dot(y[:, :d], wo[i])
        gu = jnp.einsum("bd,dtf->btf", xla_norm(h), wgu[i])
        x = h + jnp.dot(swiglu(gu[:, 0], gu[:, 1]), wd[i])
      return x

    nbytes = LAYERS * sum(w[0].nbytes for w in ws)
    t_x = queued_call_seconds(jax.jit(chain_xla), x, *xs, repeats=args.repeats)
    out_x = jax.jit(chain_xla)(x, *xs).astype(jnp.float32)
    report["chain"] = {"layers": LAYERS, "bytes": nbytes, "xla_us": t_x * 1e6, "xla_frac": nbytes / t_x / bw}

  if sweep_chain:
    def chain_pallas(x, wq, wo, wgu, wd):
      for i in range(LAYERS):
        y = dk.gemv(x, wq[i], norm_scale_K=g, **cfgs["qkv+norm"])
        h = dk.gemv(y[:, :d], wo[i], residual_BxN=x, **cfgs["o+residual"])
        a = dk.gemv_swiglu(h, wgu[i], norm_scale_K=g, **cfgs["gate_up+norm+swiglu"])
        x = dk.gemv(a, wd[i], residual_BxN=h, **cfgs["down+residual"])
      return x

    t_p = queued_call_seconds(jax.jit(chain_pallas), x, *ws, repeats=args.repeats)
    out_p = jax.jit(chain_pallas)(x, *ws).astype(jnp.float32)
    report["chain"].update({"pallas_us": t_p * 1e6, "pallas_frac": nbytes / t_p / bw, "configs": cfgs,
                            "rel_err": float(jnp.linalg.norm(out_p - out_x) / jnp.linalg.norm(out_x))})

  if args.persistent:
    report["persistent"] = _persistent(grid(args.persistent), args.repeats, x, g, ws, out_x, nbytes, bw)

  with open(args.out, "w") as fh:
    json.dump(report, fh, indent=1)
  print(f"\ndecode kernels on {report['device_kind']}, {b} rows; HBM {bw / 1e9:,.0f} GB/s measured")
  print(f"{'product':>20} {'MB':>6} | {'XLA us':>7} {'%HBM':>5} | {'Pallas us':>9} {'%HBM':>5} {'rel err':>8}  config")
  for r in report["cases"]:
    p = r["best"] or {}
    print(f"{r['case']:>20} {r['bytes'] / 1e6:6.1f} | {r['xla_us']:7.1f} {100 * r['xla_frac']:5.0f} | "
          f"{p.get('us', float('nan')):9.1f} {100 * p.get('frac', float('nan')):5.0f} {p.get('rel_err', float('nan')):8.1e}"
          f"  {p.get('method')} n{p.get('block_n')} k{p.get('block_k')} w{p.get('num_warps')} s{p.get('num_stages', '-')}")
  for label, f in report["fixed_cost"].items():
    us = " ".join(f"{t * 1e6:6.1f}" for _, t in f["points_bytes_s"])
    print(f"{label:>20} us per product at N = {', '.join(map(str, widths))} (K = 2048): {us}; "
          f"fit t = {f['fixed_us']:.2f} us + bytes / {f['rate_bytes_per_s'] / 1e9:,.0f} GB/s")
  if "pallas_us" in report.get("chain", {}):
    c = report["chain"]
    print(f"{'16-layer chain':>20} {c['bytes'] / 1e6:6.0f} | {c['xla_us']:7.0f} {100 * c['xla_frac']:5.0f} | "
          f"{c['pallas_us']:9.0f} {100 * c['pallas_frac']:5.0f} {c['rel_err']:8.1e}")
  for p in report.get("persistent", []):
    c = report["chain"]
    cfg = f"p{p['programs']} n{p['block_n']} k{p['block_k']} w{p['num_warps']}"
    if "us" in p:
      print(f"{'one-launch chain':>20} {c['bytes'] / 1e6:6.0f} | {c['xla_us']:7.0f} {100 * c['xla_frac']:5.0f} | "
            f"{p['us']:9.0f} {100 * p['frac']:5.0f} {p['rel_err']:8.1e}  {cfg}")
    else:
      print(f"{'one-launch chain':>20} {cfg}: {p['error']}")


def _persistent(configs, repeats: int, x, g, per_layer, want, nbytes: float, bw: float) -> list[dict]:
  """bench/persistent_chain.py's one-launch chain for every (programs, block_n, block_k, num_warps)
  of `configs`: time, fraction of HBM, relative error against XLA's chain (`want`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from bench import persistent_chain
  from bench.timing import queued_call_seconds

  stacked = [jnp.stack(ws) for ws in per_layer]
  rows = []
  for programs, block_n, block_k, num_warps in configs:
    cfg = {"programs": programs, "block_n": block_n, "block_k": block_k, "num_warps": num_warps}
    try:
      fn = jax.jit(lambda x, *ws, cfg=cfg: persistent_chain.chain(x, g, *ws, **cfg))
      out = fn(x, *stacked).astype(jnp.float32)
      err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
      t = queued_call_seconds(fn, x, *stacked, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - a configuration the compiler refuses is reported, not fatal
      rows.append({**cfg, "error": str(e)[:300]})
      print("persistent", cfg, "error", str(e)[:300], flush=True)
      continue
    rows.append({**cfg, "us": t * 1e6, "frac": nbytes / t / bw, "rel_err": err})
    print("persistent", cfg, f"{t * 1e6:.0f} us", f"{100 * nbytes / t / bw:.0f}% of HBM", f"err {err:.1e}", flush=True)
  return rows


if __name__ == "__main__":
  main()
