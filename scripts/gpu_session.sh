#!/usr/bin/env bash
# Everything a lent CUDA machine is for, in one call (about 10 minutes at most):
#  1. the whole loop on CUDA: `vla_finetune demo --quick --device cuda` (recording, compile and
#     stage 1 on the CPU; Stage 2 in bf16 on the GPU, features cache with a refresh epoch; the
#     policy process on the GPU in bf16 hot-swapping every published version);
#  2. scripts/gpu_bench.sh: ours vs the Python reference at full Qwen2.5-VL-3B shapes.
# Built elsewhere and carried (no Rust there): the release binary, at $VLA_BIN. Run from the
# repository root. What comes back ($OUT, at most 8 files): demo_report.json, demo.log,
# policy_status.json, ours.json, reference.json, bench.log.
#
#   VLA_BIN=.gpu/vla_finetune scripts/gpu_session.sh          # on the GPU machine
#   VLA_BIN=target/debug/vla_finetune scripts/gpu_session.sh --device cpu   # a dry run here
set -uo pipefail

DEVICE=cuda
BENCH=(--model full)
case "${1:-}" in
    --device) DEVICE="$2"; BENCH=(--device cpu --quick) ;;
    "") ;;
    *) echo "gpu_session.sh: unknown argument $1 (expected --device cpu for a dry run)" >&2; exit 2 ;;
esac
BIN="${VLA_BIN:-target/release/vla_finetune}"
RESULTS="${OUT:-out/gpu_session}"
WORK="${TMPDIR:-/tmp}/vla_gpu_session"
mkdir -p "$RESULTS" && rm -rf "$WORK" && mkdir -p "$WORK"
source "$(dirname "$0")/torch_env.sh"

echo "== 1/2 demo --quick --device $DEVICE"
timeout 240 "$BIN" demo --quick --device "$DEVICE" --out "$WORK/demo" > "$RESULTS/demo.log" 2>&1
echo "demo exit $?"
cp "$WORK/demo/report.json" "$RESULTS/demo_report.json" 2>/dev/null
cp "$WORK/demo/policy_status.json" "$RESULTS/policy_status.json" 2>/dev/null
tail -n 4 "$RESULTS/demo.log"

echo "== 2/2 gpu_bench.sh ${BENCH[*]}"
OUT_DIR="$WORK/bench" VLA_BIN="$BIN" timeout 480 "$(dirname "$0")/gpu_bench.sh" "${BENCH[@]}" > "$RESULTS/bench.log" 2>&1
echo "bench exit $?"
cp "$WORK/bench/ours.json" "$WORK/bench/reference.json" "$RESULTS/" 2>/dev/null
tail -n 12 "$RESULTS/bench.log"
