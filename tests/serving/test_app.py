"""The HTTP API with the official `openai` client, on uvicorn servers bound to 127.0.0.1.

Two kinds of server: the real `Engine` on a tiny random-init model (what the model generates:
completions, chat, streaming, seeds, 64 concurrent streams), and `StandInEngine` (http_helpers.py;
exact, predictable output and controllable timing) for the HTTP layer's own mechanics: stop
strings, error statuses, the bounded queue, aborts on disconnect, an engine failure.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from data.tokenizer import ByteTokenizer
from serving.app import create_app
from serving.async_engine import AsyncEngine
from serving.chat_template import DEFAULT_TEMPLATE, ChatTemplate, load_chat_template
from serving.engine import SamplingParams
from tests.serving.http_helpers import Server, StandInEngine

TIMEOUT = 60.0


def _serve(engine, *, max_waiting: int = 64, template: ChatTemplate | None = None, graceful_s: float = 5.0):
  async_engine = AsyncEngine(engine, ByteTokenizer(), max_waiting=max_waiting)
  app = create_app(async_engine, ByteTokenizer(), model_name="tiny",
                   chat_template=template or ChatTemplate(DEFAULT_TEMPLATE))
  return Server(app, async_engine, graceful_s), async_engine


def _client(server: Server) -> openai.OpenAI:
  # No retries: a 429 or 5xx must reach the test as it was sent.
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _metric(server: Server, line_start: str) -> float:
  text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
  for line in text.splitlines():
    if line.startswith(line_start + " "):
      return float(line.split()[-1])
  raise AssertionError(f"{line_start} not in /metrics:\n{text}")


def _wait_for(condition, timeout: float = 10.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "condition not reached in time"
    time.sleep(0.02)


# ---- the stand-in engine: the HTTP layer's mechanics -------------------------------------------

@pytest.fixture(scope="module")
def standin():
  engine = StandInEngine(slots=4, max_len=64)
  server, async_engine = _serve(engine)
  yield server, engine, async_engine
  server.stop()


def test_completion_text_usage_and_logprobs(standin):
  server, _, _ = standin
  r = _client(server).completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=0)
  assert r.choices[0].text == "defg" and r.choices[0].finish_reason == "length"
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)
  assert r.choices[0].logprobs.tokens == list("defg") and r.choices[0].logprobs.token_logprobs == [-0.5] * 4
  assert r.choices[0].logprobs.text_offset == [0, 1, 2, 3]
  chunks = list(_client(server).completions.create(model="tiny", prompt="abc", max_tokens=4, logprobs=0, stream=True))
  assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == [0, 1, 2, 3]


def test_completion_token_ids_several_prompts_and_n(standin):
  server, _, _ = standin
  r = _client(server).completions.create(model="tiny", prompt=["ab", "xy"], max_tokens=2, n=2)
  assert [(c.index, c.text) for c in r.choices] == [(0, "cd"), (1, "cd"), (2, "z{"), (3, "z{")]
  assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 8
  r = _client(server).completions.create(model="tiny", prompt=[104, 105], max_tokens=1)
  assert r.choices[0].text == "j"


def test_stop_strings_cut_the_text_and_free_the_slot(standin):
  server, engine, async_engine = standin
  client = _client(server)
  r = client.completions.create(model="tiny", prompt="abc", max_tokens=20, stop=["hi", "zz"])
  assert r.choices[0].text == "defg" and r.choices[0].finish_reason == "stop"
  # Streamed: "f" could start the stop string "fgX" and is held back until "h" rules it out.
  deltas = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="abc", max_tokens=6,
                                                                  stop="fgX", stream=True)]
  assert "".join(deltas) == "defghi"
  assert "f" not in deltas and "fgh" in deltas
  _wait_for(lambda: async_engine.num_outstanding == 0 and engine.num_running == 0)


def test_eos_ends_the_text_without_showing():
  class EosG(ByteTokenizer):
    eos_id = ord("g")

  async def run():
    engine = AsyncEngine(StandInEngine(eos_id=ord("g")), EosG())
    engine.start()
    handle = await engine.submit(list(b"abc"), SamplingParams(max_tokens=10))
    outs = [o async for o in handle.stream()]
    engine.shutdown()
    return outs

  outs = asyncio.run(run())
  assert "".join(o.text for o in outs) == "def" and outs[-1].finish_reason == "stop"
  assert [t for o in outs for t in o.token_ids] == list(b"defg")  # counted, not shown


def test_chat_uses_the_plain_default_template(standin):
  server, engine, _ = standin
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
  r = _client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=3)
  assert bytes(engine.prompts[-1]).decode() == "system: Be brief.\nuser: hi\nassistant:"
  assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ";<="
  assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_chat_streaming_with_usage(standin):
  server, _, _ = standin
  chunks = list(_client(server).chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == ";<=>"
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_chat_template_from_tokenizer_config(tmp_path):
  # The reference rendering is transformers' own.
  from transformers.utils.chat_template_utils import render_jinja_template
  source = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
  template = load_chat_template([str(tmp_path)])
  messages = [{"role": "system", "content": " S "}, {"role": "user", "content": "hello"}]
  want = render_jinja_template(conversations=[messages], chat_template=source, add_generation_prompt=True,
                               bos_token="<s>", eos_token="</s>")[0][0]
  assert template.render(messages) == want
  engine = StandInEngine(slots=1, max_len=128)
  server, _ = _serve(engine, template=template)
  try:
    r = _client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert bytes(engine.prompts[-1]).decode() == want
    assert r.choices[0].message.content == "?@"  # after ">" of "<|assistant|>"
  finally:
    server.stop()


BAD_REQUESTS = [  # (what, endpoint, body, status, param)
    ("unknown model", "completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("max_tokens 0", "completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens < 0", "chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                            "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens past the context", "completions", {"model": "tiny", "prompt": "abc", "max_tokens": 62}, 400,
     "max_tokens"),
    ("temperature < 0", "completions", {"model": "tiny", "prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("prompt longer than the context", "completions", {"model": "tiny", "prompt": "x" * 64, "max_tokens": 1}, 400,
     "prompt"),
    ("chat prompt longer than the context", "chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x" * 80}]}, 400, "prompt"),
    ("wrong type: max_tokens a string", "completions", {"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400,
     "max_tokens"),
    ("wrong type: prompt a number", "completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("wrong type: messages not a list", "chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("missing messages", "chat/completions", {"model": "tiny"}, 400, "messages"),
    ("unknown role", "chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "a"}]}, 400,
     "messages"),
    ("token id out of range", "completions", {"model": "tiny", "prompt": [1, 999]}, 400, "prompt"),
    ("top_p 0", "completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top log-probabilities", "completions", {"model": "tiny", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
]


@pytest.mark.parametrize("what,endpoint,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(standin, what, endpoint, body, status, param):
  server, _, _ = standin
  r = httpx.post(f"{server.url}/v1/{endpoint}", json=body, timeout=TIMEOUT)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  assert error["param"] == param, error


def test_bad_json_and_unknown_routes(standin):
  server, _, _ = standin
  r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=TIMEOUT,
                 headers={"content-type": "application/json"})
  error = r.json()["error"]
  assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] is None
  assert "JSON" in error["message"]
  r = httpx.get(f"{server.url}/v1/nothing", timeout=TIMEOUT)
  assert r.status_code == 404 and "error" in r.json()


def test_the_openai_client_raises_the_matching_errors(standin):
  server, _, _ = standin
  client = _client(server)
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="other", prompt="a")
  with pytest.raises(openai.BadRequestError) as err:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], temperature=-1)
  assert err.value.body["param"] == "temperature"
  # Bad requests leave the server serving.
  assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text == "bc"


def test_models_health_and_metrics(standin):
  server, _, _ = standin
  client = _client(server)
  assert [m.id for m in client.models.list().data] == ["tiny"]
  assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
  client.completions.create(model="tiny", prompt="abc", max_tokens=3)
  text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
  for name in ("shardlab_num_requests_waiting", "shardlab_num_requests_running",
               "shardlab_generation_tokens_per_second", "shardlab_time_to_first_token_seconds_bucket",
               "shardlab_time_per_output_token_seconds_count", "shardlab_e2e_request_latency_seconds_sum",
               'shardlab_request_success_total{finished_reason="length"}'):
    assert name in text, name
  assert _metric(server, "shardlab_time_to_first_token_seconds_count") >= 1
  assert _metric(server, 'shardlab_time_to_first_token_seconds_bucket{le="+Inf"}') == \
      _metric(server, "shardlab_time_to_first_token_seconds_count")
  assert _metric(server, "shardlab_generation_tokens_total") >= 3


# ---- timing-dependent mechanics: one slot, one waiting place, slow steps -----------------------

@pytest.fixture
def slow():
  engine = StandInEngine(slots=1, max_len=64, step_s=0.02)
  server, async_engine = _serve(engine, max_waiting=1)
  yield server, engine, async_engine
  server.stop()


def _open_stream(server: Server, prompt: str, max_tokens: int):
  client = httpx.Client(timeout=TIMEOUT)
  body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
  response = client.send(client.build_request("POST", server.url + "/v1/completions", json=body), stream=True)
  return client, response


def test_full_queue_answers_429(slow):
  server, _, _ = slow
  held = [_open_stream(server, "a", 60) for _ in range(2)]  # one running, one waiting: full
  try:
    assert all(r.status_code == 200 for _, r in held)
    with pytest.raises(openai.RateLimitError) as err:
      _client(server).completions.create(model="tiny", prompt="a", max_tokens=1)
    assert err.value.body["code"] == "rate_limit_exceeded"
  finally:
    for client, response in held:
      response.close()
      client.close()
  # The aborted streams freed their places.
  _wait_for(lambda: _client(server).completions.create(model="tiny", prompt="a", max_tokens=1) is not None)


def test_disconnect_mid_stream_frees_the_slot(slow):
  server, engine, async_engine = slow
  client, response = _open_stream(server, "a", 60)
  lines = response.iter_lines()
  first = next(line for line in lines if line.startswith("data: "))
  assert json.loads(first[6:])["choices"][0]["text"] == "b"
  response.close()
  client.close()
  _wait_for(lambda: engine.num_running == 0 and async_engine.num_outstanding == 0)
  assert len(engine.aborted) == 1
  assert _metric(server, 'shardlab_request_success_total{finished_reason="abort"}') == 1
  r = _client(server).completions.create(model="tiny", prompt="a", max_tokens=2)
  assert r.choices[0].text == "bc"


def test_disconnect_while_waiting_non_streaming(slow):
  server, engine, async_engine = slow
  hold_client, hold = _open_stream(server, "a", 60)  # takes the one slot
  waiting = httpx.Client(timeout=0.3)
  with pytest.raises(httpx.ReadTimeout):  # gives up while its request waits for the slot
    waiting.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "q", "max_tokens": 5})
  waiting.close()
  _wait_for(lambda: async_engine.num_outstanding == 1)
  hold.close()
  hold_client.close()
  _wait_for(lambda: async_engine.num_outstanding == 0 and engine.num_running == 0 and engine.num_waiting == 0)
  assert bytes(engine.prompts[-1]) == b"q"


def test_draining_answers_503(slow):
  server, _, async_engine = slow
  async_engine.draining = True  # as after SIGTERM, for a request on a connection still open
  r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a"}, timeout=TIMEOUT)
  assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
  assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 503


def test_engine_failure_is_a_500_and_unhealthy():
  server, async_engine = _serve(StandInEngine(fail_on=b"boom"))
  try:
    with pytest.raises(openai.InternalServerError):
      _client(server).completions.create(model="tiny", prompt="boom", max_tokens=2)
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 503
    with pytest.raises(openai.InternalServerError):
      _client(server).completions.create(model="tiny", prompt="a", max_tokens=2)
  finally:
    server.stop()


def test_sigterm_finishes_short_requests_and_cancels_long_ones():
  engine = StandInEngine(slots=2, max_len=64, step_s=0.02)
  server, async_engine = _serve(engine, graceful_s=0.5)
  client = _client(server)
  short = client.completions.create(model="tiny", prompt="a", max_tokens=10, stream=True)  # ~0.2 s
  long = client.completions.create(model="tiny", prompt="a", max_tokens=60, stream=True)  # ~1.2 s
  next(iter(short)), next(iter(long))
  server.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
  assert "".join(c.choices[0].text for c in short).endswith("k")  # all 10 tokens: "b".."k"
  ends = [c.choices[0].finish_reason for c in long]  # cut when the grace period ends
  assert ends[-1] == "abort" and len(ends) < 60
  server._thread.join(10)
  assert not server._thread.is_alive() and not async_engine.alive
  assert engine.aborted and async_engine.metrics.finished["abort"] == 1
  with pytest.raises(httpx.ConnectError):
    httpx.get(server.url + "/health", timeout=TIMEOUT)


# ---- serve.py with the real engine on a tiny random-init model ---------------------------------

# A random initialisation (train.seed) that the test rebuilds in-process for its reference; a large
# init spreads the logits, so argmax has no near-ties to trip on.
SERVED = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
          "data.seq_len=64", "model.init_std=0.5"]
EOS = ByteTokenizer.eos_id


def _sigterm_mid_stream(proc, url: str, log) -> None:
  """SIGTERM while a stream runs: the stream completes (the grace period is long), exit status 0."""
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
  chunks = iter(client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=40, stream=True,
                                          stream_options={"include_usage": True}))
  next(chunks)
  proc.send_signal(signal.SIGTERM)
  rest = list(chunks)
  assert rest[-1].usage is not None and any(c.choices and c.choices[0].finish_reason for c in rest)
  assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
  assert "draining" in log.read_text()
  with pytest.raises(httpx.ConnectError):
    httpx.get(url + "/health", timeout=TIMEOUT)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(url, ref): serve.py in a subprocess, as a user starts it; ref(prompt_ids, n) -> the greedy
  tokens and their log-probabilities from full forward passes of the same parameters (in-process,
  no cache). Its teardown checks the shutdown: SIGTERM mid-stream, then a clean exit."""
  import subprocess
  import sys

  import jax
  import numpy as np
  from flax import nnx

  import configs
  from models.transformer import Transformer
  from serving.loading import load
  from tests import runs

  log = tmp_path_factory.mktemp("serve") / "serve.log"
  cmd = [sys.executable, str(runs.REPO / "serve.py"), "--config=tiny", "--port=0", "--slots=8", "--token_budget=16",
         "--max_waiting=64", "--graceful_s=30", *[f"--set={o}" for o in SERVED]]
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(devices=1), stdout=subprocess.PIPE, stderr=err,
                            text=True)
  try:
    # While serve.py starts, build the reference from the same initialisation.
    loaded = load(configs.get_config("tiny", SERVED), devices=jax.devices()[:1])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(loaded.config.model, rngs=nnx.Rngs(0))))
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t).astype("float32"), axis=-1))

    def ref(prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
      ids, lps = list(prompt_ids), []
      for _ in range(n):
        padded = np.zeros((1, 64), np.int32)  # causal: the padding after the end changes nothing
        padded[0, :len(ids)] = ids
        row = np.asarray(forward(loaded.params, padded))[0, len(ids) - 1]
        ids.append(int(row.argmax()))
        lps.append(float(row.max()))
        if ids[-1] == EOS:
          break
      return ids[len(prompt_ids):], lps

    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, log.read_text()[-3000:]
    assert "loaded random initialisation" in log.read_text()
    url = line.rsplit("listening on ", 1)[1].strip()
    yield url, ref
    _sigterm_mid_stream(proc, url, log)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _served_client(url: str) -> openai.OpenAI:
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _ids(tokens: list[str]) -> list[int]:
  return [int(t.removeprefix("token_id:")) for t in tokens]


def test_greedy_completion_equals_the_reference(served):
  url, ref = served
  client = _served_client(url)
  assert [m.id for m in client.models.list().data] == ["tiny"]
  want_ids, want_lps = ref(list(b"Hello"), 6)
  r = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=0,
                                extra_body={"return_tokens_as_token_ids": True})
  choice = r.choices[0]
  assert _ids(choice.logprobs.tokens) == want_ids and r.usage.completion_tokens == len(want_ids)
  assert choice.finish_reason == ("stop" if want_ids[-1] == EOS else "length")
  assert choice.text == ByteTokenizer().decode(want_ids)
  close = [abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(choice.logprobs.token_logprobs, want_lps)]
  assert all(close), (choice.logprobs.token_logprobs, want_lps)
  # The same through the streaming path.
  stream = client.completions.create(model="tiny", prompt=list(b"Hello"), max_tokens=6, temperature=0, stream=True,
                                     logprobs=0, extra_body={"return_tokens_as_token_ids": True})
  assert _ids([t for c in stream for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]) == want_ids


def test_greedy_chat_equals_the_reference(served):
  url, ref = served
  client = _served_client(url)
  want_ids, _ = ref(list(b"user: hi\nassistant:"), 5)
  messages = [{"role": "user", "content": "hi"}]
  r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                     extra_body={"return_tokens_as_token_ids": True})
  assert _ids([t.token for t in r.choices[0].logprobs.content]) == want_ids
  assert r.choices[0].message.content == ByteTokenizer().decode(want_ids)
  chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_a_seeded_sample_is_reproduced(served):
  url, _ = served
  client = _served_client(url)

  def sample(seed: int) -> list[int]:
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, top_p=0.95, seed=seed,
                                  logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    return _ids(r.choices[0].logprobs.tokens)

  first = sample(7)
  assert sample(7) == first
  assert sample(8) != first  # a spread distribution: equal draws only by a vanishing chance


def test_64_concurrent_streams(served):
  url, _ = served

  async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str | None]:
    stream = await client.completions.create(model="tiny", prompt=f"request {i}", max_tokens=4, temperature=0.7,
                                             seed=i, stream=True, stream_options={"include_usage": True})
    tokens, reason = 0, None
    async for chunk in stream:
      if chunk.usage is not None:
        tokens = chunk.usage.completion_tokens
      for c in chunk.choices:
        reason = c.finish_reason or reason
    return tokens, reason

  async def run():
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    async with client:
      return await asyncio.wait_for(asyncio.gather(*[one(client, i) for i in range(64)]), TIMEOUT)

  results = asyncio.run(run())
  assert all(reason in ("length", "stop") and 1 <= n <= 4 for n, reason in results), results
  assert all(n == 4 for n, reason in results if reason == "length"), results
  text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
  assert 'shardlab_request_success_total{finished_reason="abort"} 0' in text


def test_serve_py_decodes_speculatively_over_a_paged_cache(tmp_path):
  """serve.py with --draft_hf (the served model itself exported as the draft, so every proposal is
  accepted) and a paged cache with prefix caching: a greedy completion equals the full forward
  pass's, twice (the second time its prompt's first block comes from the prefix cache), and
  /metrics counts the proposals and the prefix hits."""
  import subprocess
  import sys

  import jax
  import numpy as np
  from flax import nnx

  import configs
  from models.hf_llama import save_hf_checkpoint
  from models.transformer import Transformer
  from serving.loading import load
  from tests import runs

  loaded = load(configs.get_config("tiny", SERVED), devices=jax.devices()[:1])
  save_hf_checkpoint(tmp_path / "draft", loaded.config.model, jax.device_get(loaded.params))
  log = tmp_path / "serve.log"
  cmd = [sys.executable, str(runs.REPO / "serve.py"), "--config=tiny", "--port=0", "--slots=2", "--token_budget=16",
         f"--draft_hf={tmp_path / 'draft'}", "--speculative_tokens=3", "--page_size=8", "--warmup=false",
         *[f"--set={o}" for o in SERVED]]
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(devices=1), stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(loaded.config.model, rngs=nnx.Rngs(0))))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).astype("float32"))
    ids = list(b"Speculate")
    for _ in range(12):
      padded = np.zeros((1, 64), np.int32)
      padded[0, :len(ids)] = ids
      ids.append(int(np.asarray(forward(loaded.params, padded))[0, len(ids) - 1].argmax()))
      if ids[-1] == EOS:
        break
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, log.read_text()[-3000:]
    url = line.rsplit("listening on ", 1)[1].strip()
    for _ in range(2):
      got = _served_client(url).completions.create(model="tiny", prompt="Speculate", max_tokens=12, temperature=0,
                                                   logprobs=0, extra_body={"return_tokens_as_token_ids": True})
      assert _ids(got.choices[0].logprobs.tokens) == ids[len(b"Speculate"):]
    metrics = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("shardlab_")}
    assert values["shardlab_spec_decode_num_draft_tokens_total"] > 0
    assert values["shardlab_spec_decode_draft_acceptance_rate"] == 1.0, values
    assert values["shardlab_prefix_cache_queries_total"] == 2 * len(b"Speculate")
    assert values["shardlab_prefix_cache_hits_total"] == 8, values  # one block of 8, the second time
    assert "draft model" in log.read_text() and "paged KV cache" in log.read_text()
  finally:
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.parametrize("flag,message", [("--slots=0", "--slots=0: must be >= 1"),
                                          ("--max_len=4096", "--max_len=4096: must be <= model.max_seq_len=128"),
                                          ("--speculative_tokens=0", "--speculative_tokens=0: must be >= 1"),
                                          ("--num_pages=64", "--num_pages=64 needs --page_size")])
def test_serve_py_refuses_bad_flags_before_loading(flag, message):
  import subprocess
  import sys

  from tests import runs

  p = subprocess.run([sys.executable, str(runs.REPO / "serve.py"), "--config=tiny", flag], cwd=runs.REPO,
                     env=runs.env(devices=1), capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and f"ConfigError: {message}" in p.stderr, p.stderr[-2000:]
