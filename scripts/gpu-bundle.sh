#!/usr/bin/env bash
# Builds, on a CPU machine without GPU or CUDA toolkit, what scripts/gpu-check.sh runs on a GPU
# machine that has no Rust toolchain: the release `lethe` and the GPU parity tests with
# `--features cuda`, stripped, in target/gpu-bundle (carry it over with the repository and run
# `LETHE_GPU_BUNDLE=target/gpu-bundle scripts/gpu-check.sh`).
#
# Linking: cudarc (candle's CUDA layer) links libcuda.so.1 (the driver), libnvrtc.so.13,
# libcurand.so.10, libcublas.so.13 and libcublasLt.so.13 dynamically. No wheel ships the driver,
# so all five are linked against stubs generated here: empty functions with the real libraries'
# names and sonames (the function list is cudarc's own binding list), put where cudarc's build
# looks ($CUDA_HOME/lib/stubs). At run time the GPU machine's driver and CUDA 13.0 libraries are
# loaded by soname instead. Kernels are PTX for CUDA_COMPUTE_CAP (default 90: H100/H200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Its own target directory: the cuda feature changes every candle crate's build, and sharing
# target/release would throw away (and overwrite) the CPU build.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/gpu-build}
source scripts/cuda-env.sh
stubs=$cuda_root/lib/stubs
mkdir -p "$stubs"
cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
for spec in cuda:1:driver nvrtc:13:nvrtc curand:10:curand cublas:13:cublas cublasLt:13:cublaslt; do
  IFS=: read -r name major sys <<<"$spec"
  grep -o 'load::<_F>("[A-Za-z0-9_]*")' "$cudarc/src/$sys/sys/mod.rs" | sed 's/.*("\(.*\)")/\1/' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' >"$stubs/$name.c"
  cc -shared -fPIC -Wl,-soname,"lib$name.so.$major" -o "$stubs/lib$name.so" "$stubs/$name.c"
done
# candle's kernels link the CUDA runtime (-lcudart); the wheel ships only libcudart.so.13, so
# link that real library through an unversioned name (the binary then needs libcudart.so.13).
ln -sf ../libcudart.so.13 "$stubs/libcudart.so"
cargo build --release --features cuda --bin lethe --test gpu
bundle=target/gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle"
cp "$CARGO_TARGET_DIR/release/lethe" "$bundle/lethe"
cp "$(ls -t "$CARGO_TARGET_DIR"/release/deps/gpu-* | grep -v '\.d$' | head -1)" "$bundle/gpu-tests"
strip "$bundle/lethe" "$bundle/gpu-tests"
for b in "$bundle"/*; do
  echo "$b: $(du -h "$b" | cut -f1), needs: $(readelf -d "$b" | grep NEEDED | grep -o '\[.*\]' | tr -d '[]' | tr '\n' ' ')"
done
# One compressed file to carry (the two binaries are ~130 MB, ~20 MB as xz).
tar -C target -cJf target/gpu-bundle.tar.xz gpu-bundle
echo "target/gpu-bundle.tar.xz: $(du -h target/gpu-bundle.tar.xz | cut -f1) (tar -C target -xJf it on the GPU machine)"
