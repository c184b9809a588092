#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and CUDA 13.0 (nvcc, cuBLAS, the driver) and
# no network: GPU parity tests (tests/gpu.rs: the default model's logits on the GPU vs the CPU,
# ragged batches with per-row LoRA vs rows alone and vs the CPU, guided pairs sampled on the GPU
# vs the host), then decode benchmarks, all into one directory. Exits non-zero on any parity
# failure. Budget: under 8 minutes, build included (each step has its own timeout).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Binaries, in order of preference:
#   1. LETHE_GPU_BUNDLE=DIR with `lethe` and `gpu-tests` built elsewhere (scripts/gpu-bundle.sh
#      builds them on a CPU machine; no Rust toolchain needed here);
#   2. otherwise built here: `cargo build --release --features cuda` (offline, from `vendor/`
#      when `cargo vendor` put the crates there; see docs/gpu.md).
# Needs the default model at models/ (or LETHE_MODEL).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-target/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
device=${LETHE_GPU_DEVICE:-cuda:0}
failed=0
log() { echo "== $*" | tee -a "$out/summary.txt"; }
# Runs a step with a time limit; its output goes to $out/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  log "$name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - t0)) s"
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -1
  lscpu 2>/dev/null | grep 'Model name'
} | tee "$out/machine.txt"

if [[ -n ${LETHE_GPU_BUNDLE:-} ]]; then
  bin=$LETHE_GPU_BUNDLE/lethe
  tests=$LETHE_GPU_BUNDLE/gpu-tests
  # The bundle was linked against stubs; the real libraries come from the machine's toolkit.
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
else
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
  offline=()
  [[ -d vendor ]] && offline=(--offline)
  step build 300 cargo build "${offline[@]}" --release --features cuda --bin lethe --test gpu || {
    tail -30 "$out/build.log"
    exit 1
  }
  bin=target/release/lethe
  tests=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
fi
[[ -x $bin && -x $tests ]] || { log "missing binaries ($bin, $tests)"; exit 1; }

# Parity: any failure fails the check.
LETHE_REQUIRE_GPU=1 LETHE_REQUIRE_MODEL=1 LETHE_GPU_DEVICE=$device \
  step parity 180 "$tests" --test-threads 1 --nocapture || failed=1
grep -E "^test |test result" "$out/parity.log" | tee -a "$out/summary.txt"

# Figures (a failing benchmark is reported, not a parity failure).
for w in native f16; do
  step "decode-$w" 90 "$bin" bench decode --device "$device" --weights "$w" \
    --batch 1,2,8,32,64 --prompt-tokens 128 --gen-tokens 64 --json || true
  step "guided-$w" 120 "$bin" bench decode --device "$device" --weights "$w" \
    --concurrency 1,8,32 --guided --compare-unguided --prompt-tokens 128 --gen-tokens 64 --json || true
done
for f in "$out"/decode-*.log "$out"/guided-*.log; do
  tail -1 "$f" >"${f%.log}.json"
done
log "results in $out"
if [[ $failed -ne 0 ]]; then
  log "GPU PARITY FAILED"
  exit 1
fi
log "GPU parity passed"
