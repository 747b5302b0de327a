#!/usr/bin/env bash
# Standby coordinators across hosts, on one machine: 3 etcd members, 2 coordinators and 3
# workers, each in a network namespace of its own, routed through a hub namespace, so every
# byte between two processes crosses network stacks and no two processes share loopback. One
# fault per run, once AFTER (default 3) rounds are committed:
#
#   bash bench/hosts.sh run DIR FAULT [TRAIN ARGS...]    # one run; prints one JSON line
#   HOSTS_PREFIX=P bash bench/hosts.sh clean              # remove what a run named P left
#
# FAULT: kill-leader (SIGKILL the leading coordinator), kill-etcd-leader (SIGKILL the etcd
# member that leads the etcd cluster), cut-leader (drop every packet between the leading
# coordinator and the etcd members, iptables in its namespace; its workers still reach it),
# cut-worker (drop every packet of worker host 8 for CUT_FOR seconds, default 5, then heal;
# its etcd lease lapses meanwhile), none. The line says when the fault came, when the
# standby led and when the next round was committed (seconds after the fault), how each
# coordinator exited, whether the ledger holds every round once, whether the replicas' state
# hashes agreed on every round and how many started the last one, which workers were put out
# of a round and why; after cut-worker, why worker 8 was put out and whether it rejoined. Exits 3 (and says why) where namespaces
# cannot be made. Needs root, ip, iptables, curl, python3, etcd and a holdfast built with
# --features etcd (HOLDFAST).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${HOLDFAST:-${CARGO_TARGET_DIR:-target}/release/holdfast}")
AFTER=${AFTER:-3}
PREFIX=${HOSTS_PREFIX:-hfh$$}
ETCD_HOSTS=(1 2 3) COORDINATOR_HOSTS=(4 5) WORKER_HOSTS=(6 7 8)
ip_of() { echo "10.78.$1.2"; }
ns() { echo "$PREFIX-$1"; }
ENDPOINTS=$(for k in "${ETCD_HOSTS[@]}"; do printf '%s:2379,' "$(ip_of "$k")"; done)
ENDPOINTS=${ENDPOINTS%,}

check() {
  [ "$(id -u)" = 0 ] || { echo "skipped: needs root for network namespaces"; exit 3; }
  for tool in ip iptables curl python3 etcd; do
    command -v "$tool" > /dev/null || { echo "skipped: needs $tool"; exit 3; }
  done
  local probe="hfhprobe$$"
  ip netns add "$probe" 2> /dev/null || { echo "skipped: cannot create a network namespace"; exit 3; }
  ip netns del "$probe"
}

cleanup() {
  local n
  for n in $(ip netns list 2> /dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
    ip netns pids "$n" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
  done
  sleep 0.2
  for n in $(ip netns list 2> /dev/null | awk '{print $1}' | grep "^$PREFIX-"); do
    ip netns del "$n" 2> /dev/null || true
  done
}

# Host k: a namespace linked to the hub (10.78.k.1 on the hub's side, 10.78.k.2 on the host's).
link_host() {
  local k=$1 host
  host=$(ns "h$k")
  ip netns add "$host"
  ip link add "hub$k" netns "$(ns hub)" type veth peer name eth0 netns "$host"
  ip -n "$(ns hub)" addr add "10.78.$k.1/24" dev "hub$k"
  ip -n "$host" addr add "$(ip_of "$k")/24" dev eth0
  ip -n "$(ns hub)" link set "hub$k" up
  ip -n "$host" link set eth0 up
  ip -n "$host" link set lo up
  ip -n "$host" route add default via "10.78.$k.1"
}

in_host() { # k command...
  local k=$1
  shift
  ip netns exec "$(ns "h$k")" "$@"
}

start_etcd() { # dir
  local k cluster=""
  for k in "${ETCD_HOSTS[@]}"; do cluster+="e$k=http://$(ip_of "$k"):2380,"; done
  for k in "${ETCD_HOSTS[@]}"; do
    in_host "$k" etcd --name "e$k" --data-dir "$1/etcd-$k" \
      --listen-peer-urls "http://$(ip_of "$k"):2380" --initial-advertise-peer-urls "http://$(ip_of "$k"):2380" \
      --listen-client-urls "http://$(ip_of "$k"):2379" --advertise-client-urls "http://$(ip_of "$k"):2379" \
      --initial-cluster "${cluster%,}" --initial-cluster-state new > "$1/logs/etcd-$k.log" 2>&1 &
  done
  for _ in $(seq 100); do
    in_host 4 curl -sf -m 1 "http://$(ip_of 1):2379/health" 2> /dev/null | grep -q true && return 0
    sleep 0.2
  done
  echo "etcd did not become healthy" >&2
  return 1
}

# The etcd host whose member leads the etcd cluster.
etcd_leader() {
  local k status
  for k in "${ETCD_HOSTS[@]}"; do
    status=$(in_host 4 curl -sf -m 1 -X POST "http://$(ip_of "$k"):2379/v3/maintenance/status" -d '{}' || true)
    python3 -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if s["leader"]==s["header"]["member_id"] else 1)' \
      "$status" 2> /dev/null && { echo "$k"; return 0; }
  done
  return 1
}

now() { date +%s.%N; }
rounds() { python3 -c 'import sys; print(sum(1 for l in open(sys.argv[1]) if "\"members\"" in l))' "$1/ledger.jsonl" 2> /dev/null || echo 0; }
wait_for() { # seconds command...: true once the command succeeds
  local until=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$until" ] || return 1
    sleep 0.01
  done
}
printed() { grep -q "$2" "$1" 2> /dev/null; }
more_rounds() { [ "$(rounds "$1")" -gt "$2" ]; }

cut_from_etcd() { # k
  local e
  for e in "${ETCD_HOSTS[@]}"; do
    in_host "$1" iptables -A OUTPUT -d "$(ip_of "$e")" -j DROP
    in_host "$1" iptables -A INPUT -s "$(ip_of "$e")" -j DROP
  done
}

cut_worker() { # k seconds: every packet of host k dropped for that long, then healed
  in_host "$1" iptables -A INPUT ! -i lo -j DROP
  in_host "$1" iptables -A OUTPUT ! -o lo -j DROP
  sleep "$2"
  in_host "$1" iptables -F
}

run() { # dir fault train-args...
  local dir=$1 fault=$2 k
  shift 2
  case "$fault" in kill-leader | kill-etcd-leader | cut-leader | cut-worker | none) ;; *)
    echo "FAULT $fault: expected kill-leader, kill-etcd-leader, cut-leader, cut-worker or none" >&2
    return 2
    ;;
  esac
  check
  trap cleanup EXIT
  trap 'exit 143' INT TERM
  mkdir -p "$dir/logs"
  dir=$(realpath "$dir")
  ip netns add "$(ns hub)"
  ip -n "$(ns hub)" link set lo up
  ip netns exec "$(ns hub)" sysctl -qw net.ipv4.ip_forward=1
  for k in "${ETCD_HOSTS[@]}" "${COORDINATOR_HOSTS[@]}" "${WORKER_HOSTS[@]}"; do link_host "$k"; done
  start_etcd "$dir"
  "$BIN" secret > "$dir/secret"
  local coordinator=(coordinator --etcd "$ENDPOINTS" --min-workers 3 --secret-file "$dir/secret"
    --run-dir "$dir/run" --no-progress "$@")
  # Not through in_host: `ip netns exec` becomes the process, so $! is the coordinator's pid.
  ip netns exec "$(ns h4)" "$BIN" "${coordinator[@]}" --listen "$(ip_of 4):7070" > "$dir/logs/coordinator-4.log" 2>&1 &
  local first=$!
  wait_for 60 printed "$dir/logs/coordinator-4.log" "leading run"
  ip netns exec "$(ns h5)" "$BIN" "${coordinator[@]}" --listen "$(ip_of 5):7070" > "$dir/logs/coordinator-5.log" 2>&1 &
  local second=$!
  wait_for 60 printed "$dir/logs/coordinator-5.log" "standing by"
  for k in "${WORKER_HOSTS[@]}"; do
    in_host "$k" "$BIN" worker --etcd "$ENDPOINTS" --run run --name "worker-$k" \
      --listen-ip "$(ip_of "$k")" --secret-file "$dir/secret" --cache-dir "$dir/token-cache" \
      > "$dir/logs/worker-$k.log" 2>&1 &
  done
  wait_for 120 more_rounds "$dir/run" $((AFTER - 1))
  local before at led="null" committed cutter=""
  before=$(rounds "$dir/run")
  case "$fault" in
  kill-leader) kill -9 "$first" ;;
  kill-etcd-leader) k=$(etcd_leader) && ip netns pids "$(ns "h$k")" | xargs -r kill -9 ;;
  cut-leader) cut_from_etcd 4 ;;
  cut-worker)
    cut_worker 8 "${CUT_FOR:-5}" &
    cutter=$!
    ;;
  esac
  at=$(now)
  echo "$at $fault" > "$dir/logs/fault.log"
  if [ "$fault" = kill-leader ] || [ "$fault" = cut-leader ]; then
    wait_for 30 printed "$dir/logs/coordinator-5.log" "leading run" && led=$(now)
  fi
  wait_for 60 more_rounds "$dir/run" "$before"
  committed=$(now)
  [ -z "$cutter" ] || wait "$cutter"
  local first_exit=0 second_exit=0
  if [ "$fault" = kill-leader ] || [ "$fault" = cut-leader ]; then
    wait "$second" || second_exit=$?
    wait "$first" 2> /dev/null || first_exit=$?
  else
    wait "$first" || first_exit=$?
    # The standby leads once the leader is gone, finds the run finished and exits.
    wait "$second" || second_exit=$?
  fi
  python3 - "$dir" "$fault" "$at" "$led" "$committed" "$first_exit" "$second_exit" "$before" << 'PY'
import json, sys
d, fault, at, led, committed, e1, e2, before = sys.argv[1:]
records = []  # committed rounds still standing, in ledger order
for line in open(d + "/run/ledger.jsonl"):
    r = json.loads(line)
    if "voided_rounds" in r:
        lo, hi = r["voided_rounds"]
        records = [x for x in records if not lo <= x["round"] < hi]
    elif "members" in r:
        records.append(r)
rounds = [r["round"] for r in records]
ids = [b for r in records for m in r["members"] for b in m["batches"]]
events = [json.loads(l).get("detail", {}) for l in open(d + "/run/events.jsonl")]
removed = [(i, e["name"], e["reason"]) for i, e in enumerate(events) if e.get("event") == "removed"]
cut = [i for i, name, _ in removed if name == "worker-8"]
rejoined = bool(cut) and any(e.get("event") == "joined" and e.get("name") == "worker-8" for e in events[cut[0]:])
states = {}  # the replicas' reported state hashes, by the round they start
for e in events:
    if e.get("event") == "state_reported":
        states.setdefault(e["next_round"], {})[e["name"]] = e["blake3"]
# The last round starts once every replica's state was in (the vote waits for them); who
# reports the final state before the coordinator exits is a race.
last = states.get(len(rounds) - 1, {})
print(json.dumps({
    "fault": fault, "fault_after_rounds": int(before),
    "led_after_s": None if led == "null" else round(float(led) - float(at), 3),
    "next_commit_after_s": round(float(committed) - float(at), 3),
    "first_exit": int(e1), "second_exit": int(e2),
    "rounds": len(rounds), "rounds_once": rounds == list(range(len(rounds))),
    "batches": len(ids), "batches_once": len(ids) == len(set(ids)),
    "worker_8_removed": events[cut[0]]["reason"] if cut else None, "worker_8_rejoined": rejoined,
    "removed": [f"{name}: {reason}" for _, name, reason in removed],
    "states_agree": all(len(set(h.values())) == 1 for h in states.values()),
    "last_round_replicas": len(last), "last_round_states_equal": len(set(last.values())) == 1,
}))
PY
}

case "${1:-}" in
clean) cleanup ;;
run) shift; run "$@" ;;
*) sed -n '2,20p' "$0"; exit 2 ;;
esac
