# Sourced by the CUDA scripts: NVIDIA's CUDA 13.0 compiler, headers and runtime from PyPI wheels
# in a venv (target/cuda/venv, created once and reused), and the variables candle's build needs.
# No GPU and no system CUDA toolkit are needed. All wheels are pinned to 13.0: cudarc 0.19.10
# (candle 0.11.1's) refuses newer toolkits, and mixing 13.x versions in the shared `cu13`
# directory makes PTX the 13.0 ptxas rejects. `nvidia-cuda-cccl` provides `nv/target`, without
# which nvcc fails inside cuda_fp16.h.
cuda_venv=${LETHE_CUDA_VENV:-target/cuda/venv}
cuda_stamp=$cuda_venv/.lethe-cuda-13.0.88
if [[ ! -f $cuda_stamp ]]; then
  echo "== installing the CUDA 13.0 compiler wheels into $cuda_venv"
  rm -rf "$cuda_venv"
  python3 -m venv "$cuda_venv"
  "$cuda_venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
  # candle-kernels' build script does not rerun when the toolchain changes.
  cargo clean -p candle-kernels >/dev/null 2>&1 || true
  cargo clean --release -p candle-kernels >/dev/null 2>&1 || true
  touch "$cuda_stamp"
fi
cuda_root=$("$cuda_venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export PATH="$cuda_root/bin:$PATH" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
nvcc --version | grep -q "release 13.0" || { echo "error: nvcc in $cuda_root is not CUDA 13.0" >&2; exit 1; }
