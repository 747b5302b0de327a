#!/usr/bin/env bash
# Multi-worker benchmarks; prints one JSON line per run (from the run's summary.json).
#
#   bash bench/cluster.sh sync      # DDP vs DiLoCo H=50/100 on Tiny Shakespeare, 4 workers:
#                                   #   bytes sent per token and final validation loss
#   bash bench/cluster.sh outer     # DiLoCo's outer step on the `sync` runs: each of VARIANTS
#                                   #   ("lr:momentum ...") at H (default 100) and PRECISION
#                                   #   (default f32); MIXING sets streaming's α (default 0);
#                                   #   EXTRA adds train flags (e.g. "--fragments 4 --overlap-steps 5")
#   bash bench/cluster.sh goodput   # 4 workers, fault-free vs one kill per minute
#   bash bench/cluster.sh overhead  # one process vs --workers 1 on the default task, twice, interleaved
#   bash bench/cluster.sh guards    # one process with and without the guards, twice, interleaved
#   bash bench/cluster.sh sdc       # compute-corruption detection: 3 workers, 48 rounds, one
#                                   #   contribution bit flip every other round (exponent bits 30
#                                   #   to 23 and mantissa bits down to 0, two each), with replay audits at 5% and 100% of
#                                   #   rounds; fault-free runs with and without audits (their cost)
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
keep = ["workers", "sync", "steps_per_round", "rounds", "wall_s", "training_s", "committed_tokens",
        "goodput_tokens_per_s", "faults", "discarded_batches", "bytes_sent_per_token",
        "compute_utilisation", "median_sync_s", "max_fault_sync_s", "final_loss"]
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
outer)
  [ -f "$DATA" ] || { echo "needs $DATA" >&2; exit 2; }
  h=${H:-100}; precision=${PRECISION:-f32}
  common=(--workers 4 --data "$DATA" --preset "${PRESET:-char-small}" --context 64 --batch-size 8
          --steps "${STEPS:-400}" --seed 1 --no-progress --sync diloco --inner-steps "$h"
          --sync-precision "$precision")
  # shellcheck disable=SC2206
  extra=(${EXTRA:-})
  for v in ${VARIANTS:-0.7:0 1.0:0 1.5:0 2.0:0 0.7:0.9}; do
    lr=${v%%:*}; momentum=${v#*:}
    mixing=${MIXING:-0}
    label="h$h-$precision-lr$lr-m$momentum-s${STEPS:-400}${EXTRA:+-$(echo "$EXTRA" | tr -d ' -')}${MIXING:+-a$mixing}"
    printf '[sync]\nouter_lr = %s\nouter_momentum = %s\nmixing = %s\n' "$lr" "$momentum" "$mixing" > "$OUT/$label.toml"
    "$BIN" train "${common[@]}" "${extra[@]}" --config "$OUT/$label.toml" --run-dir "$OUT/$label" > /dev/null
    summary "$OUT/$label" "$label"
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
  bits=(30 28 26 25 24 23 22 20 15 10 5 0)
  for i in $(seq 0 23); do
    bit=${bits[$((i / 2))]}; worker=$((i % 3)); round=$((2 * i + 1))
    spec="$spec${spec:+; }sdc:worker=$worker,at=$round,bit=$bit"
  done
  for p in 0 0.05 1; do printf '[guard]\naudit_probability = %s\n' "$p" > "$OUT/audit-$p.toml"; done
  # Clean runs without audits and with every round audited (their cost, and any false
  # verdict), then the same faults with audits at the default chance and at every round.
  for run in clean:0 clean:1 faulty:0.05 faulty:1; do
    kind=${run%%:*}; p=${run#*:}
    chaos=(); [ "$kind" = faulty ] && chaos=(--chaos "$spec")
    "$BIN" train "${common[@]}" --steps "$steps" --config "$OUT/audit-$p.toml" "${chaos[@]}" \
      --run-dir "$OUT/sdc-$kind-p$p" > /dev/null
  done
  python3 - "$OUT" "$spec" <<'PY'
import glob, json, re, sys
out, spec = sys.argv[1], sys.argv[2]
def events(run):
    return [json.loads(l)["detail"] for l in open(f"{out}/{run}/events.jsonl")]
def caught(run):
    ev = events(run)
    by_fp = {(e["round"], e["name"]) for e in ev if e["event"] == "contribution_outlier"}
    by_audit = {(e["round"], e["of"]) for e in ev if e["event"] == "audit" and e["verdict"] == "failed"}
    return by_fp, by_audit
faults = []
for item in spec.split("; "):
    kv = dict(p.split("=") for p in item.split(":")[1].split(","))
    faults.append((int(kv["at"]), f"worker-{kv['worker']}", int(kv["bit"])))
def change(run):
    # What each flip did to its value, from the workers' logs: "(before → after)".
    out_ = {}
    for log in glob.glob(f"{out}/{run}/logs/worker-*.log"):
        name = log.rsplit("/", 1)[1][:-4]
        pat = r"flipped bit (\d+) of value \d+ of round (\d+)'s contribution \((\S+) → (\S+)\)"
        for m in re.finditer(pat, open(log).read()):
            before, after = abs(float(m[3])), abs(float(m[4]))
            out_[(int(m[2]), name)] = after / before if before else float("inf")
    return out_
def size(f):
    if f is None:
        return None
    if f >= 2**16:
        return "grew >= 2^16"
    if f >= 2:
        return "grew 2-256x"
    if f > 0.5:
        return "mantissa (< 2x either way)"
    return "shrank"
for p in ["0.05", "1"]:
    run = f"sdc-faulty-p{p}"
    fp, audit = caught(run)
    ch = change(run)
    table = {}
    for rnd, name, bit in faults:
        k = size(ch.get((rnd, name)))
        row = table.setdefault(k, [0, 0, 0])
        row[0] += 1
        row[1] += (rnd, name) in fp
        row[2] += (rnd, name) in audit
    s = json.load(open(f"{out}/{run}/summary.json"))
    print(json.dumps({"run": run, "injected": len(faults),
                      "caught": len({(r, n) for r, n, _ in faults} & (fp | audit)),
                      "by_effect(injected, by fingerprint, by audit)": table,
                      "flagged_not_injected": len((fp | audit) - {(r, n) for r, n, _ in faults}),
                      "audits": sum(e["event"] == "audit" for e in events(run)),
                      "val_loss": s["eval"]["val_loss"]}))
for p in ["0", "1"]:
    run = f"sdc-clean-p{p}"
    fp, audit = caught(run)
    s = json.load(open(f"{out}/{run}/summary.json"))
    verdicts = [e["verdict"] for e in events(run) if e["event"] == "audit"]
    print(json.dumps({"run": run, "rounds": s["rounds"], "false_outliers": len(fp),
                      "audits": len(verdicts), "audits_not_passed": len([v for v in verdicts if v != "passed"]),
                      "goodput_tokens_per_s": round(s["goodput_tokens_per_s"]), "wall_s": round(s["wall_s"], 1),
                      "val_loss": s["eval"]["val_loss"]}))
PY
  ;;
*)
  echo "usage: bash bench/cluster.sh sync|goodput|overhead|guards|sdc" >&2
  exit 2
  ;;
esac
