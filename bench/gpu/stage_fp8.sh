#!/usr/bin/env bash
# Stages the FP8 device run into DEST (default .dev/fp8, ignored by git): stripped moelab,
# test_cuda and bench_fp8_gemm, the shared libraries the device image may lack, the seed config,
# the PyTorch peer with torchao beside it, and bench/gpu/fp8_device_run.sh, packed into one
# tarball (a device call carries at most 64 MiB). On the device:
#   cd DEST && tar xzf fp8.tgz && bash fp8/fp8_device_run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.dev/fp8}
stage=$(mktemp -d)/fp8
mkdir -p "$stage/lib" "$dest"
for b in moelab test_cuda bench_fp8_gemm; do strip -o "$stage/$b" "build/$b"; done
ldd build/moelab | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*|libpthread*|libdl.so*|librt.so*|libcuda.so*|libcublas*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
cp configs/d12-moe.toml bench/gpu/fp8_device_run.sh "$stage/"
cp ../shared/anchors/torch_moe_ref.py "$stage/" 2>/dev/null || cp /work/shared/anchors/torch_moe_ref.py "$stage/"
cp -r /work/shared/anchors/torchao "$stage/torchao"
tar czf "$dest/fp8.tgz" -C "$(dirname "$stage")" fp8
rm -rf "$(dirname "$stage")"
du -sh "$dest/fp8.tgz"
