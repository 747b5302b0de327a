#!/usr/bin/env bash
# Workers of different speeds: 4 workers on the default task, one of them FACTOR× slower
# (`--chaos slow:worker=3,factor=FACTOR`), with rounds of H steps each (fixed) against rounds
# closed by time (`--round-seconds SECONDS`, batches on demand, merged by tokens); each also
# at equal speed. Alternating, ROUNDS times. One JSON line per run:
#
#   committed_tok_s   committed tokens / training seconds (first round to last commit)
#   solo_sum_tok_s    the sum over workers of each one's own rate in the run (the tokens it
#                     trained / its compute seconds): what they would commit if none waited
#   efficiency        committed_tok_s / solo_sum_tok_s
#   val_loss          final validation loss (every run trains the same tokens)
#
#   bash bench/heterogeneous.sh [ROUNDS]    # STEPS (default 1500), H (20), ROUND_SECONDS (2),
#                                           # FACTOR (4), OUT, HOLDFAST may be set; TASK adds
#                                           # train flags (default: the default task, batch 32)
#
# Tiny Shakespeare, whose loss is still falling at the end (the default task's is ~0):
#   TASK="--data ../shared/data/tinyshakespeare.txt --preset char-small --context 64 --batch-size 8" \
#     STEPS=400 H=50 ROUND_SECONDS=4 bash bench/heterogeneous.sh 2
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}
OUT=${OUT:-bench-runs/heterogeneous-$(date +%Y%m%d-%H%M%S)}
ROUNDS=${1:-1}
[ -x "$BIN" ] || { echo "no holdfast binary at $BIN: build with cargo build --release, or set HOLDFAST" >&2; exit 2; }
mkdir -p "$OUT"

measure() { # run-dir label
  python3 - "$1" "$2" <<'PY'
import json, sys
from collections import defaultdict
run, label = sys.argv[1], sys.argv[2]
s = json.load(open(run + "/summary.json"))
ledger = [json.loads(l) for l in open(run + "/ledger.jsonl")]
tokens_per_batch = s["committed_tokens"] / s["committed_batches"]
batches, seconds = defaultdict(int), defaultdict(float)
for r in ledger:
    for m in r["members"]:
        batches[m["name"]] += len(m["batches"])
        seconds[m["name"]] += m["compute_s"]
solo = {n: batches[n] * tokens_per_batch / seconds[n] for n in batches if seconds[n] > 0}
committed = s["committed_tokens"] / s["training_s"]
per_round = [len(m["batches"]) for r in ledger for m in r["members"] if m["name"] == "worker-3"]
print(json.dumps({
    "run": label, "rounds": s["rounds"], "training_s": round(s["training_s"], 2),
    "committed_tok_s": round(committed), "solo_sum_tok_s": round(sum(solo.values())),
    "efficiency": round(committed / sum(solo.values()), 3),
    "solo_tok_s": {n: round(v) for n, v in sorted(solo.items())},
    "worker3_batches_per_round": round(sum(per_round) / max(len(per_round), 1), 1),
    "median_sync_s": s["median_sync_s"], "val_loss": round(s["eval"]["val_loss"], 4),
    "slow_workers": s["slow_workers"],
}))
PY
}

# shellcheck disable=SC2206
task=(${TASK:---batch-size 32})
common=(--workers 4 --steps "${STEPS:-1500}" --seed 7 --no-progress "${task[@]}")
fixed=(--inner-steps "${H:-20}")
timed=(--round-seconds "${ROUND_SECONDS:-2}")
slow=(--chaos "slow:worker=3,factor=${FACTOR:-4}")
for i in $(seq "$ROUNDS"); do
  for variant in fixed-equal fixed-slow timed-equal timed-slow; do
    args=("${common[@]}")
    case $variant in
      fixed-*) args+=("${fixed[@]}") ;;
      timed-*) args+=("${timed[@]}") ;;
    esac
    [[ $variant == *-slow ]] && args+=("${slow[@]}")
    dir="$OUT/$variant-$i"
    "$BIN" train "${args[@]}" --run-dir "$dir" > "$dir.log" 2>&1
    measure "$dir" "$variant"
  done
done
