#!/usr/bin/env bash
# Multi-worker benchmarks; prints one JSON line per run (from the run's summary.json).
#
#   bash bench/cluster.sh sync      # DDP vs DiLoCo H=50/100 on Tiny Shakespeare, 4 workers:
#                                   #   bytes sent per token and final validation loss
#   bash bench/cluster.sh goodput   # 4 workers, fault-free vs one kill per minute
#   bash bench/cluster.sh overhead  # one process vs --workers 1 on the default task, twice, interleaved
#   bash bench/cluster.sh guards    # one process with and without the guards, twice, interleaved
#   bash bench/cluster.sh sdc       # compute-corruption detection: 3 workers, 48 rounds, one
#                                   #   contribution bit flip every other round (bits 30 down to
#                                   #   23, three of each), against the same run fault-free
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
sdc)
  mode=${SYNC:-diloco}
  common=(--workers 3 --sync "$mode" --inner-steps 20 --batch-size 32 --seed 7 --no-progress)
  [ "$mode" = ddp ] && common=(--workers 3 --sync ddp --batch-size 32 --seed 7 --no-progress)
  steps=${STEPS:-960}
  spec=""
  for i in $(seq 0 23); do
    bit=$((30 - i / 3)); worker=$((i % 3)); round=$((2 * i + 1))
    spec="$spec${spec:+; }sdc:worker=$worker,at=$round,bit=$bit"
  done
  "$BIN" train "${common[@]}" --steps "$steps" --run-dir "$OUT/sdc-clean" > /dev/null
  "$BIN" train "${common[@]}" --steps "$steps" --chaos "$spec" --run-dir "$OUT/sdc-faulty" > /dev/null
  python3 - "$OUT" "$spec" <<'PY'
import json, sys
out, spec = sys.argv[1], sys.argv[2]
def caught(run):
    ev = [json.loads(l)["detail"] for l in open(f"{out}/{run}/events.jsonl")]
    return [(e["round"], e["name"]) for e in ev if e["event"] == "contribution_outlier"]
faults = []
for item in spec.split("; "):
    kv = dict(p.split("=") for p in item.split(":")[1].split(","))
    faults.append((int(kv["at"]), f"worker-{kv['worker']}", int(kv["bit"])))
hits = set(caught("sdc-faulty"))
# What each flip did to its value, from the workers' logs: "(before → after)".
import glob, re
change = {}
for log in glob.glob(f"{out}/sdc-faulty/logs/worker-*.log"):
    name = log.rsplit("/", 1)[1][:-4]
    for m in re.finditer(r"flipped bit (\d+) of value \d+ of round (\d+)'s contribution \((\S+) → (\S+)\)", open(log).read()):
        before, after = abs(float(m[3])), abs(float(m[4]))
        change[(int(m[2]), name)] = after / before if before else float("inf")
by_bit, by_size = {}, {"grew >= 2^16": [0, 0], "grew 2-256x": [0, 0], "shrank": [0, 0]}
for rnd, name, bit in faults:
    by_bit.setdefault(bit, [0, 0])
    by_bit[bit][1] += 1
    by_bit[bit][0] += (rnd, name) in hits
    f = change.get((rnd, name))
    size = None if f is None else "grew >= 2^16" if f >= 2**16 else "grew 2-256x" if f > 1 else "shrank"
    if size:
        by_size[size][1] += 1
        by_size[size][0] += (rnd, name) in hits
clean = json.load(open(f"{out}/sdc-clean/summary.json"))
faulty = json.load(open(f"{out}/sdc-faulty/summary.json"))
print(json.dumps({"run": "sdc", "injected": len(faults), "caught": sum(v[0] for v in by_bit.values()),
                  "caught_by_bit": {b: f"{v[0]}/{v[1]}" for b, v in sorted(by_bit.items(), reverse=True)},
                  "caught_by_effect": {k: f"{v[0]}/{v[1]}" for k, v in by_size.items()},
                  "flagged_not_injected": len(hits - {(r, n) for r, n, _ in faults}),
                  "false_positives_clean": len(caught("sdc-clean")), "rounds_clean": clean["rounds"],
                  "val_loss_clean": clean["eval"]["val_loss"], "val_loss_faulty": faulty["eval"]["val_loss"]}))
PY
  ;;
*)
  echo "usage: bash bench/cluster.sh sync|goodput|overhead|guards|sdc" >&2
  exit 2
  ;;
esac
