#!/usr/bin/env bash
# Compile every csrc/*.cu alone with nvcc (no torch, no GPU needed), so that CUDA sources stay
# buildable on machines whose torch is CPU-only. Exit 0 with a message when nvcc is absent;
# non-zero on the first compile error. NVCC and NVCC_ARCH override the compiler and -arch.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc_bin" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

arch="${NVCC_ARCH:-sm_90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
sources=("$root"/csrc/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/*.cu files"
  exit 0
fi

echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 1)"
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "  nvcc -arch=$arch -c csrc/$name.cu"
  "$nvcc_bin" -arch="$arch" -O3 -std=c++17 -Xcompiler -Wall -I "$root/csrc" -c "$src" -o "$tmp/$name.o"
done
echo "check_cuda_compile: ${#sources[@]} file(s) compiled"
