#!/usr/bin/env bash
# Runs tern and the CPU peers (bitnet.cpp, llama.cpp) on the BitNet 2B-4T shape, interleaved, in
# several passes, so every figure of one pass was taken within minutes of the others.
#
#   BITNET_BENCH=.../llama-bench BITNET_MODEL=...i2_s.gguf \
#   LLAMA_BENCH=.../llama-bench  LLAMA_MODEL=...tq2_0.gguf \
#   scripts/cpu-side-by-side.sh [passes] [out-dir]
#
# The peers are built outside this repository and run on random-weight GGUF files of the same
# shape (I2_S linears + F16 head for bitnet.cpp, TQ2_0 + Q6_K for llama.cpp); tern runs
# `tern bench --shape 2b4t` (random weights, the same shape). A missing peer is skipped. Each step's
# markdown table goes to the out-dir (default target/side-by-side), one file per pass and runtime.
set -euo pipefail
passes=${1:-2}
out=${2:-target/side-by-side}
mkdir -p "$out"
tern=${TERN:-target/release/tern}
[ -x "$tern" ] || cargo build --release
reps=${REPS:-5}

step() { # name, command...
    local name=$1
    shift
    echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1 /proc/loadavg))"
    "$@" >"$out/$name.md" 2>"$out/$name.log" || { echo "   failed: see $out/$name.log"; return 0; }
    grep -E '^\|' "$out/$name.md" | tail -n +3
}

for pass in $(seq 1 "$passes"); do
    if [ -n "${BITNET_BENCH:-}" ]; then
        step "pass$pass-bitnet" "$BITNET_BENCH" -m "$BITNET_MODEL" -p 128 -n 128 -t 1,2 -r "$reps" -o md
        # bitnet.cpp (01eb415) crashes on a 512-token prompt with one thread; two threads work.
        step "pass$pass-bitnet-long" "$BITNET_BENCH" -m "$BITNET_MODEL" -p 512,2048 -n 0 -t 2 \
            -r "$reps" -o md
    fi
    step "pass$pass-tern-f16" "$tern" bench --shape 2b4t -p 128,512 -n 128 -t 1,2 -r "$reps" \
        --backend cpu --lm-head f16
    step "pass$pass-tern-long" "$tern" bench --shape 2b4t -p 2048 -n 0 -t 2 -r "$reps" \
        --backend cpu --lm-head f16
    step "pass$pass-tern-auto" "$tern" bench --shape 2b4t -p 0 -n 128 -t 1,2 -r "$reps" --backend cpu
    if [ -n "${LLAMA_BENCH:-}" ]; then
        step "pass$pass-llama" "$LLAMA_BENCH" -m "$LLAMA_MODEL" -p 128,512 -n 128 -t 1,2 -r "$reps" -o md
        step "pass$pass-llama-long" "$LLAMA_BENCH" -m "$LLAMA_MODEL" -p 2048 -n 0 -t 2 -r "$reps" \
            -o md
    fi
done
