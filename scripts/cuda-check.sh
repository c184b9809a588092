#!/usr/bin/env bash
# Compiles lethe with the `cuda` feature on a machine without GPU or CUDA toolkit: candle's CUDA
# backend and its PTX kernels (built by nvcc from the PyPI wheels, for CUDA_COMPUTE_CAP, default
# 90 = H100/H200) and our own code and tests against it. `cargo check` does not link: linking
# needs libcuda.so (the driver; no wheel ships it) and cuBLAS/cuBLASLt/cuRAND/NVRTC, which
# cudarc links dynamically. scripts/gpu-bundle.sh links against stubs to carry a binary over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/cuda-env.sh
cargo check --features cuda --all-targets
