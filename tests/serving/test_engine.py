"""The engine against the full forward pass: greedy decode with the KV cache (chunked prefill,
several requests at once) gives, at every step, the argmax and the log_softmax of the logits that
the model computes over the whole sequence without a cache; stop tokens, lengths, aborts and bad
requests; tensor-parallel and data-parallel decode equal to one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.cache import attend_with_cache
from models.transformer import Transformer
from parallel.attention.dense import dot_product_attention
from parallel.mesh import make_mesh
from parallel.plan import make_plan, single_device_plan
from serving.engine import Request, SamplingParams
from serving.runner import ModelRunner, _row_arrays
from tests.reference import assert_close
from tests.serving import tiny
from tests.serving.tiny import SLOTS, greedy, make_engine, run


@pytest.fixture(scope="module", params=["random", "trained"])
def engine_and_params(request):
  params = tiny.random_params() if request.param == "random" else tiny.trained_params()
  return make_engine(params), params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_with_cache_equals_dense_attention(dtype):
  """Keys split at every point between the cache and the new tokens: the dense causal attention
  of the whole sequence (float32), for the new tokens' rows."""
  rng = np.random.default_rng(0)
  b, length, h, k, d = 2, 12, 4, 2, 8
  q, kk, v = (rng.standard_normal((b, length, n, d)).astype(np.float32) for n in (h, k, k))
  want = np.asarray(jax.jit(dot_product_attention, static_argnums=3)(q, kk, v, None))
  q, kk, v = (jnp.asarray(x, dtype) for x in (q, kk, v))
  cached = jax.jit(attend_with_cache)
  # The cache's layout [B, K, S, D], with a stale tail past the valid positions.
  pad = lambda x: jnp.concatenate([x, jnp.asarray(rng.standard_normal((b, 4, k, d)), dtype)], axis=1).transpose(0, 2, 1, 3)
  for split in (0, 5, 11):
    got = cached(q[:, split:], kk[:, split:], v[:, split:], pad(kk[:, :split]), pad(v[:, :split]),
                            np.full((b,), split, np.int32))
    assert_close(np.asarray(got, np.float32), want[:, split:], dtype, what=f"split at {split}")


def test_greedy_equals_full_forward(engine_and_params):
  """Three requests at once on three slots; prompts longer than the token budget are prefilled in chunks."""
  engine, params = engine_and_params
  rng = np.random.default_rng(1)
  prompts = [tiny.PATTERN[:5], rng.integers(0, tiny.CFG.vocab_size, 21), np.tile(tiny.PATTERN, 2)[3:40]]
  out = run(engine, [greedy(str(i), p, 9) for i, p in enumerate(prompts)])
  for i, p in enumerate(prompts):
    tokens, logprobs, logits = tiny.reference_decode(params, p, 9)
    assert out[str(i)][0] == tokens, f"request {i}"
    assert_logprobs_close(out[str(i)][1], logprobs, logits)
    assert out[str(i)][2] == "length"


def assert_logprobs_close(got, want, logits):
  """A log-probability x - logsumexp(x) inherits the logits' absolute error, so it is compared at
  float32's tolerance relative to the size of that step's logits (a confident model's log-probs
  near 0 are smaller than the rounding of the logits they come from)."""
  scale = np.abs(np.asarray(logits)).max(axis=-1)
  err = np.abs(np.asarray(got) - np.asarray(want)) / scale
  assert err.max() <= 1e-5, f"log-probabilities: error {err.max():.3g} of the logits' size > 1e-5"


def test_one_slot_decodes_with_a_spare_row():
  """An engine of one slot keeps a second, never active, cache slot (a one-row step is slow on
  GPUs); the tokens, sampled ones included, are those of the reference and of a two-slot engine."""
  params = tiny.random_params()
  engine = make_engine(params, slots=1, decode_steps=3)
  assert engine._replicas[0].runner.cache.slots == 2
  prompt = tiny.PATTERN[:7]
  out = run(engine, [greedy("a", prompt, 8)])
  tokens, logprobs, logits = tiny.reference_decode(params, prompt, 8)
  assert out["a"][0] == tokens
  assert_logprobs_close(out["a"][1], logprobs, logits)
  sampled = lambda e: run(e, [Request("s", tuple(prompt), SamplingParams(max_tokens=8, temperature=0.8, seed=3))])
  assert sampled(make_engine(params, slots=1))["s"][0] == sampled(make_engine(params, slots=2))["s"][0]


def test_trained_model_continues_its_cycle():
  """The trained fixture is a real test of decoding: it continues the cycle it was trained on."""
  tokens, _, _ = tiny.reference_decode(tiny.trained_params(), tiny.PATTERN[:6], 6)
  assert tokens == tiny.PATTERN[6:12].tolist()


def test_stop_tokens_eos_and_length():
  params = tiny.random_params()
  engine = make_engine(params, eos_id=None)
  prompt = tiny.PATTERN[:4]
  ref, _, _ = tiny.reference_decode(params, prompt, 8)
  stop = ref[3]
  out = run(engine, [greedy("stop", prompt, 8, stop_token_ids=(stop,)), greedy("len", prompt, 2)])
  assert out["stop"][0] == ref[:ref.index(stop) + 1] and out["stop"][2] == "stop"
  assert out["len"][0] == ref[:2] and out["len"][2] == "length"
  engine.eos_id = ref[1]
  out = run(engine, [greedy("eos", prompt, 8)])
  assert out["eos"][0] == ref[:ref.index(ref[1]) + 1] and out["eos"][2] == "stop"
  engine.eos_id = None
  full = np.tile(tiny.PATTERN, 3)[:tiny.MAX_LEN - 4]  # prompt + max_tokens fill the context exactly
  out = run(engine, [greedy("one", prompt, 1), greedy("full", full, 4)])
  assert out["one"][0] == ref[:1] and out["one"][2] == "length"  # done by the prompt's last chunk
  assert out["full"][0] == tiny.reference_decode(params, full, 4)[0]
  assert not engine.has_work() and engine.num_running == 0


def test_abort_frees_the_slot():
  engine = make_engine(tiny.random_params())
  for i in range(SLOTS + 1):
    engine.add(greedy(str(i), tiny.PATTERN[:3], 20))
  engine.step()
  assert engine.num_running == SLOTS and engine.num_waiting == 1
  engine.abort("0")
  engine.abort("3")  # still waiting
  events = engine.step()
  aborted = {e.request_id for e in events if e.finish_reason == "abort"}
  assert aborted == {"0", "3"} and all(e.finished for e in events if e.request_id in aborted)
  assert engine.num_running == SLOTS - 1 and engine.num_waiting == 0
  for rid in ("1", "2"):
    engine.abort(rid)
  engine.step()
  assert not engine.has_work()


@pytest.mark.parametrize("prompt,sampling,field", [
    ((), SamplingParams(max_tokens=4), "prompt_ids"),
    ((1, 2), SamplingParams(max_tokens=0), "max_tokens"),
    ((1,) * 60, SamplingParams(max_tokens=5), "context"),
    ((1, 2), SamplingParams(max_tokens=4, temperature=-0.5), "temperature"),
    ((1, 2), SamplingParams(max_tokens=4, top_k=-1), "top_k"),
    ((1, 2), SamplingParams(max_tokens=4, top_p=0.0), "top_p"),
    ((1, 500), SamplingParams(max_tokens=4), "prompt_ids"),
])
def test_add_rejects_bad_requests(engine_and_params, prompt, sampling, field):
  engine, _ = engine_and_params
  with pytest.raises(ValueError, match=field):
    engine.add(Request("bad", prompt, sampling))
  assert not engine.has_work()


TP_CFG = dataclasses.replace(tiny.CFG, n_heads=8, n_kv_heads=4)  # kv heads split 4 ways


@pytest.fixture(scope="module")
def tp_case():
  """Four requests (greedy and seeded sampling) on one device: what every mesh must reproduce."""
  params = tiny.params_of(Transformer(TP_CFG, rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(4)
  requests = [greedy(str(i), rng.integers(0, TP_CFG.vocab_size, n), 6) for i, n in enumerate((3, 20, 9))]
  requests.append(Request("s", (5, 6, 7), SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=9,
                                                          logprobs=True)))
  return params, requests, run(make_engine(params, cfg=TP_CFG, slots=4), requests)


@pytest.mark.parametrize("sizes", [{"tensor": 2}, {"tensor": 4}, {"data": 2, "tensor": 2}])
def test_parallel_decode_equals_one_device(tp_case, sizes):
  """Megatron tensor parallelism (the training rule tables) within each replica, data-parallel
  replicas over `data`: the same tokens and log-probabilities as one device."""
  params, requests, want = tp_case
  n = int(np.prod(list(sizes.values())))
  plan = make_plan(make_mesh(sizes, jax.devices()[:n]))
  got = run(make_engine(params, cfg=TP_CFG, slots=4, plan=plan), requests)
  assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
  assert_close({k: np.asarray(v[1]) for k, v in got.items()}, {k: np.asarray(v[1]) for k, v in want.items()})


@pytest.mark.parametrize("sizes", [{"data": 2, "tensor": 4}, {"data": 2}])
def test_disaggregated_prefill_and_decode_equal_one_device(tp_case, sizes):
  """Prompts on the first half of the devices (tensor-parallel over 4, or one device), decoding on
  the other half, each request's keys and values moved across when its prompt is done: the same
  tokens and log-probabilities as one device, one move per request that decodes."""
  params, requests, want = tp_case
  n = int(np.prod(list(sizes.values())))
  plan = make_plan(make_mesh(sizes, jax.devices()[:n]))
  engine = make_engine(params, cfg=TP_CFG, slots=4, plan=plan, disaggregate=True)
  got = run(engine, requests)
  assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
  assert_close({k: np.asarray(v[1]) for k, v in got.items()}, {k: np.asarray(v[1]) for k, v in want.items()})
  moved = engine.transfers
  per_position = 2 * TP_CFG.n_layers * TP_CFG.n_kv_heads * TP_CFG.resolved_head_dim * 4  # k and v, float32
  assert moved["count"] == len(requests) and moved["seconds"] > 0
  spans = [max(16, 1 << (len(r.prompt_ids) - 1).bit_length()) for r in requests]  # runner.span_bucket
  assert moved["bytes"] == per_position * sum(spans)
  with pytest.raises(ValueError, match="disaggregate: mesh.data=1, must be 2"):
    make_engine(params, cfg=TP_CFG, slots=4, disaggregate=True)


def test_pallas_decode_attention_equals_full_forward(monkeypatch):
  """`model.decode_attention='pallas'`: every decode step's attention is the one-kernel version
  (here in the Pallas interpreter), and greedy tokens and log-probabilities are the full forward
  pass's, for caches read whole and through spans of 16 and 32 positions; the kernel is handed the
  stacked cache of every layer (read in place), not a layer's slice."""
  import models.attention  # noqa: PLC0415

  calls = []
  kernel = models.attention.decode_attention
  monkeypatch.setattr(models.attention, "decode_attention", lambda *a, **kw: calls.append(a[3].shape) or kernel(*a, **kw))
  params = tiny.random_params()
  engine = make_engine(params, cfg=dataclasses.replace(tiny.CFG, decode_attention="pallas"), decode_steps=4)
  prompts = [tiny.PATTERN[:5], np.tile(tiny.PATTERN, 3)[2:52], np.tile(tiny.PATTERN, 2)[3:24]]
  out = run(engine, [greedy(str(i), p, 9) for i, p in enumerate(prompts)])
  for i, p in enumerate(prompts):
    tokens, logprobs, logits = tiny.reference_decode(params, p, 9)
    assert out[str(i)][0] == tokens, f"request {i}"
    assert_logprobs_close(out[str(i)][1], logprobs, logits)
  assert {shape[-2] for shape in calls} >= {32, tiny.MAX_LEN}, f"the kernel read caches of spans {calls}"
  assert {shape[0] for shape in calls} == {tiny.CFG.n_layers}, "the kernel reads every layer's cache in place"
  with pytest.raises(ValueError, match="decode_attention='pallas' runs on one device"):
    make_engine(params, cfg=dataclasses.replace(tiny.CFG, decode_attention="pallas"),
                plan=make_plan(make_mesh({"tensor": 2}, jax.devices()[:2])))


def test_split_k_decode_equals_full_forward(monkeypatch):
  """`model.decode_split_k`: a decode step's products with their contractions cut in four give the
  full forward pass's greedy tokens and log-probabilities; refused on a mesh of several devices."""
  import models.attention  # noqa: PLC0415
  import models.layers  # noqa: PLC0415

  calls = []
  for module in (models.attention, models.layers):
    product = module.split_k_product
    monkeypatch.setattr(module, "split_k_product",
                        lambda x, w, n, k, out=None, product=product: calls.append((x.shape[1], w.shape, k))
                        or product(x, w, n, k, out))
  params = tiny.random_params()
  cfg = dataclasses.replace(tiny.CFG, decode_split_k=4)
  prompts = [tiny.PATTERN[:5], np.tile(tiny.PATTERN, 2)[3:24]]
  out = run(make_engine(params, cfg=cfg, decode_steps=4), [greedy(str(i), p, 9) for i, p in enumerate(prompts)])
  for i, p in enumerate(prompts):
    tokens, logprobs, logits = tiny.reference_decode(params, p, 9)
    assert out[str(i)][0] == tokens, f"request {i}"
    assert_logprobs_close(out[str(i)][1], logprobs, logits)
  d, h, hd = tiny.CFG.d_model, tiny.CFG.n_heads, tiny.CFG.resolved_head_dim
  # (The fused layout's q/k/v and gate/up products of prompt chunks run through it unsplit.)
  assert {(t, k) for t, _, k in calls if k > 1 or t == 1} == {(1, 4)}, "only decode steps split, in four"
  assert {w[:2] for _, w, k in calls if k > 1} == {(d, tiny.CFG.n_kv_heads), (h, hd), (d, 2), (tiny.CFG.d_ff, d),
                                                    (d, tiny.CFG.vocab_size)}, "q/k/v, output, gate/up, down, head"
  with pytest.raises(ValueError, match="decode_split_k=4 runs on one device"):
    make_engine(params, cfg=cfg, plan=make_plan(make_mesh({"tensor": 2}, jax.devices()[:2])))


def test_auto_decode_options_pick_the_kernel_and_the_split_on_one_gpu(monkeypatch):
  """`model.decode_attention='auto'` and `model.decode_split_k=0` (the defaults): XLA's attention and
  no split on CPUs or on several devices; on one GPU the kernel and a split of 4, or the largest of
  2 and 1 that divides every contraction."""
  import models.attention  # noqa: PLC0415
  import models.layers  # noqa: PLC0415
  from models.attention import reads_cache_in_place  # noqa: PLC0415
  from models.layers import decode_split  # noqa: PLC0415

  one, two = single_device_plan(), make_plan(make_mesh({"tensor": 2}, jax.devices()[:2]))
  cfg = tiny.CFG
  assert (cfg.decode_attention, cfg.decode_split_k) == ("auto", 0)
  assert not reads_cache_in_place(cfg, one) and decode_split(cfg, 1, one) == 1  # this machine's CPUs
  for module in (models.attention, models.layers):
    monkeypatch.setattr(module, "on_one_gpu", lambda plan: plan.mesh.size == 1)
  assert reads_cache_in_place(cfg, one) and decode_split(cfg, 1, one) == 4
  assert decode_split(cfg, 3, one) == 1, "prompt chunks are not split"
  assert decode_split(dataclasses.replace(cfg, d_ff=cfg.d_ff + 2), 1, one) == 2
  assert decode_split(dataclasses.replace(cfg, decode_split_k=2), 1, one) == 2
  assert not reads_cache_in_place(cfg, two) and decode_split(cfg, 1, two) == 1


@pytest.mark.parametrize("field,value", [("layer_pattern", "LS"), ("n_experts", 4), ("max_seq_len", 32)])
def test_unservable_models_are_refused(field, value):
  cfg = dataclasses.replace(tiny.CFG, **{field: value})
  with pytest.raises(ValueError, match=field):
    make_engine(tiny.random_params(), cfg=cfg)


@pytest.mark.parametrize("unroll,span,greedy", [(1, tiny.MAX_LEN, False), (4, 32, True)])
def test_decode_loop_updates_the_cache_in_place(unroll, span, greedy):
  """The cache is donated to the decode loop, which writes the new keys and values into it without
  copying it (rolled and fully unrolled layers, all of the cache read or a span of it), and
  `decode_steps` tokens come back from one call. A span is copied out of the cache once, before
  the loop, not in every step. A greedy loop compiles no sort (no top-k/top-p)."""
  cfg = dataclasses.replace(tiny.CFG, n_layers=4, scan_unroll=unroll)
  params = tiny.params_of(Transformer(cfg, rngs=nnx.Rngs(0)))
  runner = ModelRunner(cfg, params, plan=single_device_plan(), slots=SLOTS, max_len=tiny.MAX_LEN)
  before = runner.cache
  rows = (np.zeros(SLOTS), np.zeros(SLOTS), np.ones(SLOTS), np.zeros(SLOTS), np.zeros(SLOTS))
  hlo = runner._decode.lower(runner.params, before, np.zeros(SLOTS, np.int32), np.ones(SLOTS, bool),
                             _row_arrays(rows), steps=3, span=span, greedy=greedy).compile().as_text()
  cache_shape = "[" + ",".join(map(str, before.k.shape)) + "]"
  copies = [line for line in hlo.splitlines() if " copy(" in line and cache_shape in line.split(" copy(")[0]]
  assert not copies, copies
  window_shape = "[" + ",".join(map(str, (*before.k.shape[:3], span, before.k.shape[4]))) + "]"
  span_slices = [line for line in hlo.splitlines() if f"{window_shape}" in line.split(" slice(")[0] and " slice(" in line]
  assert len(span_slices) == (2 if span < tiny.MAX_LEN else 0), span_slices  # k and v
  assert not [line for line in span_slices if "/while/" in line], span_slices
  assert (" sort(" in hlo) != greedy
  tokens, logprobs = runner.decode(np.zeros(SLOTS, np.int32), np.ones(SLOTS, bool), rows, 3, span=span)
  assert before.k.is_deleted() and before.v.is_deleted()
  assert tokens.shape == logprobs.shape == (3, SLOTS)
  np.testing.assert_array_equal(np.asarray(runner.cache.lengths), [3] * SLOTS)


def test_a_window_hands_the_loop_tokens_back_to_the_cache():
  """A decode loop over a span of the cache writes its tokens into the window alone and copies
  them back at its end: the cache and tokens equal those of a loop over the whole cache, for slots
  whose last token lands on the span's last position, short slots and an inactive one."""
  params = tiny.random_params()
  runners = [ModelRunner(tiny.CFG, params, plan=single_device_plan(), slots=3, max_len=tiny.MAX_LEN) for _ in range(2)]
  greedy_rows = (np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3))
  prompts = [np.tile(tiny.PATTERN, 3)[:29], tiny.PATTERN[:5], tiny.PATTERN[:7]]
  active = np.array([True, True, False])
  out = []
  for runner, span in zip(runners, (32, None)):
    first, _ = runner.prefill([(np.asarray(p), slot, 0) for slot, p in enumerate(prompts)], 32,
                              tuple(np.repeat(a[:1], 3) for a in greedy_rows))
    tokens, _ = runner.decode(np.asarray(first)[:3], active, greedy_rows, 3, span=span)
    out.append((np.asarray(tokens), jax.device_get((runner.cache.k, runner.cache.v, runner.cache.lengths))))
  np.testing.assert_array_equal(out[0][1][2], [32, 8, 7])  # slot 0 wrote positions 29-31 of the 32
  np.testing.assert_array_equal(out[0][0][:, :2], out[1][0][:, :2])
  for got, want in zip(out[0][1], out[1][1]):
    np.testing.assert_array_equal(got, want)


def test_warm_up_compiles_every_decode_program_and_writes_nothing():
  """After `warm_up_decode`, requests that grow through every span, greedy and sampled, compile no
  new decode program; the warm-up left the cache empty, so their tokens are those of a cold engine."""
  params = tiny.random_params()
  warm, cold = make_engine(params, decode_steps=2), make_engine(params, decode_steps=2)
  runner = warm._replicas[0].runner
  assert warm.warm_up_decode() == 2 * 3  # spans 16, 32, 64 (MIN_SPAN up to MAX_LEN)
  compiled = runner._decode._cache_size()
  assert not np.any(np.asarray(runner.cache.lengths)) and not np.any(np.asarray(runner.cache.k))
  sample = lambda rid, prompt, n: Request(rid, tuple(prompt), SamplingParams(max_tokens=n, temperature=0.8, seed=3))
  requests = lambda: [greedy("a", tiny.PATTERN[:5], 50), sample("b", tiny.PATTERN[:9], 40)]
  assert run(warm, requests()) == run(cold, requests())
  assert runner._decode._cache_size() == compiled


def test_prefill_warm_up_covers_a_burst_and_writes_nothing():
  """After `warm_up_prefill`, a burst of requests with prompts of many lengths, all joining at
  once, compiles no new prefill program, and their tokens are those of a cold engine."""
  params = tiny.random_params()
  warm, cold = make_engine(params, slots=8, token_budget=32), make_engine(params, slots=8, token_budget=32)
  runner = warm._replicas[0].runner
  assert warm.warm_up_prefill() == 2 * 2 * 4  # chunk lengths 16 and 32, each with 1, 2, 4 or 8 rows
  compiled = runner._prefill._cache_size()
  assert not np.any(np.asarray(runner.cache.lengths)) and not np.any(np.asarray(runner.cache.k))
  rng = np.random.default_rng(2)
  requests = lambda: [greedy(str(i), rng_prompt, 4) for i, rng_prompt in enumerate(prompts)]
  prompts = [rng.integers(0, tiny.CFG.vocab_size, int(n)) for n in rng.integers(2, 40, 8)]
  assert run(warm, requests()) == run(cold, requests())
  assert runner._prefill._cache_size() == compiled


def test_bf16_decode_follows_the_full_forward_pass():
  """bf16 compute (weights cast once, bf16 cache): along the engine's own tokens, each one is the
  argmax and carries the log-probability of the full bf16 forward pass, within bf16's 2e-2 of the
  logits' size (rounding may reorder near-ties, so the reference is taken on the engine's path)."""
  cfg = dataclasses.replace(tiny.CFG, compute_dtype="bfloat16")
  params = tiny.trained_params()
  prompt = np.tile(tiny.PATTERN, 2)[4:21]
  out = run(make_engine(params, cfg=cfg), [greedy("a", prompt, 8)])["a"]
  seq = np.zeros((1, tiny.MAX_LEN), np.int32)
  seq[0, :len(prompt) + 8] = np.concatenate([prompt, out[0]])
  logits = np.asarray(tiny.forward_fn(cfg)(params, seq))[0, len(prompt) - 1:len(prompt) + 7].astype(np.float64)
  scale = np.abs(logits).max(-1)
  chosen = logits[np.arange(8), out[0]]
  assert np.all((logits.max(-1) - chosen) / scale <= 2e-2)
  logp = chosen - logits.max(-1) - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  assert np.all(np.abs(np.asarray(out[1]) - logp) / scale <= 2e-2)


def test_prefill_rows_in_one_pass_and_padding_rows_write_nothing():
  """Prompt chunks of three slots in one forward pass (rows padded to four): each row's next token
  is the full forward pass's argmax after its prompt, and the padding row (slot id past the last,
  which reads the last slot) leaves the last slot's keys, values and length as they were."""
  params = tiny.trained_params()
  runner = ModelRunner(tiny.CFG, params, plan=single_device_plan(), slots=4, max_len=tiny.MAX_LEN)
  greedy_rows = lambda n: (np.zeros(n), np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n))
  runner.prefill([(tiny.PATTERN[:7], 3, 0)], 16, greedy_rows(1))
  k3, v3 = np.asarray(runner.cache.k[:, 3]), np.asarray(runner.cache.v[:, 3])
  prompts = [tiny.PATTERN[:5], np.tile(tiny.PATTERN, 2)[2:15], tiny.PATTERN[1:4]]
  tokens, _ = runner.prefill([(p, i, 0) for i, p in enumerate(prompts)], 16, greedy_rows(3))
  assert tokens.shape == (4,)
  for i, p in enumerate(prompts):
    assert int(tokens[i]) == tiny.reference_decode(params, p, 1)[0][0], f"row {i}"
  np.testing.assert_array_equal(np.asarray(runner.cache.lengths), [5, 13, 3, 7])
  np.testing.assert_array_equal(np.asarray(runner.cache.k[:, 3]), k3)
  np.testing.assert_array_equal(np.asarray(runner.cache.v[:, 3]), v3)
