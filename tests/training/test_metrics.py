"""Throughput, MFU and the FLOPs-per-token formula against hand computations."""

import time
import types

import jax
import pytest

import configs
from models.transformer import flops_per_token
from training import metrics
from training.metrics import Throughput
from training.state import setup_from_config


def test_throughput_counts_finished_steps():
  meter = Throughput(tokens_per_step=1000, flops_per_token=1.0)
  meter.reset(5)
  assert meter.measure(5) == {}  # nothing finished since the reset: no rate, not a huge one
  time.sleep(0.05)
  out = meter.measure(15)
  assert 0.005 <= out["step_time_s"] < 0.05  # 10 steps in >= 50 ms
  assert abs(out["tokens_per_s"] * out["step_time_s"] - 1000) < 1e-6
  time.sleep(0.02)
  assert 0.02 <= meter.measure(16)["step_time_s"] < 0.5  # the interval restarts at each measure


def test_mfu_is_model_flops_over_peak_of_all_devices(monkeypatch):
  clock = iter([0.0, 100.0, 102.0])  # construction, reset, measure
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  meter = Throughput(tokens_per_step=1000, flops_per_token=6e6, peak_flops=1e12, n_devices=8)
  meter.reset(0)
  out = meter.measure(10)  # 10 steps in 2 s
  assert out["step_time_s"] == pytest.approx(0.2)
  assert out["tokens_per_s"] == pytest.approx(5000.0)
  assert out["mfu"] == pytest.approx(5000 * 6e6 / (1e12 * 8))  # = 0.00375


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_counts_six_per_weight_and_causal_attention(tied):
  cfg = configs.get_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=3", "model.n_heads=4",
                                    "model.n_kv_heads=2", "model.d_ff=48", f"model.tie_embeddings={tied}"])
  v, d, n, h, k, hd, f = 64, 32, 3, 4, 2, 8, 48
  layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f + 2 * d  # q, k+v, o, gate/up/down, norms
  params = v * d + n * layer + d + (0 if tied else d * v)
  assert setup_from_config(cfg, jax.devices()[:1]).n_params == params
  # 6 FLOPs per weight per token (forward 2, backward 4), the input embedding excepted (a lookup);
  # tied, the table is also the output layer. Causal attention: 6 x layers x d_model x seq.
  matmul_weights = params - (0 if tied else v * d)
  seq = 128
  assert flops_per_token(cfg.model, params, seq) == 6 * matmul_weights + 6 * n * d * seq


def test_flops_per_token_of_linear_layers():
  """A linear-attention layer's attention: the causal half of each chunk's quadratic form (forward
  2 x d x chunk) and the state's read and update (forward 4 x d x head_dim), times 3 to train."""
  base = ["model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", "model.linear_chunk=16"]
  hybrid = configs.get_config("tiny", base + ["model.layer_pattern=LS"]).model
  n_params, seq = 10_000, 128
  matmuls = n_params - hybrid.vocab_size * 32
  want = 6 * matmuls + 2 * 6 * 32 * seq + 2 * 3 * (2 * 32 * 16 + 4 * 32 * 8)
  assert flops_per_token(hybrid, n_params, seq) == want
