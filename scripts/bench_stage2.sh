#!/bin/bash
# Stage 2 CPU benchmark per cache mode and dtype (docs/benchmarks-stage2.md) on a dataset made by
# `vla_finetune demo --quick --out DEMO`. Usage: scripts/bench_stage2.sh [DEMO=/tmp/b2] [OUT=/tmp/b2bench]
# Then: python3 scripts/bench_stage2_summary.py OUT
set -e
B=${1:-/tmp/b2}; O=${2:-/tmp/b2bench}; mkdir -p $O
for dtype in f32 bf16; do
for mode in off vision features; do
  w=$O/$mode-$dtype; rm -rf $w
  /usr/bin/time -v "${VLA_BIN:-target/debug/vla_finetune}" train --config config/train.yaml --quiet \
    --set data.dataset_dir=$B/dataset --set model.base_model_dir=$B/base_model \
    --set model.stage1_checkpoint=$B/checkpoints/v0001 --set run.output_dir=$w \
    --set run.epochs=3 --set run.seed=42 --set run.device=cpu --set model.compute_dtype=$dtype \
    --set model.gradient_checkpointing=true --set memory.preset=manual --set memory.micro_batch=4 \
    --set memory.accum_steps=2 --set lora.rank=8 --set cache.mode=$mode \
    --set cache.rebuild_interval_epochs=1 --set cache.dir=$w/cache --set checkpoint.state_dir=$w/state \
    --set checkpoint.publish_dir=$w/ck --set progress.log_file=$w/progress.jsonl \
    --set progress.plot_file=$w/curves.png > $w.out 2> $w.time || { echo "FAILED $mode $dtype"; tail -5 $w.time; }
  echo "done $mode $dtype"
done; done
