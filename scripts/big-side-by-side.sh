#!/usr/bin/env bash
# Runs bitnet.cpp and tern side by side on the same random-weight I2_S files of bitnet.cpp's dummy
# shapes (7b, 13b, 30b, 70b, 100b), one size after the other, each runtime under /usr/bin/time -v
# for its peak resident memory.
#
#   BITNET_BENCH=.../llama-bench scripts/big-side-by-side.sh [sizes] [model-dir] [out-dir]
#
# Each file is written once by `tern convert --shape SIZE --to i2_s` (random ternary weights in
# bitnet.cpp's I2_S layout, F16 embedding and tied head, a dummy vocabulary), so both runtimes read
# the same weights; bitnet.cpp's own converter needs an F16 source that would not fit on the disk
# at these sizes. Both run pp128 and tg128 at 1 and 2 threads (`REPS` repetitions, default 1, after
# their own warm-up run; bitnet.cpp one process per test, tern one for all); tern with
# `--backend cpu`, its default head and an f16 KV cache like bitnet.cpp's. A file that does not fit
# in the memory available is still tried and what happens is recorded. Tables and logs go to the
# out-dir (default target/big-side-by-side).
set -euo pipefail
sizes=${1:-7b 13b 30b 70b}
models=${2:-target/big-models}
out=${3:-target/big-side-by-side}
mkdir -p "$models" "$out"
tern=${TERN:-target/release/tern}
[ -x "$tern" ] || cargo build --release
reps=${REPS:-1}
: "${BITNET_BENCH:?set BITNET_BENCH to the llama-bench of bitnet.cpp}"

step() { # name, command...
    local name=$1
    shift
    echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1 /proc/loadavg))"
    /usr/bin/time -v "$@" >"$out/$name.md" 2>"$out/$name.log" || echo "   failed: see $out/$name.log"
    grep -E '^\|' "$out/$name.md" | tail -n +3 || true
    grep -E 'Maximum resident|Exit status|terminated by signal' "$out/$name.log" | sed 's/^\s*/   /'
}

for size in $sizes; do
    file="$models/$size-i2_s.gguf"
    [ -f "$file" ] || "$tern" convert --shape "$size" --to i2_s -o "$file"
    # One bitnet.cpp run per test and thread count: its prompt path crashes on some shapes at one
    # thread (30b), which would otherwise lose the other figures of the run.
    for t in 1 2; do
        step "$size-bitnet-pp128-t$t" "$BITNET_BENCH" -m "$file" -p 128 -n 0 -t "$t" -r "$reps" -o md
        step "$size-bitnet-tg128-t$t" "$BITNET_BENCH" -m "$file" -p 0 -n 128 -t "$t" -r "$reps" -o md
    done
    # bitnet.cpp keeps its KV cache in f16: tern too, for the same memory per position.
    step "$size-tern" "$tern" bench -m "$file" -p 128 -n 128 -t 1,2 -r "$reps" --backend cpu \
        --kv-type f16
done
