#!/usr/bin/env bash
# Coordinator failover through etcd, measured: N runs (default 10) of the default task, each led
# by one of two coordinators (`coordinator --etcd`) with 3 workers (`worker --etcd`), whose
# leader is SIGKILLed after a random 2-8 committed rounds. Per kill it prints when the standby
# led and when the next round committed (both from the kill), and checks that the run completed
# with every round in its ledger once. Then M pairs (default 3) of fault-free runs, alternating
# a plain coordinator and an etcd-led one, for the wall time etcd adds.
#
#   bash bench/failover.sh [N] [M]
#
# Needs `etcd` on the PATH (Debian: etcd-server) and a binary built with the etcd feature
# (cargo build --release --features etcd); HOLDFAST and OUT may be set, and ROUNDS how rounds
# close (default "--inner-steps 20"; e.g. "--round-seconds 0.25").
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
M=${2:-3}
BIN=$(realpath "${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}")
OUT=${OUT:-$(mktemp -d -t holdfast-failover.XXXXXX)}
# shellcheck disable=SC2206
SHAPE=(--min-workers 3 --steps 400 ${ROUNDS:---inner-steps 20} --batch-size 32 --no-progress)
export HOLDFAST_SECRET=0123456789abcdef0123456789abcdef RAYON_NUM_THREADS=1
[ -x "$BIN" ] || { echo "failover: no holdfast binary at $BIN" >&2; exit 2; }
command -v etcd > /dev/null || { echo "failover: no etcd on the PATH (apt-get install etcd-server)" >&2; exit 2; }
mkdir -p "$OUT"
cd "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2> /dev/null || true; done; }
trap cleanup EXIT

etcd --data-dir "$OUT/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  > "$OUT/etcd.log" 2>&1 &
PIDS+=($!)
EP=127.0.0.1:23790
sleep 2

now() { date +%s.%N; }
rounds() { grep -c '"members"' "$1/ledger.jsonl" 2> /dev/null || echo 0; }
# Waits (up to 120 s) until file $1 has a line matching $2.
wait_for_line() {
  for _ in $(seq 12000); do grep -q "$2" "$1" 2> /dev/null && return 0; sleep 0.01; done
  return 1
}
workers() { # run name
  local w
  for w in 0 1 2; do
    "$BIN" worker --etcd "$EP" --run "$1" --name "host-$w" > "$1-w$w.log" 2>&1 &
    PIDS+=($!)
  done
}
check_ledger() { # run dir: rounds 0, 1, 2... once each, and every batch of the budget once
  python3 - "$1" << 'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "/ledger.jsonl") if '"members"' in l]
rounds = [r["round"] for r in lines]
batches = sorted(b for r in lines for m in r["members"] for b in m["batches"])
if rounds != list(range(len(rounds))):
    sys.exit(f"ledger rounds {rounds}")
if batches != list(range(3 * 400)):
    sys.exit(f"{len(batches)} batches committed, {len(set(batches))} distinct, of 1200")
EOF
}

echo "failover: $N leader kills, runs in $OUT"
printf '%-4s %-7s %-10s %-14s %s\n' run killed led_after_s next_commit_s result
for i in $(seq 1 "$N"); do
  run="kill-$i"
  at=$((2 + RANDOM % 7))
  "$BIN" coordinator --etcd "$EP" --listen 127.0.0.1:$((7100 + 2 * i)) --run-dir "$run" "${SHAPE[@]}" > "$run-a.log" 2>&1 &
  leader=$!
  PIDS+=($leader)
  wait_for_line "$run-a.log" "leading run"
  "$BIN" coordinator --etcd "$EP" --listen 127.0.0.1:$((7101 + 2 * i)) --run-dir "$run" "${SHAPE[@]}" > "$run-b.log" 2>&1 &
  standby=$!
  PIDS+=($standby)
  wait_for_line "$run-b.log" "standing by"
  workers "$run"
  until [ "$(rounds "$run")" -ge "$at" ]; do sleep 0.005; done
  before=$(rounds "$run")
  kill -9 "$leader"
  killed=$(now)
  wait "$leader" 2> /dev/null || true
  led=""
  for _ in $(seq 3000); do
    if grep -q "leading run" "$run-b.log"; then led=$(now); break; fi
    sleep 0.01
  done
  until [ "$(rounds "$run")" -gt "$before" ]; do sleep 0.005; done
  committed=$(now)
  result=ok
  wait "$standby" || result="standby exited $?"
  [ "$result" = ok ] && { check_ledger "$run" || result="ledger"; }
  [ -n "$led" ] || { led=$committed; result="standby never printed leading"; }
  printf '%-4s %-7s %-10.2f %-14.2f %s\n' "$i" "r$before" "$(awk "BEGIN{print $led - $killed}")" \
    "$(awk "BEGIN{print $committed - $killed}")" "$result"
  sleep 1
done

echo "overhead: $M pairs of fault-free runs (training_s from summary.json)"
printf '%-5s %-10s %-10s\n' pair plain_s etcd_s
for i in $(seq 1 "$M"); do
  for mode in plain etcd; do
    run="$mode-$i"
    if [ "$mode" = plain ]; then
      "$BIN" coordinator --listen 127.0.0.1:7090 --run-dir "$run" "${SHAPE[@]}" > "$run.log" 2>&1 &
      c=$!
      PIDS+=($c)
      wait_for_line "$run.log" "listening"
      for w in 0 1 2; do
        "$BIN" worker --join 127.0.0.1:7090 --name "host-$w" > /dev/null 2>&1 &
        PIDS+=($!)
      done
    else
      "$BIN" coordinator --etcd "$EP" --listen 127.0.0.1:7091 --run-dir "$run" "${SHAPE[@]}" > "$run.log" 2>&1 &
      c=$!
      PIDS+=($c)
      workers "$run"
    fi
    wait "$c"
    sleep 1
  done
  printf '%-5s %-10.2f %-10.2f\n' "$i" \
    "$(python3 -c "import json;print(json.load(open('plain-$i/summary.json'))['training_s'])")" \
    "$(python3 -c "import json;print(json.load(open('etcd-$i/summary.json'))['training_s'])")"
done
