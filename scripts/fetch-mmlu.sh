#!/usr/bin/env bash
# Fetch the MMLU questions `lethe eval` scores multiple-choice accuracy on: the 57-subject
# few-shot prompts that ship inside the `lm-eval` wheel on PyPI (EleutherAI, MIT licence;
# lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json, 281 questions with answers).
#
# Downloaded with pip (no install, no deps), one file extracted into data/. Idempotent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${LETHE_MMLU_FILE:-$root/data/mmlu_cot_prompts.json}"
version="0.4.13"
member="lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
# sha256 of that file inside lm-eval==0.4.13.
expected_sha256="081478485b1d4f51e01305e19113f0e3a468f2dc787596386998e229a97b096c"

if [[ -s "$dest" ]]; then
  echo "MMLU prompts already present: $dest"
  exit 0
fi
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "error: $python not found (needed to fetch with pip)" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading lm-eval==$version from PyPI (~9 MB)..."
"$python" -m pip download --quiet --no-deps --disable-pip-version-check --dest "$tmp" "lm-eval==$version"
"$python" - "$tmp"/lm_eval-"$version"-*.whl "$member" "$tmp/mmlu.json" <<'PY'
import sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
    f.write(z.read(member))
PY
actual="$(sha256sum "$tmp/mmlu.json" | cut -d' ' -f1)"
if [[ "$actual" != "$expected_sha256" ]]; then
  echo "error: checksum mismatch for $member: got $actual, expected $expected_sha256" >&2
  exit 1
fi
mv "$tmp/mmlu.json" "$dest"
echo "MMLU prompts ready: $dest"
