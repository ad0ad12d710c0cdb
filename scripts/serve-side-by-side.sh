#!/usr/bin/env bash
# tern serve against bitnet.cpp's llama-server (continuous batching, the server its
# run_inference_server.py starts) on the same GGUF file, interleaved in one sitting: each round
# starts one server, drives it with scripts/serve-load.py at 1, 4 and 16 streams, and stops it.
#
#   scripts/serve-side-by-side.sh TERN_BIN LLAMA_SERVER_BIN MODEL.gguf [THREADS] [ROUNDS]
#
# Both servers get 16 parallel sequences of CTX positions and the same thread count. tern runs once
# per KV type in KV_TYPES (default "f32 f16": its default, and the f16 cache llama-server keeps by
# default). PROMPT_WORDS and TOKENS set each request's prompt and length. The python that runs
# serve-load.py needs the `openai` package (PYTHON, default python3).
set -euo pipefail
tern=${1:?tern binary}; llama_server=${2:?llama-server binary}; model=${3:?GGUF model}
threads=${4:-2}; rounds=${5:-2}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
ctx=256 parallel=16 port=${PORT:-8093}
words=${PROMPT_WORDS:-24} tokens=${TOKENS:-128} kv_types=${KV_TYPES:-f32 f16}

wait_ready() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "server on port $port did not become ready" >&2
    return 1
}

run_one() {
    local label=$1 port=$2; shift 2
    "$@" >"/tmp/serve-side-by-side-$label.log" 2>&1 &
    local pid=$!
    if wait_ready; then
        "$python" "$here/serve-load.py" --url "http://127.0.0.1:$port" --streams 1,4,16 \
            --prompt-words "$words" --tokens "$tokens" --label "$label"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

echo "model: $model, threads $threads, $parallel parallel sequences, prompt $words words, $tokens tokens"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
echo "| server | streams | aggregate tok/s | mean TTFT (s) | max TTFT (s) |"
echo "|---|---:|---:|---:|---:|"
# Each server has its own port: connections of a server just stopped can hold its port a while.
for _ in $(seq "$rounds"); do
    p=$((port + 2))
    for kv in $kv_types; do
        run_one "tern-$kv" "$p" "$tern" serve -m "$model" -t "$threads" --ctx "$ctx" \
            --parallel "$parallel" --kv-type "$kv" --port "$p"
        p=$((p + 1))
    done
    run_one bitnet.cpp "$((port + 1))" "$llama_server" -m "$model" -t "$threads" \
        -c $((ctx * parallel)) -np "$parallel" -cb --port "$((port + 1))"
done
