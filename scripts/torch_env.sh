# Sourced by the GPU scripts: points a vla_finetune binary built on another machine at this
# machine's torch. Needs DEVICE (cpu, cuda, cuda:N) and BIN (the binary) set, and PY (python with
# torch) optional. The binary links libtorch from wherever it was built: LD_LIBRARY_PATH gets this
# machine's torch/lib, and libtorch_cuda is preloaded (a binary built against CPU-only libtorch
# does not link it, and CUDA then reports itself unavailable). Fails if a CUDA device was asked
# for and the binary does not see one.
PY="${PY:-${PYTHON:-python3}}"
[ -x "$BIN" ] || { echo "no vla_finetune binary at $BIN (set VLA_BIN)" >&2; exit 1; }
TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$DEVICE" != cpu ] && [ -e "$TORCH_LIB/libtorch_cuda.so" ]; then
    export LD_PRELOAD="$TORCH_LIB/libtorch_cuda.so${LD_PRELOAD:+ $LD_PRELOAD}"
fi
"$BIN" device --device "$DEVICE"
if [ "$DEVICE" != cpu ] && ! "$BIN" device --device "$DEVICE" | grep -q "CUDA available"; then
    echo "the binary sees no CUDA device with $TORCH_LIB" >&2
    exit 1
fi
