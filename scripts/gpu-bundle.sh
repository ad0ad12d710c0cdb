#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust and no network: stripped
# x86-64 release binaries (tern; the library's unit tests with the NVRTC compile check; the golden,
# GGUF, CUDA op, KV-cache and self-test binaries), packed into one xz-compressed archive. The fixtures and
# gpu-check.sh itself are not copied: the working tree that travels with the bundle has them.
#
#   scripts/gpu-bundle.sh [OUT_DIR]        (default: target/gpu-bundle)
#
# The device tool carries the tracked tree plus the ignored paths named in `carry`, 64 MiB in all:
# this script fails if the tree plus the bundle is over that. Then, in one device call:
#   run(command="bash scripts/gpu-check.sh target/gpu-bundle", carry=["target/gpu-bundle"], timeout_s=540)
# The binaries need a glibc at least as new as this machine's (gpu-check.sh checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle}"
limit_mib=64
rm -rf "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out" "$stage/bin" "$stage/tests"

cargo build --release --bin tern
# Test binaries: cargo prints each one's path as JSON; keep the library unit tests (tern's lib),
# and the test binaries that run on CUDA.
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        if (kind == "lib" and name == "tern") or name in ("golden", "gguf", "cuda", "kv_cache", "selftest"):
            print(("unit" if kind == "lib" else name) + " " + m["executable"])
' | while read -r name path; do
    cp "$path" "$stage/tests/$name"
done
for t in unit golden gguf cuda kv_cache selftest; do
    [ -x "$stage/tests/$t" ] || { echo "test binary $t was not built" >&2; exit 1; }
done
cp target/release/tern "$stage/bin/tern"
strip "$stage/bin/tern" "$stage/tests/"*
tar -C "$stage" -cf - bin tests | xz -9 -T2 > "$out/bundle.tar.xz"

tree_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
bundle_bytes=$(stat -c %s "$out/bundle.tar.xz")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "bundle: $out/bundle.tar.xz ($(mib "$bundle_bytes") MiB); tracked tree $(mib "$tree_bytes") MiB;" \
    "together $(mib $((tree_bytes + bundle_bytes))) MiB of the device tool's ${limit_mib} MiB"
[ $((tree_bytes + bundle_bytes)) -lt $((limit_mib * 1048576)) ] ||
    { echo "tree plus bundle is over ${limit_mib} MiB" >&2; exit 1; }
