"""Load generator for serve.py with vLLM's `bench serve` metrics.

  # start serve.py itself (any serve.py flags after --serve), three request rates, JSON out:
  PYTHONPATH=. python bench/serve_load.py --serve="--config=1b --slots=64" --request_rates=2,8,32 \\
      --num_prompts=200 --input_len=128 --output_len=128 --out=serve_load.json
  # or against a server that is already up:
  python bench/serve_load.py --url=http://127.0.0.1:8000 --request_rates=inf --num_prompts=50

Definitions (as vLLM's benchmarks/serve): per streamed request, TTFT = first chunk with tokens
minus send time; ITL = the gaps between successive chunks with tokens (all requests pooled); TPOT =
(E2E - TTFT) / (output tokens - 1); E2E = last chunk minus send time; each reported as mean,
median and p99 in ms. Request throughput = completed requests / benchmark duration; output
throughput = generated tokens / duration (token counts from the server's `usage`). Goodput =
completed requests per second that meet every SLO given with --goodput (ms), e.g.
--goodput=ttft:500,tpot:50.

Arrivals: Poisson (exponential gaps, mean 1/rate) or fixed-rate (constant gaps); `inf` sends
everything at once. Prompts: `random` token ids (exact lengths; ids below --max_token_id, valid for
the byte tokenizer and any larger vocabulary) or `corpus` text cut from the built-in corpus (the
standard library's sources; lengths in characters, = tokens with the byte tokenizer). Lengths are
drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)].
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "A running server's base URL; without it, serve.py is started with --serve.")
flags.DEFINE_string("serve", "", "serve.py flags (one string) when the benchmark starts the server itself.")
flags.DEFINE_string("server_log", "serve_load_server.log", "Where the started server's output goes.")
flags.DEFINE_string("model", None, "Model name to send (default: the one /v1/models lists).")
flags.DEFINE_list("request_rates", ["inf"], "Requests per second, one benchmark each; 'inf' = all at once.")
flags.DEFINE_enum("arrivals", "poisson", ["poisson", "constant"], "Inter-arrival times: exponential or fixed.")
flags.DEFINE_integer("num_prompts", 100, "Requests per rate.")
flags.DEFINE_integer("max_concurrency", 0, "At most this many requests in flight (0: no limit).")
flags.DEFINE_enum("dataset", "random", ["random", "corpus"], "Prompt source.")
flags.DEFINE_integer("input_len", 128, "Mean prompt length (tokens for random, characters for corpus).")
flags.DEFINE_integer("output_len", 128, "Mean max_tokens per request.")
flags.DEFINE_float("range_ratio", 0.0, "Lengths drawn uniformly within +- this fraction of the mean.")
flags.DEFINE_integer("max_token_id", 256, "Random prompts use token ids in [1, max_token_id).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature sent with every request (0: greedy).")
flags.DEFINE_string("goodput", "", "SLOs in ms, e.g. ttft:500,tpot:50,e2el:10000.")
flags.DEFINE_integer("seed", 0, "Seed of prompt lengths, contents and arrival times.")
flags.DEFINE_integer("warmup_prompts", 4, "Requests sent (all at once) and discarded before the first rate.")
flags.DEFINE_float("request_timeout", 600.0, "Seconds before a request counts as failed.")
flags.DEFINE_string("out", "", "Write the results (one entry per rate) as JSON here.")


def make_requests(rng: np.random.Generator) -> list[tuple[str | list[int], int]]:
  """(prompt, max_tokens) per request."""
  def lengths(mean: int) -> np.ndarray:
    lo, hi = max(1, int(mean * (1 - FLAGS.range_ratio))), max(1, int(mean * (1 + FLAGS.range_ratio)))
    return rng.integers(lo, hi + 1, FLAGS.num_prompts)

  ins, outs = lengths(FLAGS.input_len), lengths(FLAGS.output_len)
  if FLAGS.dataset == "random":
    prompts = [rng.integers(1, FLAGS.max_token_id, n).tolist() for n in ins]
  else:
    from data.corpus import stdlib_files
    text = "".join(open(path, encoding="utf-8", errors="ignore").read() for _, path in stdlib_files()[:200])
    starts = rng.integers(0, len(text) - int(ins.max()) - 1, FLAGS.num_prompts)
    prompts = [text[s:s + n] for s, n in zip(starts, ins)]
  return list(zip(prompts, outs.tolist()))


def arrival_gaps(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
  if rate == float("inf"):
    return np.zeros(n)
  if FLAGS.arrivals == "constant":
    return np.full(n, 1.0 / rate)
  return rng.exponential(1.0 / rate, n)


async def one_request(client, url: str, model: str, prompt, max_tokens: int) -> dict:
  # logprobs=0 lists each chunk's tokens, so a chunk of tokens without visible text (an incomplete
  # character, or ids a random model picks outside the tokenizer's text) still counts as arrived.
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": FLAGS.temperature,
          "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
          "return_tokens_as_token_ids": True}
  out = {"ok": False, "ttft": None, "itl": [], "e2el": None, "prompt_tokens": 0, "output_tokens": 0, "error": ""}
  start = last = time.perf_counter()
  try:
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=FLAGS.request_timeout) as r:
      if r.status_code != 200:
        out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        return out
      async for line in r.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
          out["error"] = chunk["error"]["message"]
          return out
        now = time.perf_counter()
        if chunk.get("usage"):
          out["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
          out["output_tokens"] = chunk["usage"]["completion_tokens"]
        if any(c.get("text") or (c.get("logprobs") or {}).get("tokens") for c in chunk.get("choices", [])):
          if out["ttft"] is None:
            out["ttft"] = now - start
          else:
            out["itl"].append(now - last)
          last = now
    out["e2el"] = last - start
    out["ok"] = out["ttft"] is not None
    if not out["ok"]:
      out["error"] = "no token came back"
  except Exception as err:  # noqa: BLE001 -- a failed request is a result, not a crash
    out["error"] = f"{type(err).__name__}: {err}"
  return out


async def run_rate(url: str, model: str, requests: list, rate: float, rng: np.random.Generator) -> tuple[list, float]:
  import httpx

  gaps = arrival_gaps(rng, rate, len(requests))
  limit = asyncio.Semaphore(FLAGS.max_concurrency or len(requests))
  connections = httpx.Limits(max_connections=FLAGS.max_concurrency or len(requests))
  async with httpx.AsyncClient(limits=connections, timeout=FLAGS.request_timeout) as client:
    async def limited(prompt, max_tokens):
      async with limit:
        return await one_request(client, url, model, prompt, max_tokens)

    start = time.perf_counter()
    tasks = []
    for i, ((prompt, max_tokens), gap) in enumerate(zip(requests, gaps)):
      if i and gap > 0:  # the first request goes at once; each later one `gap` after its predecessor
        await asyncio.sleep(gap)
      tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results: list[dict], duration: float, rate: float, slos: dict[str, float]) -> dict:
  ok = [r for r in results if r["ok"]]
  ms = lambda xs: {"mean": float(np.mean(xs)) * 1e3, "median": float(np.median(xs)) * 1e3,
                   "p99": float(np.percentile(xs, 99)) * 1e3} if len(xs) else {"mean": None, "median": None, "p99": None}
  tpot = {id(r): (r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1}
  good = 0
  for r in ok:
    values = {"ttft": r["ttft"], "tpot": tpot.get(id(r), 0.0), "e2el": r["e2el"]}
    good += all(values[k] * 1e3 <= v for k, v in slos.items())
  total_out = sum(r["output_tokens"] for r in ok)
  total_in = sum(r["prompt_tokens"] for r in ok)
  return {
      "request_rate": "inf" if rate == float("inf") else rate, "arrivals": FLAGS.arrivals,
      "completed": len(ok), "failed": len(results) - len(ok),
      "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
      "duration_s": duration, "total_input_tokens": total_in, "total_output_tokens": total_out,
      "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
      "total_token_throughput": (total_in + total_out) / duration,
      "goodput": good / duration if slos else None, "slos_ms": slos,
      "ttft_ms": ms([r["ttft"] for r in ok]), "tpot_ms": ms(list(tpot.values())),
      "itl_ms": ms([g for r in ok for g in r["itl"]]), "e2el_ms": ms([r["e2el"] for r in ok]),
  }


def start_server() -> tuple[subprocess.Popen, str]:
  """serve.py on a free loopback port; returns once it prints where it listens."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(repo, "serve.py"), "--port=0", *FLAGS.serve.split()]
  log = open(FLAGS.server_log, "w")
  proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=log, text=True,
                          env={**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")})
  for line in proc.stdout:
    print(line, end="", flush=True)
    if "listening on " in line:
      return proc, line.rsplit("listening on ", 1)[1].strip()
  raise RuntimeError(f"serve.py exited ({proc.wait()}) before listening; see {FLAGS.server_log}")


def table(rows: list[dict]) -> str:
  head = ("rate req/s", "done", "fail", "req/s", "out tok/s", "TTFT mean/med/p99 ms", "TPOT mean/med/p99 ms",
          "ITL mean/med/p99 ms", "E2E mean/med/p99 ms", "goodput")
  fmt = lambda d: "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("mean", "median", "p99"))
  lines = [" | ".join(head)]
  for r in rows:
    lines.append(" | ".join([str(r["request_rate"]), str(r["completed"]), str(r["failed"]),
                             f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}", fmt(r["ttft_ms"]),
                             fmt(r["tpot_ms"]), fmt(r["itl_ms"]), fmt(r["e2el_ms"]),
                             "-" if r["goodput"] is None else f"{r['goodput']:.2f}"]))
  return "\n".join(lines)


def main(argv):
  del argv
  import logging

  import httpx

  logging.getLogger("httpx").setLevel(logging.WARNING)

  slos = {k: float(v) for k, v in (item.split(":") for item in FLAGS.goodput.split(",") if item)}
  unknown = set(slos) - {"ttft", "tpot", "e2el"}
  if unknown:
    raise app.UsageError(f"--goodput: unknown metrics {sorted(unknown)}; use ttft, tpot, e2el")
  proc, url = (None, FLAGS.url.rstrip("/")) if FLAGS.url else start_server()
  try:
    model = FLAGS.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    if FLAGS.warmup_prompts:
      warm = make_requests(np.random.default_rng(FLAGS.seed + 10_000))[:FLAGS.warmup_prompts]
      asyncio.run(run_rate(url, model, warm, float("inf"), np.random.default_rng(0)))
    rows = []
    for i, rate_text in enumerate(FLAGS.request_rates):
      rng = np.random.default_rng(FLAGS.seed + i)
      rate = float(rate_text)
      results, duration = asyncio.run(run_rate(url, model, make_requests(rng), rate, rng))
      rows.append(summarize(results, duration, rate, slos))
      print(json.dumps(rows[-1]), flush=True)
    server_metrics = httpx.get(url + "/metrics", timeout=30).text
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"url": url, "model": model, "serve": FLAGS.serve, "dataset": FLAGS.dataset,
                 "input_len": FLAGS.input_len, "output_len": FLAGS.output_len, "num_prompts": FLAGS.num_prompts,
                 "results": rows, "server_metrics": server_metrics}, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
