# A draft trained on the text against one distilled from the target (distill.teacher), on the CPU:
# the tiny preset widened to a 4-layer target of width 256 (600 steps), two 1-layer drafts of width
# 128 (600 steps each), then bench/speculative.py with each draft at k = 2 and 3 on held-out text.
# About 12 minutes on 2 cores. Usage: bash bench/speculative_distill_cpu.sh OUT_DIR
set -euo pipefail
out=${1:?results dir}
mkdir -p "$out"
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
py=${PYTHON:-.venv/bin/python}
T="--set model.n_layers=4 --set model.d_model=256 --set model.d_ff=768 --set model.n_heads=8 --set model.n_kv_heads=4"
D="--set model.n_layers=1 --set model.d_model=128"
run="--set train.steps=600 --set train.log_every=100 --set train.eval_every=300 --set checkpoint.every=300"
rm -rf /tmp/cpu_target /tmp/cpu_text /tmp/cpu_distilled
$py train.py --config=tiny --workdir=/tmp/cpu_target $T $run --set optimizer.learning_rate=2e-3 2>&1 | grep -E "eval loss|Error"
$py train.py --config=tiny --workdir=/tmp/cpu_text $D $run 2>&1 | grep -E "eval loss|Error"
$py train.py --config=tiny --workdir=/tmp/cpu_distilled $D $run --set distill.teacher=/tmp/cpu_target 2>&1 | grep -E "eval loss|Error"
for d in text distilled; do
  $py bench/speculative.py --config=tiny $T --checkpoint=/tmp/cpu_target --draft_checkpoint=/tmp/cpu_$d ${D//--set/--draft_set} \
    --tokens=2,3 --prompts=8 --prompt_len=64 --new=48 --out="$out/speculative_tiny_${d}_draft.json" 2>&1 | tail -n 4
done
