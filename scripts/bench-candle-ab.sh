#!/usr/bin/env bash
# Side-by-side speed of two lethe binaries on the candle backend (the portable/GPU path), on the
# CPU: 1 and 8 concurrent guided requests (CFG pairs, γ = 3, greedy) through the engine, runs
# interleaved A, B, A, B, ... so that machine noise hits both alike. Prints per-round figures
# and the median ratio B / A of per-request and aggregate decode tok/s.
#
#   scripts/bench-candle-ab.sh OLD_BIN NEW_BIN [ROUNDS] [WEIGHTS...]   (weights: native f32 ...)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
old=$1 new=$2 rounds=${3:-3}
shift $(($# < 3 ? $# : 3))
weights=("${@:-native}")
out=target/bench-ab
mkdir -p "$out"
echo "load: $(uptime)"; lscpu | grep 'Model name'
for w in "${weights[@]}"; do
  for r in $(seq 1 "$rounds"); do
    for side in old new; do
      bin=${!side}
      "$bin" bench decode --backend candle --weights "$w" --concurrency 1,8 --guided \
        --prompt-tokens "${PROMPT_TOKENS:-32}" --gen-tokens "${GEN_TOKENS:-32}" --rounds 1 --json \
        | tail -1 >"$out/$w-$side-$r.json"
    done
  done
done
python3 - "$out" "$rounds" "${weights[@]}" <<'PY'
import json, statistics, sys
out, rounds, weights = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for w in weights:
    for c in (1, 8):
        for key in ("per_request_tok_s", "aggregate_tok_s"):
            pairs = []
            for r in range(1, rounds + 1):
                get = lambda side: next(x for x in json.load(open(f"{out}/{w}-{side}-{r}.json")) if x["concurrency"] == c)[key]
                pairs.append((get("old"), get("new")))
            ratio = statistics.median(n / o for o, n in pairs)
            print(f"weights {w}, {c} guided: {key} old {[round(o, 2) for o, _ in pairs]} new {[round(n, 2) for _, n in pairs]} -> new/old median {ratio:.2f}x")
PY
