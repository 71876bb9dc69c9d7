"""Typed configuration: one dataclass per section, one `Config` that holds them all.

Configs are plain data. Presets live in `configs/presets.py`; every check of a value lives in
`configs/validate/`; `configs/overrides.py` turns `section.field=value` strings into a new config.
The names other packages share (mesh axes, data sources, strategies) are defined here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Mesh axes, outermost (slowest link) to innermost. Every mesh has all of them; size 1 costs nothing.
MESH_AXES = ("replica", "stage", "data", "fsdp", "seq", "expert", "tensor")
# The mesh axes a global batch is split over, by rows.
BATCH_MESH_AXES = ("replica", "data", "fsdp")
# Multi-host: the axes that may be split across hosts (slow links), outermost first.
CROSS_HOST_AXES = ("replica", "data", "fsdp", "stage")

DATA_SOURCES = ("builtin", "text", "tokens", "synthetic")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_and_attention")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DECODE_ATTENTIONS = ("auto", "xla", "pallas")
DTYPES = ("float32", "bfloat16")

# Named strategies of a `ShardingPlan` (parallel/plan.py), one tuple of choices per family.
# Attention over the `seq` axis: "dense" keeps the whole sequence on each device (mesh.seq == 1);
# the others are the context-parallel ops of parallel/attention/.
# "lasp2": LASP-2H, for models with linear-attention layers: LASP-2 for those, all-gather-KV for
# the softmax ones. (Linear layers use LASP-2 over `seq` under every method.)
ATTENTION_METHODS = ("dense", "allgather", "ring", "tokenring", "ulysses", "usp", "lasp2")
CONTEXT_LAYOUTS = ("contiguous", "zigzag", "striped")  # token order over `seq` (causal load balance)
# Schedule over the `stage` axis (parallel/pipeline/schedule.py); "none": no pipeline.
PIPELINE_SCHEDULES = ("none", "gpipe", "circular", "1f1b", "interleaved", "zb-h1", "zb-v")
# What happens over `replica` (parallel/lowcomm/): "sync" all-reduces gradients every step; the
# others let each island train on its own and communicate rarely, compressed, or with one peer.
REPLICA_ALGORITHMS = ("sync", "diloco", "streaming_diloco", "noloco", "co2", "sparseloco", "onebit_adam",
                      "econtrol", "zeroth_order")
# Mixture of experts: how routed tokens reach their experts (parallel/experts/), and the router's
# score function (softmax over experts: Mixtral, Qwen; sigmoid: DeepSeek-V3).
EXPERT_DISPATCHES = ("capacity", "dropless")
EXPERT_ALL_TO_ALL = ("auto", "padded", "ragged")  # "auto": ragged on GPU/TPU, padded on CPU
# Dropless expert matmuls; "auto": mgpu (JAX's Mosaic GPU kernels, parallel/experts/mgpu_matmul.py) for
# one device's bf16 layer on Hopper, rounds on other GPUs, xla elsewhere; "tiled": batched matmuls over
# expert-aligned tiles (parallel/experts/tiled.py); "rounds": over [E, C, D] slots in rounds (rounds.py).
GROUPED_MATMULS = ("auto", "xla", "tokamax", "mgpu", "tiled", "rounds")
ROUTER_SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 512
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 8
  n_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 256
  max_seq_len: int = 128
  rope_theta: float = 10000.0
  # Llama-3 frequency scaling; rope_scaling_factor == 1.0 turns it off.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  compute_dtype: str = "float32"  # "bfloat16" for mixed precision
  # "auto": cuDNN flash attention on GPUs with bf16 compute, XLA otherwise; or force "xla" / "cudnn".
  attention_impl: str = "auto"
  # A served decode step's attention (one new token per row over the KV cache): "xla", or "pallas",
  # one Pallas (Triton) kernel per layer that also writes the new keys and values
  # (parallel/attention/decode_kernel.py; one device only; on CPUs it runs in the Pallas
  # interpreter, which is slow: for tests), or "auto": "pallas" when the engine runs on one GPU,
  # "xla" otherwise. With decode_split_k=4 it took a batch-1 `1b` step on one H100 from 1.14 to
  # 0.99 ms (BENCHMARKS.md).
  decode_attention: str = "auto"
  # A decode step's q/k/v, output, gate/up (fused layout), down and head products with their
  # contraction cut into this many parts that multiply as one batched product (models/layers.py,
  # split_k_product): more blocks in flight for products of one or two rows. One device only; 1 is
  # the plain product; 0 ("auto") is 4 when the engine runs on one GPU (2 or 1 where 4 does not
  # divide the contractions), else 1.
  decode_split_k: int = 0
  remat: str = "none"  # one of REMAT_POLICIES
  # Attention kind of each layer, "S" softmax or "L" decayed linear attention, repeated to
  # n_layers: "S" (the default) is a plain Llama, "L" all linear, "LLS" a hybrid.
  layer_pattern: str = "S"
  linear_chunk: int = 64  # tokens per chunk of the chunked linear attention
  scan_unroll: int = 1  # layers per scan iteration; n_layers unrolls fully (slower compile)
  init_std: float = 0.02
  # Attention options of Qwen-family checkpoints: biases on the q/k/v projections (Qwen2), and
  # RMSNorm over each head's queries and keys before RoPE (Qwen3).
  qkv_bias: bool = False
  qk_norm: bool = False
  # Mixture of experts (models/moe.py). n_experts == 0: every layer's MLP is dense.
  n_experts: int = 0  # routed experts per MoE layer
  experts_top_k: int = 2  # routed experts per token
  expert_d_ff: int = 0  # width of each routed expert; 0: d_ff
  n_shared_experts: int = 0  # always-active experts (DeepSeek, Qwen2-MoE), fused into one MLP
  shared_expert_d_ff: int = 0  # width of each shared expert; 0: expert_d_ff
  shared_expert_gate: bool = False  # Qwen2-MoE: the shared experts' output scaled by sigmoid(x . w)
  moe_first_dense: int = 0  # the first k layers keep a dense MLP (DeepSeek's first_k_dense_replace)
  moe_every: int = 1  # after those, every n-th layer is sparse (Mixtral 1; decoder_sparse_step)
  router_score: str = "softmax"  # one of ROUTER_SCORES
  router_topk_norm: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral, DeepSeek-V3)
  routed_scale: float = 1.0  # routed output multiplied by this (DeepSeek-V3's routed_scaling_factor)
  router_groups: int = 1  # group-limited routing: experts in this many groups ...
  router_topk_groups: int = 1  # ... and a token picks its top groups first, then experts inside them
  aux_loss_weight: float = 0.0  # Switch load-balancing loss
  seq_aux_loss_weight: float = 0.0  # DeepSeek's sequence-wise balance loss
  z_loss_weight: float = 0.0  # router z-loss (ST-MoE)
  bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3): the bias step; 0 off
  # Benchmarks only: token t's k-th expert is (t * top_k + k) mod n_experts (weights still from the
  # router), so every expert gets the same tokens and kernel speed is measured without routing skew.
  router_force_balance: bool = False

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class MeshConfig:
  """Sizes of the named mesh axes (MESH_AXES), outermost to innermost. One may be -1 (fill)."""

  replica: int = 1
  stage: int = 1
  data: int = -1
  fsdp: int = 1
  seq: int = 1
  expert: int = 1
  tensor: int = 1
  # With several processes: lay the slow axes (CROSS_HOST_AXES) across hosts and keep the fast
  # ones (seq, expert, tensor) inside each host. False: devices in plain process order.
  outer_axes_across_hosts: bool = True

  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}


@dataclass(frozen=True)
class ShardingConfig:
  zero_stage: int = 0  # 0 DDP, 1 optimizer state, 2 + gradients, 3 + parameters (FSDP)
  sequence_parallel: bool = False  # Megatron SP: norms and residual stream sharded over `tensor` on length
  vocab_parallel: bool = True  # embedding and cross-entropy sharded over `tensor` on vocab
  attention: str = "dense"  # one of ATTENTION_METHODS
  context_layout: str = "zigzag"  # one of CONTEXT_LAYOUTS, for allgather/ring/tokenring/usp
  ulysses_degree: int = 1  # usp: devices per Ulysses group (divides mesh.seq); the ring spans the rest
  pipeline: str = "none"  # one of PIPELINE_SCHEDULES; data.microbatches is the schedule's m
  virtual_stages: int = 1  # layer chunks per stage for circular and interleaved (zb-v: always 2)
  pipeline_vocab_parallel: bool = False  # embedding and output layer split on vocab over all stages
  replica: str = "sync"  # one of REPLICA_ALGORITHMS
  # Mixture of experts. The routed experts of an MoE layer are split over `expert_axes` (MoE
  # Parallel Folding: other axes than attention uses, e.g. data,seq,expert), each expert's width
  # over `expert_tensor_axes` (expert-tensor parallelism).
  expert_dispatch: str = "dropless"  # one of EXPERT_DISPATCHES
  capacity_factor: float = 1.25  # capacity dispatch: slots per expert = factor x tokens x top_k / experts
  expert_axes: tuple[str, ...] = ("expert",)
  expert_tensor_axes: tuple[str, ...] = ("tensor",)
  expert_all_to_all: str = "auto"  # one of EXPERT_ALL_TO_ALL
  expert_chunks: int = 1  # dispatch in chunks so one chunk's all-to-all overlaps another's compute
  grouped_matmul: str = "auto"  # one of GROUPED_MATMULS


@dataclass(frozen=True)
class LowCommConfig:
  """Knobs of the low-communication algorithms over `replica` (sharding.replica picks one)."""

  inner_steps: int = 50  # H: inner optimizer steps between two outer steps (DiLoCo family)
  outer_lr: float = 0.7  # outer learning rate on the averaged pseudo-gradient
  outer_momentum: float = 0.9
  outer_nesterov: bool = True
  fragments: int = 4  # Streaming DiLoCo: parameter fragments synchronised on staggered schedules
  delay: int = 1  # Streaming DiLoCo: tau, inner steps between an outer all-reduce's start and its use
  mix: float = 0.5  # Streaming DiLoCo: alpha, weight of the local parameters when the outer update lands
  quant_bits: int = 4  # bits per value of the exchanged outer gradients (Streaming: 4; SparseLoCo: 2); 0 none
  topk_fraction: float = 0.02  # SparseLoCo: fraction of each pseudo-gradient kept (top-k by magnitude)
  noloco_gamma: float = 0.5  # NoLoCo: weight of the pull towards the peer average in the outer step
  staleness_penalty: float = 0.5  # CO2: penalty on the one-step-stale outer update
  momentum_clip: float = 1.0  # CO2: clip on the outer momentum's norm; 0 off
  freeze_step: int = 100  # 1-bit Adam / EControl: full-precision steps before compression (variance frozen)
  econtrol_eta: float = 0.1  # EControl: error-control strength
  zo_eps: float = 1e-3  # zeroth-order: perturbation scale
  zo_directions: int = 1  # zeroth-order: perturbation directions per step and replica
  seed: int = 0  # shared seed: peer schedule, perturbations


@dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 10
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0  # global norm; 0 disables


@dataclass(frozen=True)
class DataConfig:
  source: str = "builtin"  # one of DATA_SOURCES
  paths: tuple[str, ...] = ()  # text/JSONL files (source=text) or token shards (source=tokens)
  tokenizer: str = "bytes"  # "bytes" or a path to a Hugging Face tokenizer.json
  token_dtype: str = "uint16"  # dtype of pre-tokenized shards
  jsonl_field: str = "text"
  seq_len: int = 128
  global_batch: int = 16
  microbatches: int = 1  # gradient accumulation steps per optimizer step
  val_fraction: float = 0.02
  max_corpus_bytes: int = 4_000_000  # cap on the built-in corpus
  seed: int = 0
  # Attention stays inside each packed document (segment ids). False: plain causal attention over
  # the whole window, which lets cuDNN flash attention run without a dense mask (faster).
  mask_documents: bool = True
  # Order each global batch's rows so that every data-parallel rank gets about the same attention
  # work (sum of squared document lengths); see data/balance.py.
  balance_attention: bool = False


@dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4


@dataclass(frozen=True)
class CheckpointConfig:
  enabled: bool = True
  every: int = 100
  keep: int = 3
  async_save: bool = True
  # A fresh run (no checkpoint in its own workdir) starts from the parameters of this run's newest
  # checkpoint (a workdir or its checkpoints/ folder), with a new optimizer state: fine-tuning.
  init_params_from: str = ""
  # Or from a Hugging Face directory (Llama, Qwen2/3, Mixtral, Qwen-MoE): its config.json replaces
  # the model's architecture (dtypes, attention implementation, remat and unroll are kept from this
  # config; its tokenizer.json is used where data.tokenizer is "bytes") and its weights start the run.
  init_from_hf: str = ""


@dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (training/distill.py): a trained teacher's token distributions as soft
  targets, e.g. for a speculative-decoding draft trained to agree with the model it drafts for."""

  teacher: str = ""  # a shardlab run (its workdir or its checkpoints/ folder); "" trains without one
  weight: float = 1.0  # objective: (1 - weight) x cross-entropy + weight x temperature^2 x KL(teacher || student)
  temperature: float = 1.0  # both distributions are softmax(logits / temperature) in the KL term


@dataclass(frozen=True)
class Config:
  name: str = "tiny"
  model: ModelConfig = field(default_factory=ModelConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  sharding: ShardingConfig = field(default_factory=ShardingConfig)
  optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
  lowcomm: LowCommConfig = field(default_factory=LowCommConfig)
  data: DataConfig = field(default_factory=DataConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  distill: DistillConfig = field(default_factory=DistillConfig)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
