#!/usr/bin/env bash
# Runs the README's walkthrough as a newcomer would: every fenced block whose info string is
# `sh runnable`, in order, in one bash shell, from the repository root — so the README can never
# drift from the product. Each block is echoed before it runs; the first failing command fails
# the test (bash -e), and a server left running is stopped.
#
# The walkthrough's sizes are variables the README names; by default this runs them small
# (CUSTOMERS=2 PLANT_EPOCHS=1 FORGET_EPOCHS=1: a few minutes, a check of the commands, not of
# the forgetting). README_FULL=1 runs the README's own sizes (~25 minutes of training on 2 cores).
#
# It writes where the walkthrough writes (demo/, .venv/, both git-ignored) and refuses to start
# if demo/ exists, rather than mix with — or delete — a run of yours; it removes demo/ after a
# successful run (README_KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -e demo ]]; then
  echo "error: demo/ exists (a walkthrough run of yours?): move or remove it first" >&2
  exit 1
fi
if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
  echo "error: something listens on 127.0.0.1:8080; the walkthrough's server needs that port" >&2
  exit 1
fi
if [[ ${README_FULL:-0} != 1 ]]; then
  export CUSTOMERS=${CUSTOMERS:-2} PLANT_EPOCHS=${PLANT_EPOCHS:-1} FORGET_EPOCHS=${FORGET_EPOCHS:-1}
fi

script=$(mktemp)
trap 'rm -f "$script"' EXIT
# The blocks, each preceded by an echo of its first line and its position in the README.
awk '
  /^```sh runnable[[:space:]]*$/ { inside = 1; n++; printf "echo \"== README block %d (line %d)\"\n", n, NR; next }
  inside && /^```[[:space:]]*$/  { inside = 0; next }
  inside                         { print }
  END { if (inside) { print "echo error: an unterminated runnable block >&2; exit 1" } }
' README.md >"$script"
blocks=$(grep -c '^echo "== README block' "$script" || true)
if [[ $blocks -lt 5 ]]; then
  echo "error: only $blocks runnable blocks found in README.md (marker: a \`\`\`sh runnable fence)" >&2
  exit 1
fi

echo "== running $blocks README blocks (CUSTOMERS=${CUSTOMERS:-12} PLANT_EPOCHS=${PLANT_EPOCHS:-6} FORGET_EPOCHS=${FORGET_EPOCHS:-2})"
started=$SECONDS
# One shell for all blocks, as a reader pasting them into one terminal; -x shows each command.
# Background jobs (the server) are stopped however the shell ends.
if ! bash -c 'set -euo pipefail; trap "kill \$(jobs -p) 2>/dev/null || true" EXIT; set -x; source "$0"' "$script"; then
  echo "error: the README walkthrough failed (above: the block and the command)" >&2
  [[ -f demo/serve.log ]] && { echo "---- demo/serve.log (tail)"; tail -30 demo/serve.log; }
  exit 1
fi
echo "== the README walkthrough ran in $((SECONDS - started)) s"
for report in demo/eval-*/report.md; do
  [[ -f $report ]] && echo "   wrote $report"
done
if [[ ${README_KEEP:-0} != 1 ]]; then
  rm -rf demo
fi
