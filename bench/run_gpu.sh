#!/usr/bin/env bash
# One device call: shardlab's train step in several variants, then the PyTorch peer, then a table.
#   bash bench/run_gpu.sh [results_dir] [variant-set]
# Wheels missing from the GPU image (grain, tensorboardX, ...) are installed from .whl/ if present.
set -uo pipefail
out=${1:-bench/results}
set_name=${2:-single}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader

run() {  # label, timeout, then train_speed flags
  local label=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/train_speed.py --label="$label" --out="$out/$label.json" "$@" 2>&1 \
    | grep -vE "^(W|I)[0-9]{4}|TF_CPP|oneDNN" | tail -n 15
}

case $set_name in
  single)
    run xla_dotsnb 150 --config=1b
    run cudnn_dotsnb 150 --config=1b --set model.attention_impl=cudnn
    run cudnn_none 150 --config=1b --set model.attention_impl=cudnn --set model.remat=none
    timeout 200 python3 bench/torch_peer.py --config=1b --out="$out/torch_peer.json" 2>&1 | tail -n 5
    ;;
  profile)
    timeout 200 python3 bench/profile_step.py --config=1b --set model.attention_impl=cudnn --out="$out/profile_cudnn_dotsnb.prof" 2>&1 \
      | grep -vE "^(W|I)[0-9]{4}" | tail -n 40
    XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" run cudnn_dotsnb_notriton 150 --config=1b --set model.attention_impl=cudnn
    run cudnn_dotsnb 150 --config=1b --set model.attention_impl=cudnn
    run cudnn_full 150 --config=1b --set model.attention_impl=cudnn --set model.remat=full
    ;;
  opt1)
    run cudnn_dotsnb 150 --config=1b --set model.attention_impl=cudnn
    run cudnn_dots_attn 150 --config=1b --set model.attention_impl=cudnn --set model.remat=dots_and_attention
    run cudnn_none 150 --config=1b --set model.attention_impl=cudnn --set model.remat=none
    timeout 200 python3 bench/profile_step.py --config=1b --set model.attention_impl=cudnn --set model.remat=dots_and_attention \
      --out="$out/profile_cudnn_dots_attn.prof" 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tail -n 32
    ;;
  unroll)
    for u in 2 4 16; do
      run cudnn_dots_attn_unroll$u 200 --config=1b --set model.attention_impl=cudnn --set model.remat=dots_and_attention --set model.scan_unroll=$u
    done
    ;;
  unroll_policies)
    timeout 200 python3 bench/profile_step.py --config=1b --set model.attention_impl=cudnn --set model.remat=dots_and_attention \
      --set model.scan_unroll=16 --out="$out/profile_unroll16.prof" 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tail -n 32
    run cudnn_none_unroll16 200 --config=1b --set model.attention_impl=cudnn --set model.remat=none --set model.scan_unroll=16
    run cudnn_dotsnb_unroll16 200 --config=1b --set model.attention_impl=cudnn --set model.remat=dots_no_batch --set model.scan_unroll=16
    ;;
  cse)
    for pol in dots_and_attention dots_no_batch none; do
      run cudnn_${pol}_unroll16_cse 200 --config=1b --set model.attention_impl=cudnn --set model.remat=$pol --set model.scan_unroll=16
    done
    XLA_FLAGS="--xla_gpu_enable_cublaslt=true" run cudnn_dots_attn_unroll16_cublaslt 200 --config=1b --set model.attention_impl=cudnn \
      --set model.remat=dots_and_attention --set model.scan_unroll=16
    ;;
  final)
    # The README/BENCHMARKS numbers: shardlab's 1b preset as train.py runs it, and the peer, same machine.
    run shardlab_1b 200 --config=1b
    run shardlab_1b_dots_and_attention 200 --config=1b --set model.remat=dots_and_attention
    XLA_FLAGS="--xla_gpu_enable_triton_gemm=true" run shardlab_1b_triton_gemm 200 --config=1b
    timeout 240 python3 bench/torch_peer.py --config=1b --out="$out/torch_peer.json" 2>&1 | grep RESULT
    ;;
  scale)
    # Same per-GPU batch (4 x 4096 tokens): one GPU, then two GPUs under ZeRO-3 (FSDP) and ZeRO-1.
    nvidia-smi topo -m | head -n 4
    CUDA_VISIBLE_DEVICES=0 run h200x1_1b 200 --config=1b
    two="--set mesh.data=1 --set mesh.fsdp=2 --set data.global_batch=8"
    run h200x2_zero3 200 --config=1b $two --set sharding.zero_stage=3
    run h200x2_zero1 200 --config=1b $two --set sharding.zero_stage=1
    lhs="--xla_gpu_enable_latency_hiding_scheduler=true"
    XLA_FLAGS=$lhs run h200x2_zero3_lhs 200 --config=1b $two --set sharding.zero_stage=3
    XLA_FLAGS=$lhs run h200x2_zero1_lhs 200 --config=1b $two --set sharding.zero_stage=1
    ;;
  scale_flags)
    # Overlap per-layer gradient reductions with the rest of the backward: small combine sizes.
    CUDA_VISIBLE_DEVICES=0 run h200x1_1b_again 200 --config=1b
    two="--set mesh.data=1 --set mesh.fsdp=2 --set data.global_batch=8"
    for mb in 64 256; do
      b=$((mb * 1024 * 1024))
      f="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=$b"
      f="$f --xla_gpu_reduce_scatter_combine_threshold_bytes=$b --xla_gpu_all_gather_combine_threshold_bytes=$b"
      XLA_FLAGS="$f" run h200x2_zero1_lhs_combine${mb}mb 200 --config=1b $two --set sharding.zero_stage=1
      XLA_FLAGS="$f" run h200x2_zero3_lhs_combine${mb}mb 200 --config=1b $two --set sharding.zero_stage=3
    done
    ;;
  scale_zero)
    # Defaults now include the collective flags (parallel/xla_flags.py); ZeRO-1/2 gather bf16 copies.
    CUDA_VISIBLE_DEVICES=0 run h200x1_1b_defaults 200 --config=1b
    two="--set mesh.data=1 --set mesh.fsdp=2 --set data.global_batch=8"
    for z in 1 2 3; do run h200x2_zero${z}_defaults 200 --config=1b $two --set sharding.zero_stage=$z; done
    echo "XLA_FLAGS seen by the runs: $(PYTHONPATH=$PWD python3 -c 'from parallel.xla_flags import apply_default_flags as a; import os; a(); print(os.environ.get("XLA_FLAGS"))')"
    ;;
  scale_layerwise)
    # ZeRO-1/2 gather each layer's bf16 weights where it runs; gradients leave the backward in bf16.
    CUDA_VISIBLE_DEVICES=0 run h200x1_1b 200 --config=1b
    two="--set mesh.data=1 --set mesh.fsdp=2 --set data.global_batch=8"
    for z in 1 2 3; do run h200x2_zero$z 200 --config=1b $two --set sharding.zero_stage=$z; done
    for z in 1 3; do
      timeout 200 python3 bench/profile_step.py --config=1b $two --set sharding.zero_stage=$z \
        --out="$out/profile_zero$z.prof" 2>&1 | grep -vE "^(W|I)[0-9]{4}" | grep -A3 "per GPU"
    done
    ;;
  fit)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 580 python3 bench/memory_fit.py --config=1b \
      --max_batch=32 --max_seq=65536 --out="$out/memory_fit.fit" 2>&1 | grep -E "^FIT|Error|error" | tail -n 20
    ;;
esac
echo "== summary =="
grep -h "" "$out"/*.json >/dev/null 2>&1 && python3 - "$out" <<'PY'
import glob, json, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/*.json"))]
print(f"{'variant':<28} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9}")
for r in rows:
  print(f"{r['label'][:28]:<28} {r['step_s']*1e3:9.1f} {r['tokens_per_s']:9.0f} {100*(r['mfu'] or 0):5.1f}% {r['peak_mem_gib']:9.1f}")
PY
