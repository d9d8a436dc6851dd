#!/usr/bin/env bash
# Builds the CUDA and wgpu test binaries and benches in release mode and
# copies them,
# under stable names, into target/gpu/ (or $1): the GPU machine has no Rust
# toolchain, so they are built here and carried there. scripts/gpu-check.sh
# runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu}"
mkdir -p "$out"
copy() {
    # cargo's JSON messages name each executable it built.
    python3 -c '
import json, shutil, sys
out = sys.argv[1]
for line in sys.stdin:
    msg = json.loads(line)
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe:
        kind = msg["target"]["kind"][0]
        name = msg["target"]["name"]
        shutil.copy(exe, f"{out}/{kind}-{name}")
        print(f"{out}/{kind}-{name}")
' "$out"
}
cargo test --release --no-run --message-format=json -q \
    -p granary-kernels --test cuda --test cuda_nvrtc --test wgpu --test shipped \
    -p granary-gpu --test bridge_cuda --test bridge_wgpu | copy
cargo bench --no-run --message-format=json -q \
    -p granary-kernels --bench cuda --bench wgpu \
    -p granary-gpu --bench bridge_cuda --bench resident | copy
# The CLI, for `granary devices` and the demo on the GPU machine.
cargo build --release -q --bin granary
cp target/release/granary "$out/granary"
echo "$out/granary"
# Line tables are for profiling here; the carried copies need none.
strip "$out"/test-* "$out"/bench-* "$out"/granary 2>/dev/null || true
