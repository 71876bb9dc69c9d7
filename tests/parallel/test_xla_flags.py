"""The GPU XLA defaults (`parallel/xla_flags.py`): added on a CUDA machine, never over a flag the
user set, and not at all where JAX runs on the CPU."""

import os

from parallel import xla_flags


def test_defaults_join_the_users_flags(monkeypatch):
  monkeypatch.setattr(xla_flags, "_has_cuda_plugin", lambda: True)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/dump")
  xla_flags.apply_default_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_triton_gemm=true" in flags and "--xla_gpu_enable_triton_gemm=false" not in flags
  assert "--xla_dump_to=/dump" in flags and "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert f"--xla_gpu_all_gather_combine_threshold_bytes={256 * 2**20}" in flags


def test_nothing_on_the_cpu(monkeypatch):
  monkeypatch.setattr(xla_flags, "_has_cuda_plugin", lambda: True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--a=1")
  xla_flags.apply_default_flags()
  assert os.environ["XLA_FLAGS"] == "--a=1"


def test_serving_adds_its_own(monkeypatch):
  monkeypatch.setattr(xla_flags, "_has_cuda_plugin", lambda: True)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_flags.apply_default_flags(serving=True)
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_disable_hlo_passes=dot-merger" in flags and "--xla_gpu_enable_triton_gemm=false" in flags
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_flags.apply_default_flags()
  assert not any(f.startswith("--xla_disable_hlo_passes") for f in os.environ["XLA_FLAGS"].split())


def test_experts_keep_their_loops_on_the_device(monkeypatch):
  monkeypatch.setattr(xla_flags, "_has_cuda_plugin", lambda: True)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_flags.apply_default_flags(device_loops=True)
  assert "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" in os.environ[
      "XLA_FLAGS"].split()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")  # the user's choice wins
  xla_flags.apply_default_flags(device_loops=True)
  assert [f for f in os.environ["XLA_FLAGS"].split() if "command_buffer" in f] == ["--xla_gpu_enable_command_buffer=FUSION"]
