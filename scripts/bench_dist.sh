#!/bin/bash
# Data-parallel Stage 2 on the CPU (docs/benchmarks.md "Data-parallel Stage 2"): the same job as
# 1 process (1 and 2 threads) and as 2 ranks under torchrun (1 thread each, torchrun's default),
# Gloo on loopback. MODEL: tiny (the test fixture) or reduced (a random Qwen2.5-VL at the `bench
# --model reduced` shapes, scripts/make_random_vlm.py). Prints one JSON line per run: median
# samples/s over the optimizer steps (progress log), gradient all-reduce ms per step, steps.
#   scripts/bench_dist.sh [MODEL=tiny] [WORK=/tmp/dist-$MODEL]
set -e
MODEL=${1:-tiny}
W=${2:-/tmp/dist-$MODEL}
BIN=${VLA_BIN:-target/debug/vla_finetune}
PY=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
rm -rf "$W" && mkdir -p "$W"
if [ "$MODEL" = reduced ]; then
  "$BIN" bench --model reduced --kinds act --steps 1 --warmup 0 --ddim-steps 1 --export "$W/setup" > /dev/null
  "$PY" scripts/make_random_vlm.py --config "$W/setup" --out "$W/base_model"
  SIZE=224; EPISODES=4; SECONDS_=3; DTYPE=bf16
else
  cp -r tests/fixtures/vlm/tiny_a "$W/base_model"
  SIZE=56; EPISODES=6; SECONDS_=3; DTYPE=f32
fi
"$BIN" record --sim --episodes $EPISODES --seconds $SECONDS_ --width $SIZE --height $SIZE --out "$W/rec" > /dev/null
printf 'align: {sensor_window_s: 0.1, sensor_samples: 65}\nsplit: {val_fraction: 0.25, seed: 7}\n' > "$W/compile.yaml"
"$BIN" dataset compile --episodes "$W/rec" --config "$W/compile.yaml" --out "$W/dataset" > /dev/null
"$BIN" train-heads --size small --epochs 2 --seed 7 --dataset "$W/dataset" --base-model "$W/base_model" \
  --checkpoints "$W/checkpoints" --work-dir "$W/stage1" > "$W/stage1.json"
sets() {  # output folder
  for s in data.dataset_dir=$W/dataset model.base_model_dir=$W/base_model model.stage1_checkpoint=$W/checkpoints/v0001 \
    run.output_dir=$1 run.epochs=3 run.seed=42 run.device=cpu model.compute_dtype=$DTYPE memory.preset=manual \
    memory.micro_batch=2 memory.accum_steps=2 lora.rank=8 lora.dropout=0.0 cache.mode=vision cache.dir=$W/cache \
    checkpoint.state_dir=$1/state checkpoint.publish_dir=$1/ck progress.log_file=$1/progress.jsonl \
    progress.plot_file=$1/curves.png; do printf -- '--set %s ' "$s"; done
}
summary() {  # name, output folder, ranks
  "$PY" - "$1" "$2" "$3" <<'PY'
import json, statistics, sys
name, out, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
ev = [json.loads(l) for l in open(f"{out}/progress.jsonl")]
sps = [e["samples_per_s"] for e in ev if e.get("samples_per_s") and e.get("loss") is not None]
r = json.loads(open(f"{out}/result.json").read())["run"]
n = max(r["grad_all_reduces"], 1)
print(json.dumps({"run": name, "ranks": ranks, "steps": r["counters"]["global_step"], "samples_per_s_median": round(statistics.median(sps), 2),
                  "grad_all_reduce_ms_per_step": round(1000 * r["grad_all_reduce_s"] / n, 2) if r["grad_all_reduces"] else None}))
PY
}
# The vision cache is built once (first run) and shared, so every run below trains on it.
OMP_NUM_THREADS=2 "$BIN" train --config config/train.yaml --quiet $(sets "$W/warm") --set run.epochs=1 > /dev/null
for threads in 1 2; do
  o=$W/one-t$threads; mkdir -p $o
  OMP_NUM_THREADS=$threads "$BIN" train --config config/train.yaml --quiet $(sets $o) --set memory.accum_steps=4 > $o/result.json
  summary "1 process, $threads thread(s), micro-batch 2 x 4" $o 1
done
o=$W/two; mkdir -p $o
"$TORCHRUN" --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29517 --no-python \
  "$BIN" train --config config/train.yaml --quiet $(sets $o) > $o/result.json 2> $o/stderr.log
summary "2 ranks (torchrun), 1 thread each, micro-batch 2 x 2 per rank" $o 2
