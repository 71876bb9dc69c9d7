"""Serve a shardlab model over an OpenAI-compatible HTTP API.

  python serve.py --config=tiny --checkpoint=runs/tiny
  python serve.py --hf=path/to/llama --port=8000 --slots=32 --token_budget=512
  curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
      -d '{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 32}'

It prints what it loaded and then "listening on http://HOST:PORT" once requests are accepted.
SIGTERM (or Ctrl-C): stop accepting, let in-flight requests finish for --graceful_s seconds, cancel
the rest, exit 0. A configuration error is one line naming the field, the value and the rule
(exit status 2), as in train.py.
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags

import configs
from configs.entry import compilation_cache_dir, run_entry_point

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", f"Preset to start from: one of {sorted(configs.PRESETS)}. With --hf, "
                    "the model section comes from the Hugging Face config instead.")
flags.DEFINE_multi_string("set", [], "Override one config field, as section.field=value (e.g. --set mesh.tensor=2). "
                          "Repeatable; applied in order.")
flags.DEFINE_string("checkpoint", None, "A shardlab run directory (or its checkpoints/ folder): the latest "
                    "checkpoint's parameters are served. Give --config/--set as the run was trained.")
flags.DEFINE_string("hf", None, "A Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. The default answers this machine only; "
                    "0.0.0.0 opens the server to the network.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port; the one chosen is printed).")
flags.DEFINE_integer("slots", 8, "Decode slots: requests that generate at the same time.")
flags.DEFINE_integer("token_budget", 256, "Tokens per engine step, prefill chunks and decode tokens together "
                     "(Dynamic SplitFuse).")
flags.DEFINE_integer("max_len", 0, "Context length per request, prompt plus output (0: model.max_seq_len).")
flags.DEFINE_integer("decode_steps", 1, "Decode steps the device runs per engine step before the host looks again "
                     "(with a draft model: speculative rounds; 8-16 for speculative decoding's speed, since each "
                     "engine step costs a host turn, about 0.5 ms on an H100).")
flags.DEFINE_integer("max_waiting", 256, "Requests allowed to wait for a slot; one more is answered 429.")
flags.DEFINE_string("served_model_name", None, "The model name clients send (default: the checkpoint's "
                    "folder name, or the config's name).")
flags.DEFINE_string("chat_template", None, "A tokenizer_config.json or a Jinja file with the chat template "
                    "(default: the checkpoint's tokenizer_config.json if it has one, else 'role: content' lines).")
flags.DEFINE_float("graceful_s", 30.0, "After SIGTERM, seconds in-flight requests may take before they are cancelled.")
flags.DEFINE_bool("warmup", True, "Before listening, run one request per prefill chunk length through the "
                  "engine and compile the decode loop of every cache span, so clients do not wait for "
                  "compilation.")
flags.DEFINE_bool("warmup_rows", False, "With --warmup, also compile the prefill of every number of prompt chunks "
                  "per step (rows, a power of two) and chunk length a step can ask for, so a burst of requests "
                  "meets no compilation either (112 programs at 64 slots and a budget of 2048).")

flags.DEFINE_integer("page_size", 0, "Positions per page of a paged KV cache (0: one contiguous cache of --max_len "
                     "positions per slot). Must divide the context length.")
flags.DEFINE_integer("num_pages", 0, "Pages of the paged cache per engine replica (0: as many as --slots "
                     "contiguous caches would hold). More pages keep more shared prefixes cached.")
flags.DEFINE_bool("prefix_caching", True, "With --page_size: prompts that start with the same blocks of tokens share "
                  "their pages (a prefix tree, least recently used blocks evicted first).")
flags.DEFINE_bool("disaggregate", False, "Prefill/decode disaggregation: prompts on the first half of the devices, "
                  "decoding on the second (set mesh.data=2; mesh.tensor splits each half), each request's keys and "
                  "values moved across when its prompt is done.")
flags.DEFINE_string("prefill_worker", None, "host:port of a prefill worker process (python -m serving.prefill_worker, "
                    "started with this server's model, --slots, context, pages and draft model): prompts are "
                    "computed there and their keys and values sent here over TCP, this server only decodes.")
flags.DEFINE_string("draft_checkpoint", None, "Decode speculatively with this draft model (a shardlab run directory, "
                    "e.g. a 2-layer model trained with train.py on the same data): it proposes "
                    "--speculative_tokens tokens per round, the served model checks them in one pass.")
flags.DEFINE_string("draft_hf", None, "As --draft_checkpoint, from a Hugging Face directory.")
flags.DEFINE_string("draft_config", None, "Preset of the draft model (default: --config); the mesh, sharding "
                    "and data sections (so the tokenizer) are the served model's. Given without --draft_checkpoint "
                    "or --draft_hf: a randomly initialised draft (for trying speculative decoding out).")
flags.DEFINE_multi_string("draft_set", [], "Override one field of the draft's config, as --set does.")
flags.DEFINE_integer("speculative_tokens", 3, "With a draft: tokens it proposes per round.")

flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "shardlab", "jax"),
                    "Directory of JAX's persistent compilation cache: a restarted server loads the programs an "
                    "earlier one compiled (its warm-up, and the shapes its traffic met) instead of compiling them "
                    "again. '' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins.")

log = logging.getLogger("shardlab")


def _model_name(config) -> str:
  path = FLAGS.hf or FLAGS.checkpoint
  return FLAGS.served_model_name or (os.path.basename(os.path.normpath(path)) if path else config.name)


def _template_dirs(config) -> list[str]:
  dirs = [d for d in (FLAGS.hf, FLAGS.checkpoint) if d]
  tok = config.data.tokenizer
  if tok != "bytes":
    dirs.append(tok if os.path.isdir(tok) else os.path.dirname(tok))
  return dirs


def _warm_up(engine, token_budget: int, max_len: int, replicas: int) -> float:
  """Every prefill chunk length, greedy and sampled, each decoding 2 tokens, on every data-parallel
  replica (the engine gives each new request to the least-loaded one, so `replicas` requests added
  together land one per replica); then the decode loop of every cache span (`Engine.warm_up_decode`)."""
  from serving.engine import Request, SamplingParams
  from serving.runner import buckets

  start = time.perf_counter()
  for n in sorted({min(b, max_len - 2) for b in buckets(token_budget)}):
    for temperature in (0.0, 1.0):
      for r in range(replicas):
        engine.add(Request(id=f"warmup-{n}-{temperature}-{r}", prompt_ids=(0,) * n,
                           sampling=SamplingParams(max_tokens=2, temperature=temperature)))
      while engine.has_work():
        engine.step()
  engine.warm_up_decode()
  engine.reset_counters()  # /metrics counts the traffic's proposals and prefix hits, not the warm-up's
  if FLAGS.warmup_rows:
    log.info("compiled %d prefill programs", engine.warm_up_prefill())
  return time.perf_counter() - start


def _load_draft(config, plan):
  """The draft model of --draft_checkpoint / --draft_hf / --draft_config (None without any; with
  --draft_config alone a random initialisation, for trying it out), on the served model's mesh."""
  if not (FLAGS.draft_checkpoint or FLAGS.draft_hf or FLAGS.draft_config):
    return None
  from serving.engine import Draft
  from serving.loading import load_draft

  loaded = load_draft(config, plan, preset=FLAGS.draft_config or FLAGS.config, overrides=FLAGS.draft_set,
                      checkpoint=FLAGS.draft_checkpoint, hf=FLAGS.draft_hf)
  m = loaded.config.model
  log.info("draft model %s: %d layers, d_model=%d, vocab=%d; %d tokens per round",
           FLAGS.draft_hf or FLAGS.draft_checkpoint or "random initialisation", m.n_layers, m.d_model, m.vocab_size,
           FLAGS.speculative_tokens)
  return Draft(m, loaded.params, FLAGS.speculative_tokens)


def _check_flags(config) -> None:
  """Flag errors before anything loads or compiles, each naming the flag, its value and the rule."""
  if FLAGS.checkpoint and FLAGS.hf:
    raise configs.ConfigError("--checkpoint and --hf: give one of them, not both")
  for name in ("slots", "token_budget", "decode_steps"):
    if getattr(FLAGS, name) < 1:
      raise configs.ConfigError(f"--{name}={getattr(FLAGS, name)}: must be >= 1")
  for name in ("max_len", "max_waiting", "port"):
    if getattr(FLAGS, name) < 0:
      raise configs.ConfigError(f"--{name}={getattr(FLAGS, name)}: must be >= 0")
  if FLAGS.graceful_s < 0:
    raise configs.ConfigError(f"--graceful_s={FLAGS.graceful_s}: must be >= 0")
  for name in ("page_size", "num_pages"):
    if getattr(FLAGS, name) < 0:
      raise configs.ConfigError(f"--{name}={getattr(FLAGS, name)}: must be >= 0")
  if FLAGS.num_pages and not FLAGS.page_size:
    raise configs.ConfigError(f"--num_pages={FLAGS.num_pages} needs --page_size (a paged cache)")
  if FLAGS.draft_checkpoint and FLAGS.draft_hf:
    raise configs.ConfigError("--draft_checkpoint and --draft_hf: give one of them, not both")
  if FLAGS.speculative_tokens < 1:
    raise configs.ConfigError(f"--speculative_tokens={FLAGS.speculative_tokens}: must be >= 1")
  if not FLAGS.hf and FLAGS.max_len > config.model.max_seq_len:  # with --hf the checkpoint's config decides
    raise configs.ConfigError(f"--max_len={FLAGS.max_len}: must be <= model.max_seq_len={config.model.max_seq_len}")


def _run() -> None:
  config = configs.get_config(FLAGS.config, FLAGS.set)
  _check_flags(config)
  from parallel.xla_flags import apply_default_flags
  apply_default_flags(serving=True)
  cache_dir = compilation_cache_dir(FLAGS.compilation_cache, os.environ)
  if cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    log.info("compilation cache: %s", cache_dir)

  from serving.app import DrainingServer, bind, create_app
  from serving.async_engine import AsyncEngine
  from serving.chat_template import load_chat_template
  from serving.engine import Engine
  from serving.loading import load

  loaded = load(config, checkpoint=FLAGS.checkpoint, hf=FLAGS.hf)
  model = loaded.config.model
  max_len = FLAGS.max_len or model.max_seq_len
  tokenizer = loaded.tokenizer
  draft = _load_draft(loaded.config, loaded.plan)
  paging = None
  if FLAGS.page_size:
    from serving.engine import Paging
    replica_slots = FLAGS.slots // (1 if FLAGS.disaggregate else loaded.plan.mesh.shape["data"])
    pages = FLAGS.num_pages or max(replica_slots, 1) * (max_len // FLAGS.page_size)
    paging = Paging(FLAGS.page_size, pages, FLAGS.prefix_caching)
  try:
    engine = Engine(model, loaded.params, plan=loaded.plan, slots=FLAGS.slots, token_budget=FLAGS.token_budget,
                    max_len=max_len, eos_id=tokenizer.eos_id, decode_steps=FLAGS.decode_steps, draft=draft,
                    paging=paging, disaggregate=FLAGS.disaggregate, prefill_worker=FLAGS.prefill_worker)
  except ValueError as err:  # the engine names the flag's field (slots, token_budget, max_len, ...)
    raise configs.ConfigError(f"engine flags: {err}") from None
  source = FLAGS.hf or FLAGS.checkpoint or "random initialisation"
  mesh = " x ".join(f"{a}={n}" for a, n in loaded.plan.mesh.shape.items() if n > 1) or "one device"
  log.info("loaded %s: %d layers, d_model=%d, vocab=%d, %s compute, tokenizer %r; mesh %s", source, model.n_layers,
           model.d_model, model.vocab_size, model.compute_dtype, tokenizer, mesh)
  template = load_chat_template(_template_dirs(loaded.config), FLAGS.chat_template)
  log.info("engine: slots=%d token_budget=%d max_len=%d decode_steps=%d; chat template: %s", FLAGS.slots,
           FLAGS.token_budget, max_len, FLAGS.decode_steps, template.origin)
  if FLAGS.prefill_worker:
    log.info("disaggregated: prompts computed by the prefill worker at %s, decoding here", FLAGS.prefill_worker)
  if FLAGS.disaggregate:
    half = loaded.plan.mesh.size // 2
    log.info("disaggregated: prompts on %d device(s), decoding on the other %d", half, half)
  if paging is not None:
    log.info("paged KV cache: %d pages of %d positions per replica, prefix caching %s", paging.pages,
             paging.page_size, "on" if paging.prefix_caching else "off")
  if FLAGS.warmup:
    seconds = _warm_up(engine, FLAGS.token_budget, max_len, 1 if FLAGS.disaggregate else loaded.plan.mesh.shape["data"])
    log.info("warm-up requests done in %.1f s", seconds)

  async_engine = AsyncEngine(engine, tokenizer, max_waiting=FLAGS.max_waiting)
  name = _model_name(loaded.config)
  application = create_app(async_engine, tokenizer, model_name=name, chat_template=template)

  sock = bind(FLAGS.host, FLAGS.port)
  host, port = sock.getsockname()[:2]
  server = DrainingServer(application, async_engine, graceful_s=FLAGS.graceful_s)
  print(f"serving model {name!r} ({source}); listening on http://{host}:{port}", flush=True)
  server.run(sockets=[sock])
  log.info("stopped: %d requests were still in flight", async_engine.num_outstanding)
  if engine.prefix_cache is not None and engine.prefix_cache["queried_tokens"]:
    c = engine.prefix_cache
    log.info("prefix cache: %d of %d prompt tokens found cached (%.1f%%), %d pages evicted", c["matched_tokens"],
             c["queried_tokens"], 100 * c["matched_tokens"] / c["queried_tokens"], c["pages_evicted"])
  if engine.transfers is not None and engine.transfers["count"]:
    t = engine.transfers
    log.info("disaggregation: %d prompts moved, %.1f MB in %.3f s", t["count"], t["bytes"] / 1e6, t["seconds"])
  if engine.speculation is not None and engine.speculation["rounds"]:
    s = engine.speculation
    log.info("speculative decoding: %d of %d proposals accepted (%.1f%%), %.2f tokens per round", s["accepted"],
             s["proposed"], 100 * s["accepted"] / s["proposed"], 1 + s["accepted"] / s["rounds"])


def main(argv):
  del argv
  run_entry_point(_run)


if __name__ == "__main__":
  app.run(main)
