#!/usr/bin/env bash
# The CUDA (and wgpu-on-the-GPU) checks on a machine with one NVIDIA GPU and
# no Rust toolchain, in under 8 minutes, writing one log.
#
# Prepare on any x86-64 Linux machine with the toolchain, in the checkout:
#     cargo xtask gpu-build                  # -> target/gpu-bundle (< 60 MB)
# then, on the GPU machine, from the root of a checkout of the same commit
# (it reads tests/fixtures):
#     bash tools/gpu/cuda-check.sh [BUNDLE]  # BUNDLE defaults to target/gpu-bundle
#
# Needs the NVIDIA driver, and libnvrtc + libcublas: from the system (CUDA
# toolkit, ldconfig), from EMU_CUDA_LIB_DIRS, or found below under /usr,
# /opt and Python site-packages (the nvidia-* pip wheels, e.g. those that
# PyTorch installs). The wgpu steps need the driver's Vulkan ICD
# (libnvidia-gl / nvidia_icd.json).
#
# Every step runs under its own time limit; a failing step is recorded and
# the script goes on. Exit code: the number of failed steps.
set -uo pipefail

BUNDLE="${1:-target/gpu-bundle}"
BUNDLE="$(cd "$BUNDLE" && pwd)" || { echo "no bundle at ${1:-target/gpu-bundle}: run cargo xtask gpu-build first"; exit 1; }
LOG="${EMU_CHECK_LOG:-$PWD/cuda-check-$(date -u +%Y%m%dT%H%M%SZ).log}"
exec > >(tee "$LOG") 2>&1
FAILED=()
T0=$(date +%s)
# Every step's limit is cut to what is left of this budget (7m50s in all).
DEADLINE=$((T0 + 470))

step() { # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - $(date +%s)))
    echo
    if [ "$left" -lt 5 ]; then
        echo "=== $name: SKIPPED, out of time"
        FAILED+=("$name (skipped: out of time)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s)"
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
    [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}

echo "cuda-check: $(date -u), bundle $BUNDLE, log $LOG"
cat "$BUNDLE/MANIFEST.txt" 2>/dev/null
nvidia-smi || echo "nvidia-smi failed: no driver?"

# The test binaries find tests/fixtures through the workspace path they were
# built in: point that path at this checkout.
BUILD_ROOT="$(cat "$BUNDLE/build-root.txt" 2>/dev/null)"
if [ -n "$BUILD_ROOT" ] && [ ! -e "$BUILD_ROOT/tests/fixtures" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -sfn "$PWD" "$BUILD_ROOT" \
        && echo "linked $BUILD_ROOT -> $PWD" || echo "note: cannot link $BUILD_ROOT; fixture tests will fail"
fi

# CUDA libraries not on the linker's path: hand their folders to the backend.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\|libnvrtc\.so'; then
    DIRS="$(timeout 60 find /usr /opt /root /home -xdev \( -name 'libnvrtc.so.1[23]' -o -name 'libcublas.so.1[23]' \) 2>/dev/null \
        | xargs -r -n1 dirname | sort -u | paste -sd: -)"
    export EMU_CUDA_LIB_DIRS="${EMU_CUDA_LIB_DIRS:+$EMU_CUDA_LIB_DIRS:}$DIRS"
fi
echo "EMU_CUDA_LIB_DIRS=${EMU_CUDA_LIB_DIRS:-}"

X="$BUNDLE/bin/xtask"
T="$BUNDLE/tests"
export RUST_BACKTRACE=1

step "cuda startup"                20 "$T/emu-backend-cuda-startup" --nocapture
step "cuda conformance (xtask)"    60 "$X" test --backend cuda
step "cuda rounding + KV writes"   20 "$T/emu-backend-cuda-ops" --test-threads 1 device_rounding slice_set
step "cuda fused attention"        30 "$T/emu-backend-cuda-attention" --test-threads 1
step "cuda GEMM layouts + conv"    30 "$T/emu-backend-cuda-matmul" --test-threads 1
step "cuda components vs fixtures" 45 "$T/emu-backend-cuda-components" --test-threads 1 --nocapture
step "cuda quantized linear"       20 "$T/emu-backend-cuda-quant" --test-threads 1
step "cuda bench (mid size, bf16)" 120 "$X" bench --backends cpu,cuda --dtype bf16 --quant q8_0,q4_k --threads "$(nproc)"

# wgpu on the same GPU through the NVIDIA Vulkan driver.
export WGPU_BACKEND=vulkan
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then XDG_RUNTIME_DIR="$(mktemp -d)"; chmod 700 "$XDG_RUNTIME_DIR"; export XDG_RUNTIME_DIR; fi
step "wgpu conformance (xtask)"    60 "$X" test --backend wgpu
step "wgpu components vs fixtures" 45 "$T/emu-backend-wgpu-components" --test-threads 1 --nocapture
step "wgpu bench (mid size, f32)"  60 "$X" bench --backends cpu,wgpu --component ops,llm --dtype f32 --threads "$(nproc)"

echo
echo "cuda-check: finished in $(( $(date +%s) - T0 ))s; ${#FAILED[@]} failed step(s)"
for f in "${FAILED[@]}"; do echo "  FAILED: $f"; done
echo "log: $LOG"
exit "${#FAILED[@]}"
