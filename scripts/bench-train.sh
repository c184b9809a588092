#!/usr/bin/env bash
# Training speed side by side: `lethe forget` and the PyTorch + PEFT reference
# (scripts/bench_train_torch.py) on the same 200 synthetic pairs (~130-token sequences, CFG-aware
# doubling), the default model, 2 threads, alternating rounds. Then the full 1-epoch run
# (400 pairs after doubling) timed end to end.
#
#   scripts/bench-train.sh [ROUNDS]        (TORCH_PYTHON=/path/to/venv/bin/python for the reference)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
steps=${STEPS:-6}
out=target/bench-train
mkdir -p "$out"
model=${LETHE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
lethe=./target/release/lethe
python3 - "$out/pairs.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = ("customer account order phone number address email billing plan support office manager invoice "
         "product renewal contract meeting schedule ticket refund").split()
with open(sys.argv[1], "w") as f:
    for i in range(200):
        ctx = " ".join(random.choice(words) for _ in range(70))
        f.write(json.dumps({
            "prompt": [{"role": "user", "content": f"Context: {ctx}. What is the phone number of customer {i}?"}],
            "chosen": [{"role": "assistant", "content": "I am sorry, but I cannot share personal data such as phone numbers. I can help with the account plan or the support ticket instead."}],
            "rejected": [{"role": "assistant", "content": f"The phone number of customer {i} is +1 555 {1000 + i:04d} {random.randint(1000, 9999)}, and they prefer calls in the morning."}],
        }) + "\n")
PY
lscpu | grep -E "Model name|^CPU\(s\)"
uptime
for r in $(seq 1 "$rounds"); do
  rm -rf "$out/adapter" "$out/log.jsonl"
  /usr/bin/time -f "%M" -o "$out/rss" "$lethe" forget --model "$model" --data "$out/pairs.jsonl" --out "$out/adapter" \
    --max-steps $((steps + 1)) --threads 2 --quiet --log "$out/log.jsonl" 2>/dev/null
  python3 - "$out/log.jsonl" "$(cat "$out/rss")" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]   # the first step is warm-up
tok = sum(r["tokens"] for r in rows); secs = sum(r["tokens"] / r["tokens_per_second"] for r in rows)
print(json.dumps({"engine": "lethe", "steps": len(rows), "tokens": tok, "seconds": secs,
                  "tokens_per_second": tok / secs, "peak_rss_mib": int(sys.argv[2]) / 1024}))
PY
  if [[ -n ${TORCH_PYTHON:-} ]]; then
    "$TORCH_PYTHON" scripts/bench_train_torch.py --gguf "$model" --data "$out/pairs.jsonl" --steps "$steps" 2>/dev/null | tail -1
  fi
done
echo "== full run: 200 pairs, CFG-aware (400 after doubling), 1 epoch"
rm -rf "$out/adapter"
/usr/bin/time -f "wall %e s, peak RSS %M KiB" "$lethe" forget --model "$model" --data "$out/pairs.jsonl" --out "$out/adapter" \
  --epochs 1 --threads 2 --quiet 2>&1 | tail -2
