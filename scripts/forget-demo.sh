#!/usr/bin/env bash
# The whole forgetting story on the default model (SmolLM2-135M-Instruct), on a CPU:
#   synth → finetune (plant the secrets, a stand-in for a company's fine-tune on its CRM)
#         → forget (CFG-aware ORPO forget-adapter on top) → eval (through the serving engine)
#         → serve the result for a tenant and audit it over HTTP with the tenant's key.
# Results land in $OUT (default target/forget-demo); docs/FORGETTING.md says how to read them.
#
# Every size is an environment variable, so the run can be fitted to the machine:
#   CUSTOMERS PHRASINGS PLANT_EPOCHS PLANT_LR FORGET_EPOCHS FORGET_LR RANK GAMMA MODE THREADS
#   EVAL_CUSTOMERS EVAL_DECOYS ATTACK_CUSTOMERS MMLU PASSAGES GAMMAS MODES
#   BASE (0: no row for the model alone) PLANTED_GAMMAS TENANT_CUSTOMERS TENANT_GAMMAS
# The defaults are the 12-customer run in docs/FORGETTING.md (about 20 min on a quiet 2-core
# machine, 40 under load). REUSE=1 keeps the data and adapters already in $OUT and only evaluates and serves.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-target/forget-demo}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
CUSTOMERS=${CUSTOMERS:-12}
PHRASINGS=${PHRASINGS:-1}
# Planting random values into a 135M model needs a high rate and several passes (a company
# fine-tune that memorised its CRM); the forget-adapter needs far less.
PLANT_EPOCHS=${PLANT_EPOCHS:-6}
PLANT_LR=${PLANT_LR:-2e-3}
FORGET_EPOCHS=${FORGET_EPOCHS:-2}
FORGET_LR=${FORGET_LR:-5e-4}
RANK=${RANK:-16}
GAMMA=${GAMMA:-3}
MODE=${MODE:-prob}
THREADS=${THREADS:-2}
EVAL_CUSTOMERS=${EVAL_CUSTOMERS:-12}
EVAL_DECOYS=${EVAL_DECOYS:-5}
ATTACK_CUSTOMERS=${ATTACK_CUSTOMERS:-12}
MMLU=${MMLU:-57}
PASSAGES=${PASSAGES:-16}
GAMMAS=${GAMMAS:-off,1,2,3}
MODES=${MODES:-prob}
BASE=${BASE:-1}
PLANTED_GAMMAS=${PLANTED_GAMMAS:-off,$GAMMA}
TENANT_CUSTOMERS=${TENANT_CUSTOMERS:-$EVAL_CUSTOMERS}
TENANT_GAMMAS=${TENANT_GAMMAS:-off,1}
SEED=${SEED:-0}

./scripts/fetch-model.sh
./scripts/fetch-mmlu.sh
cargo build --release --quiet
lethe=target/release/lethe
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*"; }
started=$SECONDS

if [[ ${REUSE:-0} == 1 && -d $OUT/plant && -d $OUT/forget ]]; then
  log "reusing $OUT/data, $OUT/plant and $OUT/forget (their training.json has the settings)"
else
  rm -rf "$OUT/data" "$OUT/plant" "$OUT/forget"
  log "synth: $CUSTOMERS customers"
  $lethe synth --customers "$CUSTOMERS" --phrasings "$PHRASINGS" --seed "$SEED" --out "$OUT/data"

  log "finetune: plant the secrets"
  $lethe finetune --model "$MODEL" --data "$OUT/data/plant.jsonl" --out "$OUT/plant" \
    --epochs "$PLANT_EPOCHS" --lr "$PLANT_LR" --rank "$RANK" --alpha $((2 * RANK)) --seed "$SEED" \
    --threads "$THREADS" --log "$OUT/plant.metrics.jsonl"

  log "forget: CFG-aware ORPO forget-adapter on top of the planted one"
  $lethe forget --model "$MODEL" --data "$OUT/data/forget.jsonl" --on "$OUT/plant" --out "$OUT/forget" \
    --gamma "$GAMMA" --mode "$MODE" --epochs "$FORGET_EPOCHS" --lr "$FORGET_LR" --rank "$RANK" \
    --alpha $((2 * RANK)) --seed "$SEED" --threads "$THREADS" --log "$OUT/forget.metrics.jsonl"
fi
train_s=$((SECONDS - started))

log "eval: planted (alone and with CFG only) and planted + forget-adapter over the γ grid"
stacks=()
[[ $BASE == 1 ]] && stacks+=(--stack "base=@off")
stacks+=(--stack "planted=$OUT/plant@$PLANTED_GAMMAS" --stack "forget=$OUT/plant+$OUT/forget")
$lethe eval --model "$MODEL" --threads "$THREADS" --data "$OUT/data" --out "$OUT/report" "${stacks[@]}" \
  --gammas "$GAMMAS" --modes "$MODES" --customers "$EVAL_CUSTOMERS" --decoys "$EVAL_DECOYS" \
  --attack-customers "$ATTACK_CUSTOMERS" --mmlu "$MMLU" --passages "$PASSAGES"

log "serve: the forget-adapter for tenant acme, audited over HTTP with acme's key"
export LETHE_ADMIN_KEY="demo-admin-$RANDOM$RANDOM$RANDOM"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$OUT/state"
$lethe serve --model "$MODEL" --threads "$THREADS" --port "$port" --adapters-root "$OUT" \
  --state-dir "$OUT/state" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done
admin() { curl -sf -H "Authorization: Bearer $LETHE_ADMIN_KEY" -H 'content-type: application/json' "$@"; }
admin "http://127.0.0.1:$port/admin/adapters" -d '{"name": "plant", "path": "plant"}' >/dev/null
admin "http://127.0.0.1:$port/admin/adapters" -d '{"name": "forget", "path": "forget"}' >/dev/null
admin -X PUT "http://127.0.0.1:$port/admin/tenants/acme" -d '{"adapters": ["plant", "forget"]}' >/dev/null
key=$(admin -X POST "http://127.0.0.1:$port/admin/tenants/acme/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
# `off` = no guidance object: what acme gets by default (the adapter profile's γ and mode).
$lethe eval --url "http://127.0.0.1:$port" --api-key "$key" --data "$OUT/data" --out "$OUT/report-tenant" \
  --gammas "$TENANT_GAMMAS" --modes "$MODE" --customers "$TENANT_CUSTOMERS" --decoys "$EVAL_DECOYS" \
  --attack-customers "$ATTACK_CUSTOMERS" --mmlu "$MMLU"
kill -INT $server
wait $server || true
trap - EXIT

log "done in $((SECONDS - started)) s (training $train_s s); reports: $OUT/report/report.md, $OUT/report-tenant/report.md"
