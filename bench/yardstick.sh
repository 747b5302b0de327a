#!/usr/bin/env bash
# Training throughput against PyTorch eager on the same model shapes (issue 2's yardstick).
# Runs holdfast and PyTorch alternately, RUNS times each (default 3), on the same threads, and
# prints each JSON line and then the ratio of the medians. Needs torch in $PYTHON (not a project dependency:
# `python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch`).
#
#   PYTHON=/tmp/torchvenv/bin/python bash bench/yardstick.sh [PRESET] [BATCH] [CONTEXT]
#
# HOLDFAST (binary), THREADS (default 2) and STEPS (default 10) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
PRESET=${1:-small}
BATCH=${2:-16}
CONTEXT=${3:-128}
STEPS=${STEPS:-10}
RUNS=${RUNS:-3}

"$PYTHON" -c "import torch" 2>/dev/null || { echo "needs torch in $PYTHON (set PYTHON)" >&2; exit 2; }
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$RUNS"); do
  "$BIN" bench train --preset "$PRESET" --batch-size "$BATCH" --context "$CONTEXT" --steps "$STEPS" \
    | sed 's/^{/{"impl":"holdfast",/' | tee -a "$out"
  "$PYTHON" tools/yardstick/torch_train.py --preset "$PRESET" --batch-size "$BATCH" \
    --context "$CONTEXT" --steps "$STEPS" --threads "$THREADS" \
    | sed 's/^{/{"impl":"pytorch",/' | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
tps = lambda impl: statistics.median(r["tokens_per_s"] for r in runs if r["impl"] == impl)
ours, theirs = tps("holdfast"), tps("pytorch")
print(json.dumps({"holdfast_tokens_per_s": round(ours, 1), "pytorch_tokens_per_s": round(theirs, 1),
                  "ratio": round(ours / theirs, 3)}))
PY
