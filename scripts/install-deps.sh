#!/usr/bin/env bash
# Installs the Debian packages moelab builds against (skips the install when all are present).
# CUDA is optional: with /usr/local/cuda/bin/nvcc present the CUDA backend is built too.
set -euo pipefail
# python3-torch: Debian's PyTorch (1.13 on Debian 12) under /usr/bin/python3, which the tests use to
# check scripts/moelab_torch.py against moelab (tests/train/test_torch_loader.cpp).
packages=(build-essential cmake pkg-config libgtest-dev libbenchmark-dev nlohmann-json3-dev
          libtomlplusplus-dev libcli11-dev libpcre2-dev libcairo2-dev zlib1g-dev libopenmpi-dev openmpi-bin
          python3-torch)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
