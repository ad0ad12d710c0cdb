#!/usr/bin/env bash
# The whole GPU check of tern's CUDA backend in one call, on a machine with an NVIDIA GPU, its
# driver, Python and PyTorch, but no Rust and no network. Run from the repository root, with the
# bundle that scripts/gpu-bundle.sh built:
#
#   bash scripts/gpu-check.sh [BUNDLE_DIR] [BENCH_REPETITIONS]   (defaults: target/gpu-bundle, 3)
#
# Results go to $OUT (the device tool's folder that comes back; ./gpu-check-results elsewhere), at
# most 5 files: summary.md (the table), logs.tar.gz (every step's log), bench.json,
# bench-no-graphs.json, torch.json. Every step runs under its own timeout, and the whole under
# TERN_CHECK_BUDGET seconds (default 470, inside the tool's 600 s per command with room for the
# transfers): a step that would not fit is skipped and says so. The summary table is printed from an
# exit trap, so it appears however the script ends (a failed step, a timeout, SIGTERM).
#
# Steps, most telling first: machine facts → the start-up self-test on CUDA and on wgpu (NVIDIA's
# Vulkan driver) → CUDA op tests (bit-exact products, attention, float and table ops, argmax) →
# golden fixtures on every backend → `tern bench --shape 2b4t --backend cuda` (decode and pp512)
# → PyTorch bf16 baseline → kernel compile test → dp4a GEMM op tests → goldens without CUDA graphs
# → GGUF goldens → compute-sanitizer memcheck and racecheck over the CUDA op tests → per-kernel
# bandwidth with Nsight Compute. compute-sanitizer and ncu work only on some runtimes (not gVisor):
# each is tried briefly and skipped with the reason when the device refuses it.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bundle="$(cd "${1:-$repo/target/gpu-bundle}" 2>/dev/null && pwd || echo "${1:-$repo/target/gpu-bundle}")"
reps="${2:-3}"
budget="${TERN_CHECK_BUDGET:-470}"
out="${OUT:-$repo/gpu-check-results}"
work="$(mktemp -d "${TMPDIR:-/tmp}/tern-gpu-check.XXXXXX")"
logs="$work/logs"
mkdir -p "$out" "$logs"
status_file="$work/status.txt"
: > "$status_file"
export TERN_FIXTURES="$repo/tests/fixtures"
export TERN_CUDA_CACHE="$work/kernel-cache"
export TERN_REQUIRE_NVRTC=1

status() { echo "$1|$2" >> "$status_file"; echo ">> $1: $2"; }
section() { printf '\n===== %s\n' "$*"; }

summary() {
    local rc=$?
    trap - EXIT INT TERM
    # Any failed step fails the script.
    if [ "$rc" -eq 0 ] && grep -q '|FAIL' "$status_file"; then rc=1; fi
    section "summary (exit $rc, ${SECONDS}s)"
    for f in bench.json bench-no-graphs.json torch.json; do
        [ -s "$work/$f" ] && cp "$work/$f" "$out/$f"
    done
    python3 - "$work" "$status_file" > "$out/summary.md" 2> "$logs/summary.err" <<'PY' || {
import csv, json, os, sys
from collections import defaultdict
work, status_file = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(work, name)))
    except (OSError, ValueError):
        return None
print("| check | result |\n|---|---|")
for line in open(status_file):
    name, result = line.rstrip("\n").split("|", 1)
    print(f"| {name} | {result} |")
bench, torch_ = load("bench.json") or [], load("torch.json") or {}
copy = torch_.get("copy_gb_s")
row = lambda t: next((r for r in bench if r.get("test") == t), None)
tg, pp = row("tg128"), row("pp512")
eager = next(iter(load("bench-no-graphs.json") or []), None)
print("\n| measure | tern cuda | torch bf16 | tern / torch |\n|---|---:|---:|---:|")
def line(name, ours, theirs):
    f = lambda v: f"{v:.0f}" if v else "n/a"
    ratio = f"{ours / theirs:.2f}x" if ours and theirs else ""
    print(f"| {name} | {f(ours)} | {f(theirs)} | {ratio} |")
line("decode tok/s (tg128, CUDA graphs)", tg and tg["tok_s"], torch_.get("decode_tok_s"))
line("decode tok/s without CUDA graphs", eager and eager["tok_s"], torch_.get("decode_tok_s"))
line("decode weight GB/s", tg and tg.get("gb_s"), torch_.get("decode_gb_s"))
line("prefill tok/s (pp512)", pp and pp["tok_s"], torch_.get("prefill_tok_s"))
if tg and copy and tg.get("bytes_per_token"):
    floor = tg["bytes_per_token"] / (copy * 1e9)
    print(f"\nroofline (device copy {copy:.0f} GB/s read+write): {tg['bytes_per_token'] / 1e6:.0f} MB/token"
          f" -> {1 / floor:.0f} tok/s at most; tern reaches {100 * tg['tok_s'] * floor:.0f} %")
kernels = defaultdict(lambda: [0, 0.0, 0.0])  # launches, seconds, bytes
ncu = os.path.join(work, "logs", "ncu.csv")
if os.path.exists(ncu):
    rows = [l for l in open(ncu) if l.startswith('"')]
    for r in csv.DictReader(rows):
        try:
            value = float(r["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        k, unit, metric = kernels[r["Kernel Name"].split("(")[0]], r["Metric Unit"], r["Metric Name"]
        if metric == "gpu__time_duration.sum":
            k[0] += 1
            k[1] += value * {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3}.get(unit, 1e-9)
        else:
            k[2] += value * {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(unit, 1)
if kernels:
    print("\n| kernel | launches | µs/launch | GB/s | % of copy bandwidth |\n|---|---:|---:|---:|---:|")
    for name, (n, secs, nbytes) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        gbs = nbytes / secs / 1e9 if secs else 0
        pct = f"{100 * gbs / copy:.0f}" if copy else ""
        print(f"| {name} | {n} | {1e6 * secs / max(n, 1):.1f} | {gbs:.0f} | {pct} |")
PY
        # Without Python the table is the raw status lines.
        { echo "| check | result |"; echo "|---|---|"; sed 's/^/| /; s/|/ | /2; s/$/ |/' "$status_file"; } > "$out/summary.md"
    }
    cat "$out/summary.md"
    tar -C "$work" -czf "$out/logs.tar.gz" logs status.txt 2>/dev/null
    echo "results: $out ($(ls "$out" | wc -l) files)"
    rm -rf "$work"
    exit "$rc"
}
trap summary EXIT
running=""
trap '[ -n "$running" ] && kill "$running" 2>/dev/null; status interrupted "killed by a signal at ${SECONDS}s"; exit 143' INT TERM

# Runs "$@" under a timeout of min(cap, what is left of the budget); its output goes to
# $logs/NAME.log. Returns the command's status, 124 on timeout, or 125 when the step was skipped.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((budget - SECONDS - 5))
    if [ "$left" -lt 15 ]; then
        status "$name" "SKIPPED: out of time (${SECONDS}s of the ${budget}s budget used)"
        return 125
    fi
    local limit=$((cap < left ? cap : left))
    section "$name (at most ${limit}s)"
    # In the background and waited for, so that a signal runs the trap at once (bash runs traps
    # only between commands); stdin passed on explicitly (a step may read a script from it).
    timeout -k 5 "$limit" "$@" <&0 > "$logs/$name.log" 2>&1 &
    running=$!
    wait "$running"
    local rc=$?
    running=
    tail -n 15 "$logs/$name.log"
    [ "$rc" -eq 124 ] && status "$name" "FAIL: timed out after ${limit}s"
    return "$rc"
}

# A test binary of the bundle as a step: PASS only if it passes and did not skip the GPU.
tests_step() {
    local name=$1 cap=$2 bin=$3
    shift 3
    step "$name" "$cap" "$work/tests/$bin" --test-threads=1 --nocapture "$@"
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 125 ] && return
    local result
    result=$(grep -oE 'test result: .*' "$logs/$name.log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        status "$name" "FAIL (exit $rc; ${result:-no test result})"
    elif ! echo "$result" | grep -qE 'ok\. [1-9]'; then
        status "$name" "FAIL: no test ran (${result:-no test result})"
    elif grep -qiE 'skipped: ' "$logs/$name.log"; then
        status "$name" "SKIPPED CUDA: $(grep -ioE '(cuda backend )?skipped: .*' "$logs/$name.log" | head -1)"
    else
        status "$name" "PASS ($result)"
    fi
}

section "machine"
{
    uname -srm
    ldd --version 2>&1 | head -1
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    nvidia-smi | grep -o 'CUDA Version: [0-9.]*'
    python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
    for d in /usr/local/cuda/lib64 $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
        ls "$d"/libnvrtc.so* "$d"/nvidia/cu13/lib/libnvrtc.so* "$d"/nvidia/cuda_nvrtc/lib/libnvrtc.so* 2>/dev/null
    done
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} 2>&1 | tee "$logs/machine.log"
nvidia-smi > /dev/null 2>&1 || status driver "FAIL: nvidia-smi does not run"

if [ ! -s "$bundle/bundle.tar.xz" ]; then
    status bundle "FAIL: no $bundle/bundle.tar.xz (build it with scripts/gpu-bundle.sh and carry it)"
    exit 1
fi
if ! tar -C "$work" -xJf "$bundle/bundle.tar.xz" 2>"$logs/unpack.log"; then
    # No xz binary: Python's lzma reads it too.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
        "$bundle/bundle.tar.xz" "$work" 2>>"$logs/unpack.log" ||
        { status bundle "FAIL: cannot unpack (see unpack.log)"; exit 1; }
fi
need=$(python3 - "$work/bin/tern" "$work"/tests/* <<'PY'
import re, sys
best = (0,)
for path in sys.argv[1:]:
    for v in re.findall(rb"GLIBC_([0-9]+(?:\.[0-9]+)+)", open(path, "rb").read()):
        best = max(best, tuple(int(x) for x in v.split(b".")))
print(".".join(map(str, best)))
PY
)
have=$(ldd --version 2>&1 | head -1 | grep -oE '[0-9]+\.[0-9]+$')
echo "binaries need glibc >= ${need:-?}; this machine has ${have:-?}"
if [ -n "$need" ] && [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
    status glibc "FAIL: the binaries need glibc $need, the machine has $have"
fi

# Each cap is what the step may take at most; together they exceed the budget on purpose, since
# the late steps are the ones to lose when the early ones are slow.
tests_step selftest 60 selftest
tests_step cuda 90 cuda
# The goldens on the GPU backends only (the CPU's ran in CI): TERN_TEST_BACKENDS filters
# tests/common's backend list by name prefix.
export TERN_TEST_BACKENDS=cuda,wgpu
tests_step golden 120 golden
# The f16 KV cache's kernels (rope_append_f16, attend_partial_f16) against the f32 ones.
tests_step kv_f16 60 kv_cache f16_cache
# `to FILE CMD...`: CMD's stdout to FILE, its stderr to the step's log.
to=(bash -c 'f=$1; shift; exec "$@" > "$f"' to)
# Sets a step's status from its exit code $2 (timeouts and skips have theirs already).
outcome() {
    case "$2" in
        0) status "$1" PASS ;;
        124 | 125) ;;
        *) status "$1" "FAIL (exit $2): $(tail -1 "$logs/$1.log")" ;;
    esac
}
step bench 90 "${to[@]}" "$work/bench.json" "$work/bin/tern" bench --shape 2b4t --backend cuda \
    -p 512 -n 128 -r "$reps" --format json
outcome bench $?
step torch 60 python3 - "$work/torch.json" <<'PY'
import json, sys
import torch
hidden, inter, heads, kv_heads, head_dim, layers, vocab = 2560, 6912, 20, 5, 128, 30, 128256
shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
          (hidden, heads * head_dim), (inter, hidden), (inter, hidden), (hidden, inter)]
bf16, dev = torch.bfloat16, "cuda"
torch.manual_seed(0)
weights = [[torch.randn(o, i, dtype=bf16, device=dev) for o, i in shapes] for _ in range(layers)]
head = torch.randn(vocab, hidden, dtype=bf16, device=dev)
bytes_per_token = sum(w.numel() * 2 for layer in weights for w in layer) + head.numel() * 2

def timed(fn, iters):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters  # seconds per call

def forward(xh, xi):  # every weight once, like a decode step (the matrix-vector products only)
    out = None
    for layer in weights:
        for w in layer:
            out = w @ (xi if w.shape[1] == inter else xh)
    return head @ xh, out

xh, xi = torch.randn(hidden, 1, dtype=bf16, device=dev), torch.randn(inter, 1, dtype=bf16, device=dev)
graph = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    forward(xh, xi)
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(graph):
    forward(xh, xi)
decode = timed(graph.replay, 50)
ph, pi = torch.randn(hidden, 512, dtype=bf16, device=dev), torch.randn(inter, 512, dtype=bf16, device=dev)
prefill = timed(lambda: forward(ph, pi), 5)
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
copy = timed(lambda: b.copy_(a), 20)
result = {
    "device": torch.cuda.get_device_name(),
    "bytes_per_token": bytes_per_token,
    "decode_tok_s": 1 / decode, "decode_gb_s": bytes_per_token / decode / 1e9,
    "prefill_tok_s": 512 / prefill,
    "copy_gb_s": 2 * a.numel() / copy / 1e9,
}
print(json.dumps(result, indent=1))
json.dump(result, open(sys.argv[1], "w"))
PY
outcome torch $?
tests_step unit 60 unit backend::cuda
TERN_CUDA_MMA=0 tests_step cuda-dp4a-gemm 60 cuda bitlinear
TERN_CUDA_GRAPHS=0 tests_step golden-no-graphs 90 golden
tests_step gguf 60 gguf
TERN_CUDA_GRAPHS=0 step bench-no-graphs 45 "${to[@]}" "$work/bench-no-graphs.json" \
    "$work/bin/tern" bench --shape 2b4t --backend cuda -p 0 -n 128 -r "$reps" --format json
outcome bench-no-graphs $?

# compute-sanitizer: memcheck (out-of-bounds and misaligned accesses) and racecheck (shared-memory
# races) over the self-test's and the CUDA op tests' small kernels.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
for tool in memcheck racecheck; do
    if [ -z "$sanitizer" ]; then
        status "sanitizer-$tool" "SKIPPED: compute-sanitizer not installed"
        continue
    fi
    step "sanitizer-$tool" 60 "$sanitizer" --tool "$tool" --error-exitcode 99 \
        "$work/tests/selftest" --test-threads=1
    rc=$?
    if grep -qE 'Device not supported|error 999|Unable to initialize|not supported on this' "$logs/sanitizer-$tool.log"; then
        status "sanitizer-$tool" "SKIPPED: the device refuses it ($(grep -m1 -oE 'Device not supported|error 999|Unable to initialize[^.]*|not supported on this[^.]*' "$logs/sanitizer-$tool.log"))"
    elif [ "$rc" -eq 0 ]; then
        status "sanitizer-$tool" "PASS ($(grep -m1 -oE 'ERROR SUMMARY: .*' "$logs/sanitizer-$tool.log"))"
    elif [ "$rc" -ne 124 ] && [ "$rc" -ne 125 ]; then
        status "sanitizer-$tool" "FAIL (exit $rc: $(grep -m1 -oE 'ERROR SUMMARY: .*' "$logs/sanitizer-$tool.log"))"
    fi
done

# Nsight Compute: time and DRAM bytes of about one decode step's launches after warm-up steps.
if command -v ncu > /dev/null 2>&1; then
    step ncu 75 ncu --clock-control none --csv --launch-skip 2200 --launch-count 300 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        "$work/bin/tern" bench --shape 2b4t --backend cuda -p 0 -n 16 -r 1 --format json
    rc=$?
    grep '^"' "$logs/ncu.log" > "$logs/ncu.csv" 2>/dev/null
    if grep -qE 'LibraryNotLoaded|ERR_NVGPUCTRPERM|Failed to initialize the profiler' "$logs/ncu.log"; then
        status ncu "SKIPPED: no hardware counters here ($(grep -m1 -oE 'LibraryNotLoaded|ERR_NVGPUCTRPERM|Failed to initialize the profiler' "$logs/ncu.log"))"
    else
        outcome ncu "$rc"
    fi
else
    status ncu "SKIPPED: ncu not installed"
fi
