#!/usr/bin/env bash
# Ours vs the Python stack on one CUDA card, full Qwen2.5-VL-3B shapes (random weights), 2 views
# of 448x448 (1024 patches of 14 px, 256 LLM tokens each), batch 2, LoRA r 8, bf16, gradient checkpointing,
# cache modes off / vision / features, plus vision-cache build and act() latency.
#
# Needs: python with torch 2.11.0 (+cu130), transformers, peft, safetensors (no network, no
# Rust); the release binary built elsewhere (`cargo build --release --bin vla_finetune`) at
# $VLA_BIN (default target/release/vla_finetune); run from the repository root (the binary reads
# the tokenizer fixture under tests/fixtures/vlm). Writes $OUT_DIR/{ours,reference}.json and
# prints the side-by-side table (ratios ours / reference). About 5-8 minutes on an H100.
#
#   scripts/gpu_bench.sh                                    # the GPU run
#   scripts/gpu_bench.sh --device cpu --quick               # end-to-end check on CPU (tiny, 1 step)
#   scripts/gpu_bench.sh --device cpu --model reduced --precision f32   # `make bench-cpu`
set -euo pipefail

DEVICE=cuda
QUICK=0
MODEL=full
PRECISION=bf16
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        --precision) PRECISION="$2"; shift 2 ;;
        --quick) QUICK=1; MODEL=tiny; shift ;;
        *) echo "gpu_bench.sh: unknown argument $1 (expected --device D, --model tiny|reduced|full, --precision f32|bf16, --quick)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
BIN="${VLA_BIN:-target/release/vla_finetune}"
OUT_DIR="${OUT_DIR:-${OUT:-out}/gpu_bench}"
source "$(dirname "$0")/torch_env.sh"
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

case "$MODEL" in
    full) SHAPES=(--model full --views 2 --image-size 448 --batch 2); RUN=(--steps 5 --warmup 2 --ddim-steps 10) ;;
    reduced) SHAPES=(--model reduced --views 2 --image-size 224 --batch 2); RUN=(--steps 3 --warmup 1 --ddim-steps 10) ;;
    tiny) SHAPES=(--model tiny --views 2 --batch 2); RUN=(--steps 3 --warmup 1 --ddim-steps 10) ;;
    *) echo "gpu_bench.sh: --model $MODEL: expected tiny, reduced or full" >&2; exit 2 ;;
esac
[ "$QUICK" = 1 ] && RUN=(--steps 1 --warmup 1 --ddim-steps 2)
COMMON=(--rank 8 --precision "$PRECISION" --checkpointing on --device "$DEVICE" --kinds step,vision-cache,act --cache off,vision,features)

mkdir -p "$OUT_DIR"
"$BIN" bench "${SHAPES[@]}" "${COMMON[@]}" "${RUN[@]}" --export "$OUT_DIR/setup" --json "$OUT_DIR/ours.json"
"$PY" scripts/reference_bench.py --setup "$OUT_DIR/setup" "${COMMON[@]}" "${RUN[@]}" --json "$OUT_DIR/reference.json"
"$PY" scripts/bench_compare.py "$OUT_DIR/ours.json" "$OUT_DIR/reference.json"
