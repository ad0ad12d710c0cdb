#!/usr/bin/env bash
# Builds and packages everything scripts/gpu-check.sh needs, for a GPU machine without Rust or
# network: stripped x86-64 release binaries (tern; the golden, GGUF and CUDA test binaries; the
# library's unit tests with the NVRTC compile check), the fixtures, and gpu-check.sh itself.
#
#   scripts/gpu-bundle.sh [OUT_DIR]        (default: target/gpu-bundle; must stay under 64 MiB)
#
# Then copy OUT_DIR to the GPU machine and run `OUT_DIR/gpu-check.sh` there. The binaries need a
# glibc at least as new as this machine's (gpu-check.sh prints both versions).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle}"
rm -rf "$out"
mkdir -p "$out/bin" "$out/tests"

cargo build --release --bin tern
# Test binaries: cargo prints each one's path as JSON; keep the library unit tests (tern-*),
# golden, gguf and cuda (the test binaries that run on CUDA).
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        if (kind == "lib" and name == "tern") or name in ("golden", "gguf", "cuda"):
            print(("unit" if kind == "lib" else name) + " " + m["executable"])
' | while read -r name path; do
    cp "$path" "$out/tests/$name"
done
cp target/release/tern "$out/bin/tern"
strip "$out/bin/tern" "$out/tests/"*
cp -r tests/fixtures "$out/fixtures"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
ls -la "$out/bin" "$out/tests"
size=$(du -sm "$out" | cut -f1)
echo "bundle: $out (${size} MiB)"
[ "$size" -lt 64 ] || { echo "bundle is over 64 MiB" >&2; exit 1; }
