#!/usr/bin/env bash
# Installs the Debian packages moelab builds against (skips the install when all are present).
# CUDA is optional: with /usr/local/cuda/bin/nvcc present the CUDA backend is built too.
#   scripts/install-deps.sh           what building and running moelab needs
#   scripts/install-deps.sh --tests   that, and what the tests need besides (scripts/test.sh)
set -euo pipefail
packages=(build-essential cmake pkg-config libgtest-dev libbenchmark-dev nlohmann-json3-dev
          libtomlplusplus-dev libcli11-dev libpcre2-dev libcairo2-dev zlib1g-dev libopenmpi-dev openmpi-bin)
# Tests only: Debian's PyTorch (1.13 on Debian 12) under /usr/bin/python3, against which
# tests/train/test_torch_loader.cpp checks scripts/moelab_torch.py. Installed without its
# recommendations (libtorch-dev would bring OpenCV and Qt, hundreds of packages the loader never uses).
test_packages=(python3-torch)
with_tests=0
case "${1:-}" in
  "") ;;
  --tests) with_tests=1 ;;
  *) echo "install-deps.sh: unknown argument '$1' (use --tests to add the tests' packages)" >&2; exit 2 ;;
esac

missing_of() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
mapfile -t missing < <(missing_of "${packages[@]}")
missing_tests=()
((with_tests)) && mapfile -t missing_tests < <(missing_of "${test_packages[@]}")
if ((${#missing[@]} + ${#missing_tests[@]})); then
  echo "installing: ${missing[*]} ${missing_tests[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  if ((${#missing[@]})); then $SUDO apt-get install -y -qq "${missing[@]}"; fi
  if ((${#missing_tests[@]})); then $SUDO apt-get install -y -qq --no-install-recommends "${missing_tests[@]}"; fi
fi
