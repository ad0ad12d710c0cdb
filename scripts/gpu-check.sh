#!/usr/bin/env bash
# The whole GPU check of tern's CUDA backend, on a machine with an NVIDIA GPU, its driver, Python and
# PyTorch, but no Rust and no network. Run it inside the bundle that scripts/gpu-bundle.sh builds
# (bin/tern, tests/{unit,cuda,golden,gguf}, fixtures/, this script):
#
#   ./gpu-check.sh [BENCH_REPETITIONS]        (default 5; results also under ./gpu-check-results/)
#
# Steps: machine facts (glibc, driver, GPU) → find NVRTC → kernel compile test (NVRTC) → CUDA op
# tests (bit-exact ternary products, attention, argmax) → golden fixtures (Hugging Face and GGUF) on
# every backend the binaries have (CPU, CUDA, and wgpu when built in) → `tern bench --shape 2b4t
# --backend cuda` → a PyTorch bf16 baseline of the same weight shapes → per-kernel bandwidth with
# Nsight Compute if `ncu` exists → a summary table, printed last.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
res="$here/gpu-check-results"
mkdir -p "$res"
reps="${1:-5}"
export TERN_FIXTURES="$here/fixtures"
export TERN_CUDA_CACHE="$res/ptx-cache"
export TERN_REQUIRE_NVRTC=1
: > "$res/status.txt"
status() { echo "$1|$2" >> "$res/status.txt"; echo ">> $1: $2"; }
section() { printf '\n===== %s\n' "$*"; }

section "machine"
uname -srm
ldd --version 2>&1 | head -1
need=$(python3 - "$here/bin/tern" "$here"/tests/* <<'PY'
import re, sys
best = (0,)
for path in sys.argv[1:]:
    for v in re.findall(rb"GLIBC_([0-9]+(?:\.[0-9]+)+)", open(path, "rb").read()):
        best = max(best, tuple(int(x) for x in v.split(b".")))
print(".".join(map(str, best)))
PY
)
have=$(ldd --version 2>&1 | head -1 | grep -oE '[0-9]+\.[0-9]+$')
echo "binaries need glibc >= $need; this machine has $have"
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
    status glibc "FAIL: the binaries need glibc $need (build the bundle on an older distribution)"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader ||
    status driver "FAIL: nvidia-smi does not run"
nvidia-smi | grep -o 'CUDA Version: [0-9.]*' || true
python3 -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' ||
    echo "no PyTorch: the bf16 baseline will be skipped"

section "NVRTC"
# tern loads libnvrtc dynamically by the names libnvrtc.so and libnvrtc.so.12 (cudarc's candidates).
# Take TERN_NVRTC_DIR, then LD_LIBRARY_PATH, then the toolkit's (it matches the driver), then
# PyTorch's wheel; link whatever is found as
# $res/lib/libnvrtc.so so another major version is found too.
nvrtc=""
for dir in ${TERN_NVRTC_DIR:-} ${LD_LIBRARY_PATH//:/ } /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(ls -d /usr/local/cuda-*/lib64 2>/dev/null | sort -rV) \
    $(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null) \
    $(ldconfig -p 2>/dev/null | grep -o '/.*libnvrtc\.so[.0-9]*$' | xargs -r -n1 dirname | sort -u); do
    f=$(ls "$dir"/libnvrtc.so* 2>/dev/null | grep -v builtins | sort -V | tail -1)
    if [ -n "$f" ]; then nvrtc="$f"; break; fi
done
if [ -z "$nvrtc" ]; then
    status nvrtc "FAIL: no libnvrtc.so found (set TERN_NVRTC_DIR)"
else
    mkdir -p "$res/lib"
    ln -sf "$nvrtc" "$res/lib/libnvrtc.so"
    export LD_LIBRARY_PATH="$res/lib:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "using $nvrtc"
fi

# Runs test binary $1 (its log and status under the label $2); PASS only if it passes and did not
# skip the CUDA backend.
run_tests() {
    local bin=$1 name=$2
    section "tests: $name"
    "$here/tests/$bin" --test-threads=1 --nocapture 2>&1 | tee "$res/$name.log" | grep -vE '^test .* ok$'
    local rc=${PIPESTATUS[0]}
    local passed
    passed=$(grep -oE 'test result: .*' "$res/$name.log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        status "$name" "FAIL ($passed)"
    elif grep -qi 'skipped: ' "$res/$name.log"; then
        status "$name" "SKIPPED CUDA: $(grep -ioE 'skipped: .*' "$res/$name.log" | head -1)"
    else
        status "$name" "PASS ($passed)"
    fi
}
run_tests unit unit
run_tests cuda cuda
# The dp4a GEMM (GPUs before compute capability 8.0) on this GPU too.
TERN_CUDA_MMA=0 run_tests cuda cuda-dp4a-gemm
# The golden fixtures decode through the engine: with CUDA graphs (the default) and without, so a
# graph problem and a kernel problem tell themselves apart.
run_tests golden golden
TERN_CUDA_GRAPHS=0 run_tests golden golden-no-graphs
run_tests gguf gguf
if grep -q 'wgpu' "$res/golden.log"; then
    status wgpu "$(grep -i 'wgpu' "$res/golden.log" | head -1)"
else
    status wgpu "not in this build (the golden tests list no wgpu backend)"
fi

section "tern bench --shape 2b4t --backend cuda"
"$here/bin/tern" bench --shape 2b4t --backend cuda -p 512 -n 128 -r "$reps" --format json \
    > "$res/bench.json" 2> "$res/bench.log"
if [ $? -eq 0 ]; then status bench PASS; else status bench "FAIL: $(tail -1 "$res/bench.log")"; fi
cat "$res/bench.json"
TERN_CUDA_GRAPHS=0 "$here/bin/tern" bench --shape 2b4t --backend cuda -p 0 -n 128 -r "$reps" \
    --format json > "$res/bench-no-graphs.json" 2>> "$res/bench.log" ||
    status bench-no-graphs "FAIL: $(tail -1 "$res/bench.log")"
cat "$res/bench-no-graphs.json"

section "PyTorch bf16 baseline (2B-4T weight shapes, CUDA graph, CUDA events)"
python3 - "$res/torch.json" <<'PY' || status torch "FAIL"
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

section "per-kernel bandwidth (Nsight Compute)"
if command -v ncu >/dev/null 2>&1; then
    # About one decode step (~18 launches per layer) after four warm steps: time and DRAM bytes per launch.
    timeout 900 ncu --csv --launch-skip 2200 --launch-count 560 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        "$here/bin/tern" bench --shape 2b4t --backend cuda -p 0 -n 16 -r 1 --format json \
        > "$res/ncu.csv" 2> "$res/ncu.log" && status ncu PASS || status ncu "FAIL: see ncu.log"
else
    status ncu "skipped: ncu not installed"
fi

section "summary"
python3 - "$res" <<'PY'
import csv, json, os, sys
from collections import defaultdict
res = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(res, name)))
    except (OSError, ValueError):
        return None
bench, torch_ = load("bench.json") or [], load("torch.json") or {}
copy = torch_.get("copy_gb_s")
kernels = defaultdict(lambda: [0, 0.0, 0.0])  # launches, seconds, bytes
ncu = os.path.join(res, "ncu.csv")
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
print("| check | result |\n|---|---|")
for line in open(os.path.join(res, "status.txt")):
    name, result = line.rstrip("\n").split("|", 1)
    print(f"| {name} | {result} |")
print("\n| measure | tern cuda | torch bf16 | tern / torch |\n|---|---:|---:|---:|")
row = lambda t: next((r for r in bench if r["test"] == t), None)
tg, pp = row("tg128"), row("pp512")
def line(name, ours, theirs, fmt="{:.0f}"):
    ratio = f"{ours / theirs:.2f}x" if ours and theirs else ""
    f = lambda v: fmt.format(v) if v else "n/a"
    print(f"| {name} | {f(ours)} | {f(theirs)} | {ratio} |")
line("decode tok/s (tg128)", tg and tg["tok_s"], torch_.get("decode_tok_s"))
eager = next(iter(load("bench-no-graphs.json") or []), None)
line("decode tok/s without CUDA graphs", eager and eager["tok_s"], torch_.get("decode_tok_s"))
line("decode weight GB/s", tg and tg["gb_s"], torch_.get("decode_gb_s"))
line("prefill tok/s (pp512)", pp and pp["tok_s"], torch_.get("prefill_tok_s"))
if tg and copy:
    floor = tg["bytes_per_token"] / (copy * 1e9)
    print(f"\nroofline (device copy {copy:.0f} GB/s): {tg['bytes_per_token'] / 1e6:.0f} MB/token -> "
          f"{1 / floor:.0f} tok/s at most; tern reaches {100 * tg['tok_s'] * floor:.0f} %")
if kernels:
    print("\n| kernel | launches | µs/launch | GB/s | % of copy bandwidth |\n|---|---:|---:|---:|---:|")
    for name, (n, secs, nbytes) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        gbs = nbytes / secs / 1e9 if secs else 0
        pct = f"{100 * gbs / copy:.0f}" if copy else ""
        print(f"| {name} | {n} | {1e6 * secs / max(n, 1):.1f} | {gbs:.0f} | {pct} |")
PY
