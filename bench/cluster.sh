#!/usr/bin/env bash
# Multi-worker benchmarks; prints one JSON line per run (from the run's summary.json).
#
#   bash bench/cluster.sh sync      # DDP vs DiLoCo H=50/100 on Tiny Shakespeare, 4 workers:
#                                   #   bytes sent per token and final validation loss
#   bash bench/cluster.sh goodput   # 4 workers, fault-free vs one kill per minute
#   bash bench/cluster.sh overhead  # one process vs --workers 1 on the default task, twice, interleaved
#   bash bench/cluster.sh guards    # one process with and without the guards, twice, interleaved
#
# HOLDFAST (binary), DATA (corpus) and OUT (where runs go) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-bench-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

summary() { # run-dir label
  python3 - "$1" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
keep = ["workers", "sync", "steps_per_round", "rounds", "wall_s", "committed_tokens",
        "goodput_tokens_per_s", "faults", "discarded_batches", "bytes_sent_per_token",
        "median_sync_s", "max_fault_sync_s", "final_loss"]
out = {"run": sys.argv[2], **{k: s[k] for k in keep}, "val_loss": s["eval"]["val_loss"]}
print(json.dumps(out))
PY
}

case "${1:-}" in
sync)
  [ -f "$DATA" ] || { echo "needs $DATA" >&2; exit 2; }
  common=(--workers 4 --data "$DATA" --preset "${PRESET:-char-small}" --context 64 --batch-size 8
          --steps "${STEPS:-400}" --seed 1 --no-progress)
  "$BIN" train "${common[@]}" --sync ddp --run-dir "$OUT/ddp" > /dev/null
  summary "$OUT/ddp" ddp
  for h in 50 100; do
    "$BIN" train "${common[@]}" --sync diloco --inner-steps "$h" --run-dir "$OUT/diloco-h$h" > /dev/null
    summary "$OUT/diloco-h$h" "diloco-h$h"
  done
  ;;
goodput)
  common=(--workers 4 --steps "${STEPS:-4000}" --batch-size 32 --inner-steps 50 --seed 1 --no-progress)
  "$BIN" train "${common[@]}" --run-dir "$OUT/fault-free" > /dev/null
  summary "$OUT/fault-free" fault-free
  "$BIN" train "${common[@]}" --chaos "kill:every=60s" --run-dir "$OUT/kill-every-60s" > /dev/null
  summary "$OUT/kill-every-60s" kill-every-60s
  ;;
overhead)
  for rep in 1 2; do
    # No periodic evaluation in either (the workers' goodput excludes none either).
    "$BIN" train --steps 1500 --eval-every 1500 --no-progress --run-dir "$OUT/one-process-$rep" 2>/dev/null \
      | sed -n 's/^trained .* at \([0-9.]*\) tokens\/s/{"run": "one-process", "tokens_per_s": \1}/p'
    "$BIN" train --workers 1 --steps 1500 --inner-steps 50 --no-progress --run-dir "$OUT/one-worker-$rep" > /dev/null 2>&1
    summary "$OUT/one-worker-$rep" one-worker
  done
  ;;
guards)
  for rep in 1 2; do
    for g in on off; do
      flag=(); [ "$g" = off ] && flag=(--no-guards)
      "$BIN" train --steps 1500 --eval-every 1500 "${flag[@]}" --no-progress --run-dir "$OUT/guards-$g-$rep" 2>/dev/null \
        | sed -n "s/^trained .* at \([0-9.]*\) tokens\/s/{\"run\": \"guards-$g\", \"tokens_per_s\": \1}/p"
    done
  done
  ;;
*)
  echo "usage: bash bench/cluster.sh sync|goodput|overhead|guards" >&2
  exit 2
  ;;
esac
