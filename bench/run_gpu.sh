#!/usr/bin/env bash
# One device call: the benchmarks behind BENCHMARKS.md, one set per call, then a table.
#   bash bench/run_gpu.sh RESULTS_DIR SET
# SET is one of:
#   final    one GPU: the `1b` preset twice (two compilations), remat dots_and_attention, the
#            PyTorch peer, train.py itself for 60 steps, and the `tiny` curve against the CPU one
#   check    one GPU, the short form of `final` that fits one call: the `1b` preset once, the
#            peer, train.py for 30 steps and the `tiny` curve
#   scale    two GPUs: one GPU, then ZeRO-1/2/3 over both at the same per-GPU batch
#   profile  one GPU: where the `1b` step's device time goes (bench/profile_step.py)
#   fit      one GPU: the largest batch and sequence per remat policy (bench/memory_fit.py)
#   context  every visible GPU count of 1, 2, 4, 8: ring (zigzag) and all-gather-KV attention
#            against N x one GPU, full and causal, 16K tokens per GPU (bench/context_scaling.py)
#   context_fit  the same counts: the longest trainable `1b` context under ring attention
#   pipeline p = every GPU (2 or more): GPipe, 1F1B and ZB-H1 on the `1b` preset, measured bubble
#            against the simulator's with measured action costs; on one GPU the costs and the
#            simulated bubbles for p = 2 only (bench/pipeline_bubbles.py)
#   serving  one GPU: skinny products per library (bench/gemv_probe.py), the batch-32 decode loop over
#            a 512-position span of a 1,152-position cache (bench/serve_profile.py), and the load
#            generator against serve.py at three request rates (bench/serve_load.py); each prints its table
#   moe_mgpu one GPU (Hopper): the Mosaic GPU grouped-matmul tilings (bench/mgpu_sweep.py), then the
#            `moe` step in bf16 weights with sharding.grouped_matmul=mgpu, learned and forced routing
#   decode   one GPU: the decode loop profiled at batch 1 and 32 over a 512-position span of a
#            1,152-position cache, with separate and with fused projections, then bench/serve_decode.py
#            at batch 1 and 32 against the transformers peer
#   decode_flags  one GPU: the one-kernel decode attention against XLA's (bench/decode_attention.py), then
#            the batch-1 decode profile (bench/serve_profile.py) with XLA's attention, with the kernel, and
#            with the kernel under XLA flags that cut kernels or their start-up cost (PDL, block-level
#            fusions, command buffers for the decode loop)
#   decode_hlo  one GPU: batch-1 decode profiled (every kernel) with its compiled HLO, with XLA's
#            attention and with the decode kernel and decode_split_k=4, then bench/serve_decode.py at
#            batch 1 both ways
#   decode_variants  one GPU: each decode product's speed per split of its contraction
#            (bench/split_k_probe.py), then batch-1 decode with the decode kernel under XLA flags that may fuse the
#            residual add with the norm's reduction, and at decode_split_k 2, 4 and 8; then the engine
#            at batch 1 with the kernel and decode_split_k=4 (bench/serve_decode.py)
#   decode_tune  one GPU: the decode kernel alone per parts and warps, batch-1 decode profiled at
#            decode_split_k 4 and 2, then the engine at batch 1 with the kernel and decode_split_k=4
#   decode_final  one GPU: batch-1 decode profiled with the defaults, then the engine at batch 1 with
#            the defaults and with XLA's attention unsplit
#   decode_sum  one GPU: batch-1 decode profiled with the defaults, the engine at batch 1 with the defaults,
#            with XLA's attention and with 128 steps per dispatch, then the profile at decode_split_k 2
#            and 8 and with XLA's fusion autotuner off
#   persistent  one GPU: the 16-layer chain of a `1b` step's products run by one resident kernel
#            (bench/persistent_chain.py, a grid barrier between products) against XLA's chain, over a
#            sweep of programs/block sizes/warps (bench/decode_kernels.py --persistent_only)
#            (the first run alone has a 60 s limit, so that a hang shows early)
#   cmdbuf   one GPU: the `moe` training step with and without XLA's command buffers for while loops
#            and conditionals (on by default for experts, parallel/xla_flags.py)
#   moe_bf16 one GPU: the `moe` step with bfloat16 weights and moments (the PyTorch peer's bf16
#            regime), layers unrolled (the preset) and scanned, then its profile and compiled HLO
#   moe_check one GPU: the `moe` step in bf16 weights (grouped_matmul auto), learned and forced routing
#   speculative  one GPU: train.py trains the `1b` preset (700 steps on the whole built-in corpus) and a
#            2-layer draft of width 1,024 distilled from it (distill.teacher: 1,200 steps of 16K tokens),
#            then bench/speculative.py at k = 3 on held-out text, batch 1, at 8 and at 16 rounds per call
#            (ROUNDS), and the kernels of a round at k = 3 and of a plain step (about 7 minutes)
#   speculative_rounds  one GPU: a speculative round with random weights (nothing is accepted: one
#            token a round) at k = 3 with the 2-layer draft, and the kernels of a round with each of
#            the two loops and of a plain step (about 1 minute)
#   paged    one GPU: bench/prefix_sharing.py (16 requests, a 2,048-token prefix) at 8 decode steps per
#            engine step with XLA's attention over gathered pages and with the decode kernel over pages
#   moe_peer one GPU: the `moe` step in bf16 weights, learned and forced routing, then the PyTorch
#            peer in bf16 weights with its learned and with forced routing (same call); on a GPU
#            with room for them (H200), shardlab with float32 master weights too
# Wheels missing from the GPU image (grain, tensorboardX, ...) are installed from .whl/ if present.
# `final` compares the `tiny` curve with bench/results/tiny_curve/cpu.jsonl, trained on
# .cmp/tiny_tokens.bin (write it with bench/corpus_tokens.py on the CPU machine; carry it along).
set -uo pipefail
out=${1:?results dir}
set_name=${2:?set name}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
quiet() { grep -vE "^(W|I)[0-9]{4}|TF_CPP|oneDNN"; }
# XLA's command buffers for loops and conditionals (as parallel/xla_flags.py's DEVICE_LOOP_FLAGS)
loop_graphs="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# the speculative draft: 2 layers of width 1,024 with the `1b` preset's vocabulary
draft="--set model.n_layers=2 --set model.d_model=1024 --set model.n_heads=8 --set model.n_kv_heads=4 --set model.d_ff=2816 --set model.scan_unroll=2"

profile_b1() {  # label, then serve_profile flags: the batch-1 decode loop over a 512-position span of 1,152
  local label=$1; shift
  timeout 90 python3 bench/serve_profile.py --config=1b --batches=1 --max_len=1152 --span=512 --label="$label" \
    --out="$out/profile_$label.json" "$@" 2>&1 | quiet | grep -E "^batch|Error|error" | tail -n 3
}

engine_b1() {  # label, then serve_decode flags: the engine at batch 1, bandwidth measured in the same call
  local label=$1; shift
  timeout 150 python3 bench/serve_decode.py --config=1b --batches=1 --batches_only --no_peer \
    --out="$out/serve_decode_b1_$label.json" "$@" 2>&1 | quiet | tail -n 3
}
# the decode kernel with four-way split products (what "auto" picks on one GPU), and XLA's attention unsplit
kernel4="--set model.decode_attention=pallas --set model.decode_split_k=4"
xla1="--set model.decode_attention=xla --set model.decode_split_k=1"

moe_speed() {  # output name, timeout, then moe_train_speed flags (the `moe` preset, 2 windows of 8 steps)
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/moe_train_speed.py --config=moe --windows=2 --steps=8 --out="$out/$name.json" "$@" \
    2>&1 | quiet | tail -n 3
}

run() {  # label, timeout, then train_speed flags
  local label=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/train_speed.py --label="$label" --out="$out/$label.json" "$@" 2>&1 | quiet | tail -n 5
}

tiny_curves() {  # the `tiny` curve on GPU at both precisions, against the CPU one
  if [ -f .cmp/tiny_tokens.bin ]; then
    for precision in default highest; do
      JAX_DEFAULT_MATMUL_PRECISION=$precision bash bench/tiny_curve.sh .cmp/tiny_tokens.bin /tmp/tiny_$precision >/dev/null
      cp /tmp/tiny_$precision/metrics.jsonl "$out/tiny_gpu_$precision.jsonl"
      echo "tiny, $precision precision: $(python3 bench/curve_diff.py bench/results/tiny_curve/cpu.jsonl "$out/tiny_gpu_$precision.jsonl")"
    done
  fi
}

train_py_1b() {  # train.py as users run it: its own logged throughput, every 10 steps
  timeout 200 python3 train.py --config=1b --workdir=/tmp/train_1b --set data.source=synthetic \
    --set train.steps=$1 --set checkpoint.enabled=false 2>&1 | grep -E "step ($2)/|Error"
  cp /tmp/train_1b/metrics.jsonl "$out/train_py_1b.jsonl"
}

case $set_name in
  check)
    run shardlab_1b 200 --config=1b
    timeout 240 python3 bench/torch_peer.py --config=1b --out="$out/torch_peer.json" 2>&1 | grep RESULT
    train_py_1b 30 "20|30"
    tiny_curves
    ;;
  final)
    run shardlab_1b 200 --config=1b
    run shardlab_1b_again 200 --config=1b
    run shardlab_1b_dots_and_attention 200 --config=1b --set model.remat=dots_and_attention
    timeout 240 python3 bench/torch_peer.py --config=1b --out="$out/torch_peer.json" 2>&1 | grep RESULT
    train_py_1b 60 "30|60"
    tiny_curves
    ;;
  scale)
    # Same per-GPU batch (4 x 4096 tokens): one GPU, then two GPUs under ZeRO-1, 2 and 3.
    nvidia-smi topo -m | head -n 4
    CUDA_VISIBLE_DEVICES=0 run h200x1_1b 200 --config=1b
    two="--set mesh.data=1 --set mesh.fsdp=2 --set data.global_batch=8"
    for z in 1 2 3; do run h200x2_zero$z 200 --config=1b $two --set sharding.zero_stage=$z; done
    for z in 1 3; do
      timeout 200 python3 bench/profile_step.py --config=1b $two --set sharding.zero_stage=$z \
        --out="$out/profile_zero$z.prof" --hlo="$out/step_zero$z.hlo.gz" 2>&1 | quiet | grep -A3 "per GPU"
      echo "zero$z gradient reductions by dtype: $(zcat "$out/step_zero$z.hlo.gz" | grep -E " (all-reduce|reduce-scatter)(-start)?\(" | grep -oE "= \(?[a-z0-9]+\[" | tr -d "=( [" | sort | uniq -c | tr "\n" " ")"
    done
    ;;
  profile)
    timeout 200 python3 bench/profile_step.py --config=1b --top=40 --out="$out/profile_1b.prof" 2>&1 | quiet | tail -n 60
    ;;
  fit)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 580 python3 bench/memory_fit.py --config=1b \
      --max_batch=32 --max_seq=65536 --out="$out/memory_fit.fit" 2>&1 | grep -E "^FIT|Error|error" | tail -n 20
    ;;
  context|context_fit)
    n=$(nvidia-smi -L | wc -l); counts=1
    for k in 2 4 8; do if [ "$k" -le "$n" ]; then counts="$counts,$k"; fi; done
    if [ "$set_name" = context ]; then what="--tokens_per_device=16384"; else what="--masks= --fit"; fi
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 580 python3 bench/context_scaling.py --devices="$counts" $what \
      --out="$out/$set_name.cp" 2>&1 | quiet | tail -n 24
    ;;
  pipeline)
    n=$(nvidia-smi -L | wc -l)
    if [ "$n" -ge 2 ]; then what="--stages=$n"; else what="--stages=2 --costs_only"; fi
    timeout 580 python3 bench/pipeline_bubbles.py --config=1b --set data.global_batch=8 --microbatches=8 $what \
      --bubbles_out="$out/pipeline_bubbles.pp" 2>&1 | quiet | tail -n 12
    ;;
  cmdbuf)
    # The `moe` step with its default command buffers (loops on the device) and without (no WHILE,
    # CONDITIONAL).
    OFF=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN
    for flags in "$OFF" ""; do
      tag=$([ -n "$flags" ] && echo _host_loops || echo _device_loops)
      XLA_FLAGS=$flags timeout 170 python3 bench/moe_train_speed.py --config=moe --variants=learned --windows=2 \
        --steps=8 --out="$out/moe$tag.json" 2>&1 | quiet | tail -n 4
    done
    exit 0
    ;;
  moe_bf16)
    bf16="--set model.param_dtype=bfloat16"
    moe_speed moe_bf16 170 $bf16
    moe_speed moe_bf16_scanned 120 $bf16 --set model.scan_unroll=1 --variants=learned
    timeout 200 python3 bench/profile_step.py --config=moe $bf16 --steps=2 --top=80 --out="$out/moe_step_bf16.json" \
      --hlo="$out/moe_step_bf16.hlo.gz" 2>&1 | quiet | tail -n 100
    exit 0
    ;;
  speculative)
    corpus="--set data.max_corpus_bytes=12000000"
    # shorter runs where device time is short: TARGET_STEPS, DRAFT_STEPS, TOKENS, ROUNDS
    timeout 240 python3 train.py --config=1b --workdir=/tmp/target $corpus --set train.steps=${TARGET_STEPS:-700} \
      --set optimizer.learning_rate=4e-4 --set optimizer.warmup_steps=80 --set train.eval_every=350 \
      --set checkpoint.every=350 --set train.log_every=100 2>&1 | grep -E "step [0-9]+/|eval loss|Error" | tail -n 4
    timeout 200 python3 train.py --config=1b --workdir=/tmp/draft $corpus $draft --set data.global_batch=4 \
      --set distill.teacher=/tmp/target --set train.steps=${DRAFT_STEPS:-1200} --set optimizer.learning_rate=1e-3 \
      --set optimizer.warmup_steps=60 --set train.eval_every=400 --set checkpoint.every=400 --set train.log_every=400 \
      2>&1 | grep -E "step [0-9]+/|eval loss|Error" | tail -n 4
    cp /tmp/target/metrics.jsonl "$out/speculative_target_metrics.jsonl"; cp /tmp/draft/metrics.jsonl "$out/speculative_draft_metrics.jsonl"
    profile=--profile=3  # the first bench's calls profiled
    for rounds in ${ROUNDS:-8 16}; do  # rounds per call: the host's turn between calls is spread over them
      timeout 150 python3 bench/speculative.py --config=1b $corpus --checkpoint=/tmp/target --draft_checkpoint=/tmp/draft \
        ${draft//--set/--draft_set} --tokens=${TOKENS:-3} --rounds=$rounds --prompts=8 --prompt_len=128 --new=128 $profile \
        --out="$out/speculative_1b_rounds$rounds.json" 2>&1 | quiet | grep -vE "^ +[0-9.]+ ms +[0-9.]+x" | tail -n 20
      profile=
    done
    exit 0
    ;;
  speculative_rounds)
    timeout 150 python3 bench/speculative.py --config=1b ${draft//--set/--draft_set} --tokens=3 --prompts=2 \
      --prompt_len=128 --new=64 --profile=3 --out="$out/speculative_1b_rounds.json" 2>&1 | quiet \
      | grep -vE "^ +[0-9.]+ ms +[0-9.]+x" | tail -n 30
    exit 0
    ;;
  paged)
    for attn in xla pallas; do
      timeout 200 python3 bench/prefix_sharing.py --config=1b --prefix=2048 --suffix=64 --new=64 --requests=16 --slots=16 \
        --decode_steps=8 --set model.decode_attention=$attn --out="$out/prefix_sharing_${attn}_steps8.json" 2>&1 | quiet | tail -n 5
    done
    exit 0
    ;;
  moe_check)
    # the `moe` step in bf16 weights (grouped_matmul auto: mgpu on Hopper), learned and forced
    moe_speed moe_bf16 200 --set model.param_dtype=bfloat16
    exit 0
    ;;
  moe_peer)
    moe_speed moe_bf16 170 --set model.param_dtype=bfloat16
    for router in learned forced; do
      timeout 150 python3 bench/moe_torch_peer.py --config=moe --weights=bf16 --router=$router --windows=2 --steps=8 \
        --out="$out/moe_peer_bf16_$router.json" 2>&1 | grep RESULT
    done
    if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)" -gt 100000 ]; then
      moe_speed moe_f32_masters 120
    fi
    exit 0
    ;;
  moe_mgpu)
    JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -o addopts="" tests/parallel/test_expert_dispatch.py -k "mgpu or tokamax" 2>&1 | tail -n 3
    timeout 220 python3 bench/mgpu_sweep.py --out="$out/mgpu_sweep.json" --configs_out="$out/mgpu_configs.json" \
      --block_m=128 2>&1 | quiet | tail -n 12
    moe_speed moe_bf16_mgpu 200 --set model.param_dtype=bfloat16 --set sharding.grouped_matmul=mgpu
    exit 0
    ;;
  decode)
    for layout in separate fused; do
      flag=$([ $layout = separate ] && echo --separate_projections || echo "")
      timeout 110 python3 bench/serve_profile.py --config=1b --batches=1,32 --max_len=1152 --span=512 $flag $xla1 \
        --label=$layout --out="$out/serve_profile_$layout.json" 2>&1 | quiet | tail -n 4
    done
    timeout 300 python3 bench/serve_decode.py --config=1b --batches_only --out="$out/serve_decode.json" 2>&1 | quiet | tail -n 12
    exit 0
    ;;
  decode_flags)
    # the one-kernel decode attention against XLA's, alone; then batch-1 decode with XLA's attention,
    # with the kernel (model.decode_attention=pallas), and with the kernel under XLA flags that cut kernels or their
    # start-up cost: PDL (programmatic dependent launch), Triton fusions of a reduction with its
    # elementwise consumers, command buffers for the decode loop itself
    timeout 120 python3 bench/decode_attention.py --out="$out/decode_attention.json" 2>&1 | quiet | tail -n 9
    base="--config=1b --batches=1 --max_len=1152 --span=512 --set model.decode_split_k=1"
    timeout 90 python3 bench/serve_profile.py $base --set model.decode_attention=xla --label=xla_attention \
      --out="$out/flags_xla_attention.json" 2>&1 | quiet | tail -n 24
    base="$base --set model.decode_attention=pallas"
    timeout 90 python3 bench/serve_profile.py $base --label=kernel --hlo="$out/decode_b1.hlo.gz" \
      --out="$out/flags_kernel.json" 2>&1 | quiet | tail -n 24
    for variant in "pdl:--xla_gpu_enable_pdl=true" \
        "all:--xla_gpu_enable_pdl=true --xla_gpu_experimental_enable_fusion_block_level_rewriter=true $loop_graphs"; do
      label=${variant%%:*}
      XLA_FLAGS="${variant#*:}" timeout 90 python3 bench/serve_profile.py $base --label=$label \
        --out="$out/flags_$label.json" 2>&1 | quiet | grep -E "^batch|Error|error" | tail -n 3
    done
    exit 0
    ;;
  decode_hlo)
    # batch-1 decode profiled with every kernel listed and its compiled HLO kept: XLA's attention, then
    # the decode kernel with decode_split_k=4; then the engine at batch 1 both ways (bandwidth measured in each)
    profile_b1 xla --top=400 $xla1 --hlo="$out/decode_b1_xla.hlo.gz"
    profile_b1 kernel_split4 --top=400 $kernel4 --hlo="$out/decode_b1_split4.hlo.gz"
    engine_b1 xla $xla1
    engine_b1 kernel_split4 $kernel4
    exit 0
    ;;
  decode_variants)
    # each product's speed per split (bench/split_k_probe.py); batch-1 decode with the decode kernel and
    # decode_split_k=4, then with XLA flags that may fuse the residual add with the norm's reduction
    # (Triton multi-output fusions, no Triton softmax fusions), then decode_split_k=2 and 8
    timeout 150 python3 bench/split_k_probe.py --out="$out/split_k_probe.json" 2>&1 | quiet | tail -n 6
    for variant in "split4:" "multi_output:--xla_gpu_unsupported_enable_triton_multi_output_fusion=true" \
        "no_triton_softmax:--xla_gpu_experimental_enable_triton_softmax_priority_fusion=false" \
        "both:--xla_gpu_unsupported_enable_triton_multi_output_fusion=true --xla_gpu_experimental_enable_triton_softmax_priority_fusion=false"; do
      XLA_FLAGS="${variant#*:}" profile_b1 "${variant%%:*}" $kernel4
    done
    for k in 2 8; do
      profile_b1 split$k --set model.decode_attention=pallas --set model.decode_split_k=$k
    done
    engine_b1 kernel_split4 $kernel4
    exit 0
    ;;
  decode_tune)
    # the decode kernel alone per parts of the positions and warps (bench/decode_attention.py, two rows
    # as batch-1 decode runs), batch-1 decode profiled at decode_split_k 4 and 2 (the latter's HLO
    # kept), then the engine at batch 1 with the kernel and decode_split_k=4
    timeout 120 python3 bench/decode_attention.py --batches=2 --splits=4,8,16 --warps=2,4 \
      --out="$out/decode_attention.json" 2>&1 | quiet | tail -n 8
    profile_b1 split4 --top=40 $kernel4
    profile_b1 split2 --top=40 --set model.decode_attention=pallas --set model.decode_split_k=2 \
      --hlo="$out/decode_b1_split2.hlo.gz"
    engine_b1 kernel_split4 $kernel4
    exit 0
    ;;
  decode_final)
    # batch-1 decode profiled with the defaults (on one GPU: the decode kernel and decode_split_k=4; its
    # HLO kept), then the engine at batch 1 with the defaults and with XLA's attention and no split,
    # bandwidth measured in each
    profile_b1 defaults --top=40 --hlo="$out/decode_b1_defaults.hlo.gz"
    engine_b1 defaults
    engine_b1 xla $xla1
    exit 0
    ;;
  decode_sum)
    # batch-1 decode profiled with the defaults (HLO kept); the engine at batch 1 with the defaults, with
    # XLA's attention unsplit, and with 128 steps per dispatch; then the profile at decode_split_k 2, with
    # XLA's fusion autotuner off (its Triton reductions do not take the residual add in), and at 8
    profile_b1 defaults --top=40 --hlo="$out/decode_b1_defaults.hlo.gz"
    engine_b1 defaults
    engine_b1 xla $xla1
    engine_b1 steps128 --decode_steps_single=128
    profile_b1 split2 --top=40 --set model.decode_split_k=2
    XLA_FLAGS=--xla_gpu_experimental_enable_fusion_autotuner=false profile_b1 no_fusion_tuner --top=40
    profile_b1 split8 --top=40 --set model.decode_split_k=8
    exit 0
    ;;
  persistent)
    # the first configuration alone, so that a hang (programs not all resident) shows before the sweep
    timeout 60 python3 bench/decode_kernels.py --persistent_only --persistent=128/4/512/4 --repeats=5 \
      --out="$out/persistent_first.json" 2>&1 | quiet | tail -n 4
    timeout 400 python3 bench/decode_kernels.py --persistent_only --persistent=128/4/256,512/4,8 \
      --out="$out/persistent.json" 2>&1 | quiet | tail -n 22
    exit 0
    ;;
  serving)
    timeout 120 python3 bench/gemv_probe.py --out="$out/gemv_probe.json" 2>&1 | quiet
    timeout 150 python3 bench/serve_profile.py --config=1b --batches=32 --max_len=1152 --span=512 \
      --label=span512_of_1152 --out="$out/serve_profile_span.json" 2>&1 | quiet | tail -n 30
    timeout 300 python3 bench/serve_load.py --serve="--config=1b --slots=64 --token_budget=2048 --decode_steps=8 \
      --max_len=1024" --request_rates=4,16,64 --num_prompts=256 --input_len=128 --output_len=128 --range_ratio=0.5 \
      --goodput=ttft:500,tpot:50 --server_log="$out/serve_load_server.log" --out="$out/serve_load.json" 2>&1 | quiet
    exit 0
    ;;
  *)
    echo "unknown set: $set_name" >&2; exit 2 ;;
esac
echo "== summary =="
python3 - "$out" <<'PY'
import glob, json, statistics, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/*.json"))]
print(f"{'variant':<32} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9}")
for r in rows:
  print(f"{r['label'][:32]:<32} {r['step_s']*1e3:9.1f} {r['tokens_per_s']:9.0f} {100*(r['mfu'] or 0):5.1f}% {r['peak_mem_gib']:9.1f}")
peer = [r for r in rows if r["label"].startswith("pytorch")]
ours = [r for r in rows if r["label"].startswith("shardlab_1b") and r["label"] != "shardlab_1b_dots_and_attention"]
if peer and ours:
  print("ratio to the peer: " + ", ".join(f"{r['label']} {r['tokens_per_s'] / peer[0]['tokens_per_s']:.2f}x" for r in ours))
try:
  logged = [json.loads(l) for l in open(sys.argv[1] + "/train_py_1b.jsonl")]
  rates = [r for r in logged if r["split"] == "train" and "tokens_per_s" in r and r["step"] > 10]
  print(f"train.py, steps 11-{max(r['step'] for r in rates)} as logged: {statistics.median(r['tokens_per_s'] for r in rates):.0f} tokens/s, "
        f"MFU {100 * statistics.median(r['mfu'] for r in rates):.1f}% (median of {len(rates)} intervals)")
except FileNotFoundError:
  pass
PY
