#!/usr/bin/env bash
# Runs the CUDA test binaries and benches built beforehand by
# scripts/build-gpu-binaries.sh (this machine needs no Rust toolchain) and
# writes a report: the devices and the demo, every shipped kernel against
# the CPU, 100 sequential doubles with their p50, 8 concurrent callers x
# 100k requests, shutdown with requests in flight, a hung kernel, and the
# criterion figures beside their peers; then the wgpu tests and bench on the
# NVIDIA driver's Vulkan adapter.
#
# The GPU machine may lack the Vulkan loader: scripts/fetch-gl-loaders.sh,
# run once on the build machine, downloads it into .gl/, and this script
# unpacks it (carry .gl to the GPU machine).
#
#   scripts/gpu-check.sh [binaries-dir] [report-file]
#
# Defaults: target/gpu and target/gpu-report.md. GRANARY_GPU_CHECK_BENCH=0
# skips the benches; GRANARY_GPU_CHECK_BENCHES names which to run (default
# all four). Exits non-zero if a test failed; where no GPU is present the
# tests report "ignored" with the reason, and the report says so.
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/gpu}"
report="${2:-target/gpu-report.md}"
mkdir -p "$(dirname "$report")"
# NVRTC and the driver: CUDA's own lib64, then whatever the caller set.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
# The Vulkan loader, where it was carried (scripts/fetch-gl-loaders.sh)
# and none is installed: unpacked into .gl/root (no root needed) and put on
# the library path. Then the NVIDIA driver's Vulkan manifest, for loaders
# that find none (both variables: older loaders read the second).
if [ -d .gl ] && ! grep -q 'libvulkan\.so\.1' < <(ldconfig -p 2>/dev/null); then
    mkdir -p .gl/root
    for deb in .gl/*.deb; do dpkg-deb -x "$deb" .gl/root; done
    export LD_LIBRARY_PATH="$PWD/.gl/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
[ -d /usr/local/nvidia/lib64 ] && export LD_LIBRARY_PATH="/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$nvidia_icd" ]; then
    export VK_DRIVER_FILES="$nvidia_icd" VK_ICD_FILENAMES="$nvidia_icd"
fi
status=0
{
    echo "# Granary GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: ${GRANARY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    if command -v nvidia-smi >/dev/null; then
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | paste -sd ';')"
    else
        echo "- GPU: none (nvidia-smi not found)"
    fi
    echo "- host: $(nproc) cores, $(uname -r)"
    echo
} >"$report"

run_test() {
    local name="$1"
    echo "## test: $name" >>"$report"
    echo '```text' >>"$report"
    if [ -x "$bin/test-$name" ]; then
        timeout "${GRANARY_TEST_TIMEOUT:-180}" "$bin/test-$name" --nocapture >>"$report" 2>&1 || status=1
    else
        echo "missing: $bin/test-$name (run scripts/build-gpu-binaries.sh)" >>"$report"
        status=1
    fi
    echo '```' >>"$report"
    echo >>"$report"
}

run_bench() {
    local name="$1"
    echo "## bench: $name" >>"$report"
    echo '```text' >>"$report"
    if [ -x "$bin/bench-$name" ]; then
        # criterion's own summary lines: the name, then time and throughput.
        timeout "${GRANARY_BENCH_TIMEOUT:-300}" "$bin/bench-$name" --bench --noplot 2>&1 |
            grep -E '^[A-Za-z0-9_]+/|time:|thrpt:|SKIPPED' >>"$report" || status=1
    else
        echo "missing: $bin/bench-$name" >>"$report"
        status=1
    fi
    echo '```' >>"$report"
    echo >>"$report"
}

echo "## granary devices, and the demo" >>"$report"
echo '```text' >>"$report"
if [ -x "$bin/granary" ]; then
    "$bin/granary" devices >>"$report" 2>&1 || status=1
    timeout "${GRANARY_TEST_TIMEOUT:-180}" "$bin/granary" demo --no-progress \
        --requests "${GRANARY_DEMO_REQUESTS:-50000}" >>"$report" 2>&1 || status=1
else
    echo "missing: $bin/granary" >>"$report"
    status=1
fi
echo '```' >>"$report"
echo >>"$report"

# Three silo processes sharing the GPU, each lent its own share of its
# memory: ledgers placed by free memory, one silo killed, state checked.
echo "## granary demo --nodes 3 --backend cuda" >>"$report"
echo '```text' >>"$report"
if [ -x "$bin/granary" ]; then
    timeout "${GRANARY_TEST_TIMEOUT:-180}" "$bin/granary" demo --no-progress --nodes 3 \
        --backend cuda >>"$report" 2>&1 || status=1
fi
echo '```' >>"$report"
echo >>"$report"

run_test cuda_nvrtc
run_test cuda
run_test bridge_cuda
# wgpu on the NVIDIA driver's Vulkan adapter: a missing adapter fails here,
# and so does a first wgpu adapter that is not NVIDIA's (the tests and the
# bench use device 0).
export GRANARY_REQUIRE_WGPU=1
echo "## the wgpu adapter" >>"$report"
if grep -A1 "Wgpu#0" "$report" | grep -i nvidia >/dev/null; then
    grep -A2 "Wgpu#0" "$report" | sed 's/^/    /' >>"$report"
else
    echo "FAILED: wgpu's first adapter is not NVIDIA's (see granary devices above)" >>"$report"
    status=1
fi
echo >>"$report"
run_test wgpu
run_test shipped
run_test bridge_wgpu
if [ "${GRANARY_GPU_CHECK_BENCH:-1}" = 1 ]; then
    for bench in ${GRANARY_GPU_CHECK_BENCHES:-cuda bridge_cuda resident wgpu}; do
        run_bench "$bench"
    done
fi
echo "report: $report"
cat "$report"
exit $status
