# Sourced by the device scripts: binaries and the shared libraries they need travel in .dev/gpu
# (built on the development machine and compressed into bins.tgz; see bench/gpu/stage.sh).
set -u
export GPU_BIN="$PWD/.dev/gpu"
[ -f "$GPU_BIN/bins.tgz" ] && [ ! -x "$GPU_BIN/moelab" ] && tar xzf "$GPU_BIN/bins.tgz" -C "$GPU_BIN"
export LD_LIBRARY_PATH="$GPU_BIN/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OUT="${OUT:-/tmp/moelab_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
