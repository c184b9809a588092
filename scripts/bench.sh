#!/usr/bin/env bash
# The benchmark set recorded in docs/BENCHMARKS.md, run side by side on one machine.
#
# Optional: LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin runs llama.cpp's llama-bench and
# llama-batched-bench on the same GGUF in the same session (see docs/BENCHMARKS.md for how to
# build them from the PyPI sdist of llama-cpp-python). LLAMA_CPP_Q8=/path/to/q8_0.gguf adds the
# re-quantized Q8_0 file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
lethe=./target/release/lethe
model=models/SmolLM2-135M-Instruct.Q4_1.gguf

run() { echo "\$ $*"; "$@"; echo; }

if [[ -n "${LLAMA_CPP_BIN:-}" ]]; then
  export LD_LIBRARY_PATH="$LLAMA_CPP_BIN:${LD_LIBRARY_PATH:-}"
  models=(-m "$model")
  [[ -n "${LLAMA_CPP_Q8:-}" ]] && models+=(-m "$LLAMA_CPP_Q8")
  run "$LLAMA_CPP_BIN/llama-bench" "${models[@]}" -p 128 -n 64 -t 2 -r 3
  run "$LLAMA_CPP_BIN/llama-batched-bench" -m "$model" -c 4096 -b 512 -ub 512 -npp 128 -ntg 64 -npl 1,2 -t 2
fi

# Model level: 1 and 2 sequences side by side (the CFG pair is a 2-row step).
run $lethe bench decode --batch 1,2 --prompt-tokens 128 --gen-tokens 64
run $lethe bench decode --batch 1,2 --prompt-tokens 128 --gen-tokens 64 --weights q8_0
run $lethe bench decode --batch 1,2,4,8,16 --prompt-tokens 128 --gen-tokens 64
# Every kernel set this CPU has, and the weight prefetch against none (issue 15).
run $lethe bench decode --kernels "$($lethe kernels --list | paste -sd,)" --batch 1,2 --prompt-tokens 128 --gen-tokens 64
run $lethe bench decode --prefetch-bytes 0,2048,4096,8192 --batch 1,2 --prompt-tokens 128 --gen-tokens 256
run $lethe bench decode --batch 1,2 --prompt-tokens 128 --gen-tokens 256 --stages
# The same ratios for a model whose weights (~0.6 GB, random) come from DRAM on any CPU.
run $lethe bench decode --random-model 1.1b --kernels "$($lethe kernels --list | grep -v portable | paste -sd,)" --batch 1,2 --prompt-tokens 128 --gen-tokens 64
# Engine level: guided vs unguided, 1 and 8 concurrent requests.
run $lethe bench decode --concurrency 1,8 --guided --compare-unguided --prompt-tokens 128 --gen-tokens 64 --rounds 7
# Chunked prefill: a short request's time to first token while 2,000 tokens prefill.
run $lethe bench decode --ttft-under-prefill 2000 --prompt-tokens 32 --rounds 7
# HTTP: streaming clients against an in-process server, and HTTP vs engine for one stream.
run $lethe bench serve --concurrency 1,4,16 --both --prompt-words 100 --gen-tokens 64
run $lethe bench serve --concurrency 1 --compare-engine --gen-tokens 64
# Forget-adapters: rank-16 all-linear adapters, 1 row / 8 rows / 8 rows over 4 adapters; load time.
run $lethe bench adapters --gen-tokens 256
