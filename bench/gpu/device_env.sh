# Sourced by the device scripts: binaries and the shared libraries they need travel in .dev/gpu
# (built on the development machine; see bench/gpu/stage.sh).
set -u
export GPU_BIN="$PWD/.dev/gpu"
export LD_LIBRARY_PATH="$GPU_BIN/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OUT="${OUT:-/tmp/moelab_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
