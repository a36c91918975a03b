#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one H200, nothing downloaded):
#   1. the CUDA no-sync test(s) (test modules that call torch.cuda.set_sync_debug_mode), if present;
#   2. the deployment-latency harness at the OpenVLA-OFT and OpenVLA 7B shapes in bf16 (random weights built in
#      memory), every method interleaved with transformers' own SDPA forward;
#   3. the same harness at the OpenVLA-OFT 7B shape with each decoder layer timed apart (--layer-times: a device
#      synchronisation per layer, so its totals are not the ones of step 2): how much of each method's step is
#      its layers and how much the selection, keep-set switches and the pass's own loop;
#   4. on that machine's CPU, SDPA's fused kernel against two products at 4 and 16 threads (about 20 s): the
#      executor's CPU attention rule was measured at two threads only.
# Results go to $OUT/gpu_benchmark if OUT is set, else outputs/gpu_benchmark (JSON, markdown table, plot, logs).
# Fails at once, with the reason, when CUDA is absent. GPU_BENCHMARK_ALLOW_CPU=1 runs the same steps on the CPU at
# a tiny shape instead (to check the script itself on a machine without a GPU).
#
#   scripts/gpu_benchmark.sh                       # PYTHON=... to choose the interpreter (default .venv/bin/python)
#
# A GPU machine without MuJoCo (or without headless OpenGL) replays frames rendered elsewhere: on a machine that
# renders, write them with the same steps first and bring the file along (FRAMES, default .gpu/frames.npz):
#
#   python benchmarks/deployment_latency.py --steps 30 --warmup 3 --stride 1 --save-frames .gpu/frames.npz
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
OUT_DIR="${OUT:-outputs}/gpu_benchmark"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
started=$(date +%s)

if [ "${GPU_BENCHMARK_ALLOW_CPU:-0}" = "1" ]; then
    DEVICE=cpu
    HARNESS_ARGS=(--shape oft openvla --width 64 --layers 4 --steps 2 --warmup 1 --stride 1 --threads 2)
    LAYER_ARGS=(--shape oft --width 64 --layers 4 --steps 2 --warmup 1 --stride 1 --threads 2)
    HARNESS_TIMEOUT=1800
    KERNEL_THREADS=(2)
else
    DEVICE=cuda
    HARNESS_ARGS=(--shape oft-7b openvla-7b --dtype bfloat16 --steps 30 --warmup 3 --stride 1)
    LAYER_ARGS=(--shape oft-7b --dtype bfloat16 --steps 12 --warmup 3 --stride 1)
    HARNESS_TIMEOUT=300        # with the tests' 90 s, the layer split's 75 s and the kernel sweep's 40 s: under 9
    KERNEL_THREADS=(4 16)      # minutes in all, far less where nothing hangs
fi

# -- fail fast without CUDA -------------------------------------------------------------------------------------
"$PY" - "$DEVICE" <<'EOF' | tee "$OUT_DIR/device.txt"
import sys
import torch
device = sys.argv[1]
if device == 'cuda' and not torch.cuda.is_available():
    sys.exit(f'gpu_benchmark: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}, '
             f'{torch.cuda.device_count()} device(s) visible); this check needs an NVIDIA GPU. '
             'GPU_BENCHMARK_ALLOW_CPU=1 runs it on the CPU at a tiny shape.')
name = torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'
memory = f', {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB' if device == 'cuda' else ''
print(f'device: {name}{memory}; torch {torch.__version__} (CUDA {torch.version.cuda})')
EOF

# -- the simulator must render headless (EGL; OSMesa as a fallback) ---------------------------------------------
render_ok() {
    MUJOCO_GL="$1" timeout 60 "$PY" -c \
        "from specprune_ros.sim import TabletopEnv; TabletopEnv(image_size=224).reset()" >/dev/null 2>&1
}
export MUJOCO_GL="${MUJOCO_GL:-egl}"
FRAMES="${FRAMES:-.gpu/frames.npz}"
FRAME_ARGS=()
if render_ok "$MUJOCO_GL"; then
    echo "MuJoCo renders with MUJOCO_GL=$MUJOCO_GL"
elif render_ok osmesa; then
    export MUJOCO_GL=osmesa
    echo "MuJoCo renders with MUJOCO_GL=$MUJOCO_GL"
elif [ -f "$FRAMES" ]; then
    FRAME_ARGS=(--frames "$FRAMES")
    echo "MuJoCo cannot render here: replaying the frames in $FRAMES"
else
    echo "gpu_benchmark: MuJoCo cannot render headless (MUJOCO_GL=egl and osmesa both failed) and $FRAMES is" \
         "missing; write it on a machine that renders (see this script's header)" >&2
    exit 2
fi

# -- 1. CUDA no-sync test(s), if present -------------------------------------------------------------------------
mapfile -t SYNC_TESTS < <(grep -l "set_sync_debug_mode" test/test_*.py 2>/dev/null || true)
if [ "${#SYNC_TESTS[@]}" -gt 0 ]; then
    echo "running ${SYNC_TESTS[*]}"
    timeout 90 "$PY" -m pytest "${SYNC_TESTS[@]}" -q -rA 2>&1 | tee "$OUT_DIR/cuda_no_sync_tests.txt" || \
        echo "gpu_benchmark: the no-sync test(s) failed (see $OUT_DIR/cuda_no_sync_tests.txt); timing anyway" >&2
else
    echo "no CUDA no-sync test present (no test module calls torch.cuda.set_sync_debug_mode)" \
        | tee "$OUT_DIR/cuda_no_sync_tests.txt"
fi

# -- 2. the harness at the 7B shapes ----------------------------------------------------------------------------
timeout "$HARNESS_TIMEOUT" "$PY" benchmarks/deployment_latency.py "${HARNESS_ARGS[@]}" "${FRAME_ARGS[@]}" \
    --device "$DEVICE" --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/deployment_latency.log" || \
    echo "gpu_benchmark: the harness did not finish (see $OUT_DIR/deployment_latency.log)" >&2
# -- 3. the decoder layers timed apart at the OFT 7B shape --------------------------------------------------------
timeout 75 "$PY" benchmarks/deployment_latency.py "${LAYER_ARGS[@]}" "${FRAME_ARGS[@]}" --layer-times \
    --methods none specprune 'vla_pruner 25%' 'divprune 25%' 'random 25%' coverage_ranked --no-reference \
    --device "$DEVICE" --out "$OUT_DIR" --name deployment_latency_layers --no-plot \
    2>&1 | tee "$OUT_DIR/deployment_latency_layers.log" || \
    echo "gpu_benchmark: the layer split did not finish (see $OUT_DIR/deployment_latency_layers.log)" >&2
# -- 4. the CPU attention kernels at more threads ---------------------------------------------------------------
for threads in "${KERNEL_THREADS[@]}"; do
    timeout 20 "$PY" benchmarks/attention_kernels.py --heads 4 --head-dim 64 --tokens 64 96 144 176 192 256 \
        --rounds 3 --calls 10 --threads "$threads" 2>&1 | tee "$OUT_DIR/attention_kernels_${threads}_threads.md" || \
        echo "gpu_benchmark: the kernel sweep at $threads threads did not finish" >&2
done
echo "gpu_benchmark: done in $(( $(date +%s) - started )) s; results in $OUT_DIR"
