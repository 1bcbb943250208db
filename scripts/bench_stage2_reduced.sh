#!/bin/bash
# The Stage 2 training job (`vla_finetune train`) per cache mode at reduced 3B shapes on the CPU
# (docs/benchmarks.md "Stage 2 trainer"): a random Qwen2.5-VL at the `bench --model reduced`
# shapes (scripts/make_random_vlm.py), 4 simulated episodes with 2 views of 224x224 (64 LLM
# tokens each), stage 1 by train-heads, then scripts/bench_stage2.sh on that folder.
#   scripts/bench_stage2_reduced.sh [WORK=/tmp/s2reduced]
#   python3 scripts/bench_stage2_summary.py WORK/bench
set -e
W=${1:-/tmp/s2reduced}
BIN=${VLA_BIN:-target/debug/vla_finetune}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$W" && mkdir -p "$W"
"$BIN" bench --model reduced --kinds act --steps 1 --warmup 0 --ddim-steps 1 --export "$W/setup" > /dev/null
"$PY" scripts/make_random_vlm.py --config "$W/setup" --out "$W/base_model"
"$BIN" record --sim --episodes 4 --seconds 3 --width 224 --height 224 --out "$W/rec" > /dev/null
cat > "$W/compile.yaml" <<YAML
align: {sensor_window_s: 0.1, sensor_samples: 65}
split: {val_fraction: 0.25, seed: 7}
YAML
"$BIN" dataset compile --episodes "$W/rec" --config "$W/compile.yaml" --out "$W/dataset"
"$BIN" train-heads --size small --epochs 3 --seed 7 --dataset "$W/dataset" --base-model "$W/base_model" \
    --checkpoints "$W/checkpoints" --work-dir "$W/stage1" > "$W/stage1.json"
VLA_BIN="$BIN" scripts/bench_stage2.sh "$W" "$W/bench"
