#!/usr/bin/env bash
# The `tiny` loss curve from train.py on a fixed token shard; run on CPU and GPU and compare.
#   bash bench/tiny_curve.sh TOKENS.bin OUTDIR [extra train.py flags]
set -euo pipefail
tokens=$1 out=$2; shift 2
rm -rf "$out" && mkdir -p "$out"
python3 train.py --config=tiny --workdir="$out" --set data.source=tokens --set data.paths="$tokens" \
  --set train.steps=40 --set train.log_every=1 --set train.eval_every=40 --set checkpoint.enabled=false "$@" \
  2>&1 | grep -E "step 40|eval|Error" || true
