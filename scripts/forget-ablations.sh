#!/usr/bin/env bash
# The paper's data ablation, redone with guidance measured: forget-adapters trained on 25 %,
# 50 % and 100 % of the replacement pairs, without the CFG-aware doubling, and at a second LoRA
# rank; leak rate and utility of each at γ ∈ {1, 2, 3}, in one report (table + leak_vs_gamma.png).
# Run after scripts/forget-demo.sh (reuses its data and planted adapter in $OUT); the training
# settings default to the demo's forget-adapter, so that only the ablated setting differs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-target/forget-demo}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
FORGET_EPOCHS=${FORGET_EPOCHS:-2}
FORGET_LR=${FORGET_LR:-5e-4}
RANK=${RANK:-16}
RANK2=${RANK2:-4}
GAMMA=${GAMMA:-3}
MODE=${MODE:-prob}
THREADS=${THREADS:-2}
lethe=target/release/lethe
[[ -d $OUT/plant && -f $OUT/data/forget.jsonl ]] || { echo "run scripts/forget-demo.sh first" >&2; exit 1; }

train() { # NAME DATA RANK [extra flags]
  local name=$1 data=$2 rank=$3; shift 3
  [[ -f $OUT/ablation/$name/adapter_config.json ]] && return
  echo "== forget: $name"
  $lethe forget --model "$MODEL" --data "$data" --on "$OUT/plant" --out "$OUT/ablation/$name" \
    --gamma "$GAMMA" --mode "$MODE" --epochs "$FORGET_EPOCHS" --lr "$FORGET_LR" --rank "$rank" --alpha $((2 * rank)) \
    --threads "$THREADS" --log "$OUT/ablation/$name.metrics.jsonl" "$@"
}
mkdir -p "$OUT/ablation"
train data25 "$OUT/data/forget.25.jsonl" "$RANK"
train data50 "$OUT/data/forget.50.jsonl" "$RANK"
train no-cfg-aware "$OUT/data/forget.jsonl" "$RANK" --no-cfg-aware
train rank$RANK2 "$OUT/data/forget.jsonl" "$RANK2"
stacks=(--stack "planted=$OUT/plant@off")
stacks+=(--stack "data100=$OUT/plant+$OUT/forget")
for n in data25 data50 no-cfg-aware rank$RANK2; do stacks+=(--stack "$n=$OUT/plant+$OUT/ablation/$n"); done
$lethe eval --model "$MODEL" --threads "$THREADS" --data "$OUT/data" --out "$OUT/report-ablation" \
  "${stacks[@]}" --gammas 1,2,3 --modes "$MODE" --attack-customers 0 "${@}"
echo "ablation report: $OUT/report-ablation/report.md"
