#!/usr/bin/env bash
# The GPU check for a machine with one CUDA GPU (about 8 minutes; each stage has its own time limit):
#   bash bench/gpu_check.sh [OUT_DIR]        (default gpu_check/<date-time>)
# 1. pytest -m gpu (real-size LoRA / lean steps, bf16-mixed inference, stock builder on CUDA);
# 2. bench/lora_cost.py at 1008 px in bf16-mixed: full fine-tuning vs default LoRA vs preset=lean
#    (s/step, images/s, torch.cuda.max_memory_allocated; 1 image x 4 prompts x 10 instances, masks on);
# 3. a 50-step LoRA training of the real-size architecture (random init) on the shapes data through train.py.
# Everything goes to OUT_DIR: environment, logs, bench table + JSON, the training run directory, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$SUMMARY"
}

{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/environment.txt" 2>&1

stage pytest_gpu 150 python -m pytest -m gpu -n 0 -q -p no:cacheprovider tests/test_gpu.py
stage bench_1008 200 python bench/lora_cost.py --model sam3 --resolution 1008 --modes full,lora,lean \
  --steps 3 --warmup 1 --precision bf16-mixed --json "$OUT/bench_1008.json"
stage train_50_steps 130 python train.py data=shapes "data.root=$OUT/shapes" data.batch_size=2 data.num_workers=4 \
  model.checkpoint=null lora.rank=16 trainer.max_steps=50 trainer.log_every_n_steps=10 validate_before_fit=false \
  test=false +trainer.val_check_interval=50 +trainer.limit_val_batches=4 "hydra.run.dir=$OUT/train"

grep -E "^\|" "$OUT/bench_1008.log" >> "$SUMMARY"
tail -n 3 "$OUT/pytest_gpu.log" >> "$SUMMARY"
echo "written to $OUT" | tee -a "$SUMMARY"
