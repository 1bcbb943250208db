#!/usr/bin/env bash
# Everything a lent CUDA machine is for:
#  smoke: the whole loop on CUDA: `vla_finetune demo --quick --device cuda` (recording, compile
#         and stage 1 on the CPU; Stage 2 in bf16 on the GPU, features cache with a refresh
#         epoch and the VL model offloaded in cached epochs; the policy process in bf16 on the
#         GPU, hot-swapping every published version). 200 s at most.
#  bench: scripts/gpu_bench.sh: ours vs the Python reference at full Qwen2.5-VL-3B shapes.
#         540 s at most.
# The device tool allows 600 s per command: run `smoke`, then `bench`, as two calls on the same
# warm machine; `all` (the default) runs both, for a CUDA box without that limit.
# Built elsewhere and carried (no Rust there): the release binary, at $VLA_BIN. Run from the
# repository root. Results in $OUT (at most 8 files): smoke -> demo_report.json, demo.log,
# policy_status.json; bench -> ours.json, reference.json, bench.log.
#
#   VLA_BIN=.gpu/vla_finetune scripts/gpu_session.sh smoke     # on the GPU machine
#   VLA_BIN=.gpu/vla_finetune scripts/gpu_session.sh bench
#   VLA_BIN=target/debug/vla_finetune scripts/gpu_session.sh all --device cpu   # dry run here
set -uo pipefail

STAGE="${1:-all}"
case "$STAGE" in smoke|bench|all) ;; *) echo "gpu_session.sh: stage $STAGE: expected smoke, bench or all" >&2; exit 2 ;; esac
DEVICE=cuda
BENCH=(--model full)
if [ "${2:-}" = --device ]; then
    DEVICE="$3"
    BENCH=(--device "$DEVICE" --quick)
elif [ -n "${2:-}" ]; then
    echo "gpu_session.sh: unknown argument $2 (expected --device D for a dry run)" >&2; exit 2
fi
BIN="${VLA_BIN:-target/release/vla_finetune}"
RESULTS="${OUT:-out/gpu_session}"
WORK="${TMPDIR:-/tmp}/vla_gpu_session"
mkdir -p "$RESULTS" "$WORK"
source "$(dirname "$0")/torch_env.sh"

if [ "$STAGE" != bench ]; then
    echo "== smoke: demo --quick --device $DEVICE"
    rm -rf "$WORK/demo"
    timeout 200 "$BIN" demo --quick --device "$DEVICE" --out "$WORK/demo" > "$RESULTS/demo.log" 2>&1
    echo "demo exit $?"
    cp "$WORK/demo/report.json" "$RESULTS/demo_report.json" 2>/dev/null
    cp "$WORK/demo/policy_status.json" "$RESULTS/policy_status.json" 2>/dev/null
    tail -n 4 "$RESULTS/demo.log"
fi
if [ "$STAGE" != smoke ]; then
    echo "== bench: gpu_bench.sh ${BENCH[*]}"
    rm -rf "$WORK/bench"
    OUT_DIR="$WORK/bench" VLA_BIN="$BIN" timeout 540 "$(dirname "$0")/gpu_bench.sh" "${BENCH[@]}" > "$RESULTS/bench.log" 2>&1
    echo "bench exit $?"
    cp "$WORK/bench/ours.json" "$WORK/bench/reference.json" "$RESULTS/" 2>/dev/null
    tail -n 12 "$RESULTS/bench.log"
fi
