#!/usr/bin/env bash
# Copies the binaries for a device run into .dev/gpu (ignored by git), with the shared libraries
# the device image may lack (cairo and its dependencies), and the PyTorch peer scripts (torchao beside them).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.dev/gpu
rm -rf "$dest" && mkdir -p "$dest/lib"
cp build/moelab "$dest/"
# BINS narrows the list when a call needs fewer (a call carries 64 MiB at most).
all_bins="test_cuda test_train bench_attention bench_fp8_gemm bench_fp8_grouped_gemm bench_grouped_gemm dev/cuda/test_dev_cuda
  dev/cuda/bench_attention_variants dev/cuda/bench_grouped_gemm_variants dev/cuda/bench_fp8_grouped_ws"
for b in ${BINS:-$all_bins}; do
  [ -x "build/$b" ] && cp "build/$b" "$dest/"
done
# EXTRA_BINS: binaries from elsewhere (e.g. a test binary built with a planted defect).
for f in ${EXTRA_BINS:-}; do cp "$f" "$dest/"; done
strip "$dest"/* 2>/dev/null || true
ldd build/moelab | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*|libdl.so*|librt.so*|libcuda.so*|libcublas*|libcudnn*) ;;  # present on the device image
    *) cp -L "$lib" "$dest/lib/" ;;
  esac
done
cp ../shared/anchors/torch_moe_ref.py ../shared/anchors/torch_attention_ref.py "$dest/"
[ -z "${NO_TORCHAO:-}" ] && cp -r ../shared/anchors/torchao "$dest/torchao"  # torch_moe_ref.py --fp8 imports it from beside itself
# Compressed, so a device call carries them within its 64 MiB (device_env.sh unpacks them).
(cd "$dest" && bins=$(find . -maxdepth 1 -type f -perm -u+x -printf "%f\n") && tar czf bins.tgz $bins && rm $bins)
du -sh "$dest"
