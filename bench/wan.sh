#!/usr/bin/env bash
# Multi-worker runs over an emulated slow link. The coordinator and every worker get a network
# namespace of their own, joined to a hub namespace by a veth pair that tc tbf shapes to RATE
# in each direction; the hub redirects every TCP connection to a relay (bench/wan/relay.py)
# that forwards each direction's bytes DELAY_MS after they arrived (this kernel has no netem).
# Every byte between two processes crosses two shaped links and the relay. Needs root, ip,
# tc and iptables.
#
#   bash bench/wan.sh run RUN_DIR WORKERS [TRAIN ARGS...]   # one run; prints its summary line
#   WAN_PREFIX=P bash bench/wan.sh clean   # kill and remove what a run named P left behind
#   bash bench/wan.sh compare     # char-small, 4 workers: DDP (short), DiLoCo f32/int8/int4/e2m1,
#                                 #   and streaming DiLoCo (P=4, τ=OVERLAP (5), α=MIXING (0), int4)
#
# RATE (tc rate, default 100mbit), DELAY_MS (one way, default 20), HOLDFAST (binary), DATA.
# PARTITION=K@AT+FOR cuts host K (worker K; 0 is the coordinator) off the network AT seconds
# after the workers start, for FOR seconds: every packet in or out of its link is dropped
# (iptables in its namespace), then the link is healed. Logged in RUN_DIR/logs/partition.log.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}")
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
RATE=${RATE:-100mbit}
DELAY_MS=${DELAY_MS:-20}
RELAY_PORT=9000

# Can this machine make the link? Prints why not and exits 3 when it cannot.
check() {
  [ "$(id -u)" = 0 ] || { echo "skipped: needs root for network namespaces"; exit 3; }
  for tool in ip tc iptables python3; do
    command -v "$tool" > /dev/null || { echo "skipped: needs $tool"; exit 3; }
  done
  local probe="hfwprobe$$"
  ip netns add "$probe" 2> /dev/null || { echo "skipped: cannot create a network namespace"; exit 3; }
  local ok=1
  ip netns exec "$probe" iptables -t nat -A PREROUTING -p tcp -j REDIRECT --to-ports 1 2> /dev/null || ok=0
  ip netns del "$probe"
  [ "$ok" = 1 ] || { echo "skipped: iptables cannot REDIRECT in a namespace here"; exit 3; }
}

# Namespace names of this invocation: hub, host 0 (the coordinator), hosts 1..N (workers).
# WAN_PREFIX names them instead, so that a caller can `clean` up after a run it had to kill.
PREFIX=${WAN_PREFIX:-hfw$$}
ns() { echo "$PREFIX-$1"; }

cleanup() {
  local pids
  jobs -p | xargs -r kill 2> /dev/null || true
  pids=$(for n in $(ip netns list 2> /dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
    ip netns pids "$n" 2> /dev/null; done)
  [ -n "$pids" ] && kill $pids 2> /dev/null || true
  sleep 0.5
  for n in $(ip netns list 2> /dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
    ip netns pids "$n" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
    ip netns del "$n" 2> /dev/null || true
  done
}

# Host k: namespace, link to the hub (10.77.k.1 hub side, 10.77.k.2 host side), shaped both ways.
link_host() {
  local k=$1 host
  host=$(ns "h$k")
  ip netns add "$host"
  ip link add "hub$k" netns "$(ns hub)" type veth peer name eth0 netns "$host"
  ip -n "$(ns hub)" addr add "10.77.$k.1/24" dev "hub$k"
  ip -n "$host" addr add "10.77.$k.2/24" dev eth0
  ip -n "$(ns hub)" link set "hub$k" up
  ip -n "$host" link set eth0 up
  ip -n "$host" link set lo up
  ip -n "$host" route add default via "10.77.$k.1"
  # The burst holds a whole offloaded segment (64 KiB); the queue at most 100 ms of traffic.
  tc -n "$host" qdisc add dev eth0 root tbf rate "$RATE" burst 128kb latency 100ms
  tc -n "$(ns hub)" qdisc add dev "hub$k" root tbf rate "$RATE" burst 128kb latency 100ms
}

setup() { # workers
  ip netns add "$(ns hub)"
  ip -n "$(ns hub)" link set lo up
  ip netns exec "$(ns hub)" sysctl -qw net.ipv4.ip_forward=1
  # Every TCP connection arriving from a host goes to the relay, which reaches the original
  # destination from the hub itself (its own connections are not redirected).
  ip netns exec "$(ns hub)" iptables -t nat -A PREROUTING -p tcp -i 'hub+' -j REDIRECT --to-ports "$RELAY_PORT"
  for k in $(seq 0 "$1"); do link_host "$k"; done
  ip netns exec "$(ns hub)" python3 bench/wan/relay.py "$RELAY_PORT" "$DELAY_MS" > /dev/null &
  # The relay is up when it accepts.
  for _ in $(seq 50); do
    ip netns exec "$(ns hub)" python3 -c "import socket; socket.create_connection(('127.0.0.1', $RELAY_PORT), 1)" \
      2> /dev/null && return 0
    sleep 0.1
  done
  echo "the relay did not start" >&2
  return 1
}

summary() { # run-dir label
  python3 - "$1" "$2" "$RATE" "$DELAY_MS" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
keep = ["workers", "sync", "steps_per_round", "rounds", "wall_s", "committed_tokens",
        "training_s", "goodput_tokens_per_s", "bytes_sent_per_token", "compute_utilisation",
        "median_sync_s"]
print(json.dumps({"run": sys.argv[2], "rate": sys.argv[3], "delay_ms": float(sys.argv[4]),
                  **{k: s[k] for k in keep}, "val_loss": s["eval"]["val_loss"]}))
PY
}

# Parses PARTITION=K@AT+FOR for a run of `workers` workers; prints "K AT FOR".
partition_spec() { # spec workers
  local k at dur
  [[ "$1" =~ ^([0-9]+)@([0-9]+(\.[0-9]+)?)\+([0-9]+(\.[0-9]+)?)$ ]] \
    || { echo "PARTITION=$1: expected K@AT+FOR (host, seconds, seconds)" >&2; return 2; }
  k=${BASH_REMATCH[1]} at=${BASH_REMATCH[2]} dur=${BASH_REMATCH[4]}
  [ "$k" -le "$2" ] || { echo "PARTITION=$1: host $k, but the run has hosts 0..$2" >&2; return 2; }
  echo "$k $at $dur"
}

# Cuts host K off for FOR seconds from AT seconds on, logging both moments to `log`.
partition() { # k at for log
  local host rules=(INPUT -i eth0 -j DROP) out=(OUTPUT -o eth0 -j DROP)
  host=$(ns "h$1")
  sleep "$2"
  ip netns exec "$host" iptables -A "${rules[@]}"
  ip netns exec "$host" iptables -A "${out[@]}"
  echo "$(date +%s.%N) cut h$1" >> "$4"
  sleep "$3"
  ip netns exec "$host" iptables -D "${rules[@]}"
  ip netns exec "$host" iptables -D "${out[@]}"
  echo "$(date +%s.%N) healed h$1" >> "$4"
}

run() { # run-dir workers train-args...
  local dir=$1 workers=$2 cut=""
  shift 2
  [ -z "${PARTITION:-}" ] || cut=$(partition_spec "$PARTITION" "$workers")
  check
  trap cleanup EXIT
  trap 'exit 143' INT TERM # exit runs the EXIT trap; a signal alone would not
  setup "$workers"
  mkdir -p "$dir/logs"
  local secret="$dir/secret"
  "$BIN" secret > "$secret"
  ip netns exec "$(ns h0)" "$BIN" coordinator --listen 10.77.0.2:7070 --min-workers "$workers" \
    --secret-file "$secret" --run-dir "$dir/run" --no-progress "$@" > "$dir/logs/coordinator.log" 2>&1 &
  local coordinator=$!
  # Through the relay a refused connection reads as a closed one, which a worker does not
  # wait out: workers start once the coordinator listens.
  until grep -q listening "$dir/logs/coordinator.log" 2> /dev/null; do
    kill -0 "$coordinator" 2> /dev/null || { cat "$dir/logs/coordinator.log" >&2; return 1; }
    sleep 0.1
  done
  for k in $(seq 1 "$workers"); do
    ip netns exec "$(ns "h$k")" "$BIN" worker --join 10.77.0.2:7070 --name "worker-$k" \
      --listen-ip "10.77.$k.2" --secret-file "$secret" --cache-dir "$dir/token-cache" \
      > "$dir/logs/worker-$k.log" 2>&1 &
  done
  # shellcheck disable=SC2086 # "K AT FOR", split on purpose
  [ -z "$cut" ] || partition $cut "$dir/logs/partition.log" >> "$dir/logs/partition.log" 2>&1 &
  if ! wait "$coordinator"; then
    echo "the coordinator failed; its log:" >&2
    tail -20 "$dir/logs/coordinator.log" >&2
    return 1
  fi
  summary "$dir/run" "$(basename "$dir")"
}

case "${1:-}" in
check) check; echo "ok: namespaces, tc tbf and iptables REDIRECT work here" ;;
clean) cleanup ;;
run) shift; run "$@" ;;
compare)
  [ -f "$DATA" ] || { echo "needs $DATA" >&2; exit 2; }
  OUT=${OUT:-bench-runs/wan-$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$OUT"
  # Replay audits off: an audited round's auditors fetch a whole state over the slow link.
  printf '[guard]\naudit_probability = 0.0\n' > "$OUT/job.toml"
  printf '[sync]\nmixing = %s\n[guard]\naudit_probability = 0.0\n' "${MIXING:-0}" > "$OUT/streaming.toml"
  common=(--data "$DATA" --preset char-small --context 64 --batch-size 8 --seed 1)
  # DDP's bytes at this rate take hours for the whole budget: a short run measures its
  # utilisation (its loss is from `bench/cluster.sh sync`, on loopback).
  bash "$0" run "$OUT/ddp" 4 "${common[@]}" --config "$OUT/job.toml" --steps "${DDP_STEPS:-20}" \
    --sync ddp
  for p in f32 int8 int4 e2m1; do
    bash "$0" run "$OUT/diloco-h100-$p" 4 "${common[@]}" --config "$OUT/job.toml" \
      --steps "${STEPS:-400}" --sync diloco --inner-steps 100 --sync-precision "$p"
  done
  bash "$0" run "$OUT/streaming-p4-int4" 4 "${common[@]}" --config "$OUT/streaming.toml" \
    --steps "${STEPS:-400}" --sync diloco --inner-steps 100 --sync-precision int4 --fragments 4 \
    --overlap-steps "${OVERLAP:-5}"
  ;;
*) sed -n '2,15p' "$0"; exit 2 ;;
esac
