#!/usr/bin/env bash
# One prepared GPU check (about 5 minutes on one H200, at most 9.3; nothing downloaded):
#   1. the CUDA tests (test modules with a _cuda_or_skip guard: no host synchronisation inside a step, CUDA graphs
#      against eager layers and selections, SDPA without cuDNN's attention);
#   2. the deployment-latency harness at the OpenVLA-OFT and OpenVLA 7B shapes in bf16 (random weights built in
#      memory), every method interleaved with transformers' own SDPA forward;
#   3. the same harness at the OpenVLA-OFT and OpenVLA 7B shapes with the vision backbones, decoder layers (one
#      graph per span of layers between the points a method reads or decides), the methods' selections and
#      OpenVLA's greedy decoding replayed as CUDA graphs (--cuda-graphs), with a torch.profiler summary per method
#      (--profile 2), and at the OFT shape again with one graph per layer (--graphs-per-layer: what spans save);
#   4. the harness at the OpenVLA-OFT 7B shape with each decoder layer timed apart (--layer-times: each layer's
#      span on the device): how much of each method's step is its layers and how much the selection, keep-set
#      switches and the pass's own loop;
#   5. the speed targets met or missed, read off the runs of 2 and 3 (targets.md; benchmarks/gpu_targets.py).
# Steps 2-4 time SpecPrune twice: at its defaults (on a GPU its gathers keep the previous step's counts) and with
# exact gather counts (the paper's: read back twice a step).
# Results go to $OUT/gpu_benchmark if OUT is set, else outputs/gpu_benchmark (JSON, markdown tables, plot, logs),
# and packed beside it as gpu_benchmark.tgz (one file to bring back).
# Fails at once, with the reason, when CUDA is absent. GPU_BENCHMARK_ALLOW_CPU=1 runs the same steps on the CPU at
# a tiny shape instead (to check the script itself on a machine without a GPU).
#
#   scripts/gpu_benchmark.sh                       # PYTHON=... to choose the interpreter (default .venv/bin/python)
#
# A GPU machine without MuJoCo (or without headless OpenGL) replays frames rendered elsewhere (FRAMES, default
# .gpu/frames.npz); scripts/prepare_gpu_check.sh writes them, and the project's transformers pin as a wheel, on a
# machine that renders and reaches the package registry.
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
    GRAPH_ARGS=("${HARNESS_ARGS[@]}")
    HARNESS_TIMEOUT=1800
else
    DEVICE=cuda
    HARNESS_ARGS=(--shape oft-7b openvla-7b --dtype bfloat16 --steps 30 --warmup 3 --stride 1)
    LAYER_ARGS=(--shape oft-7b --dtype bfloat16 --steps 12 --warmup 3 --stride 1)
    GRAPH_ARGS=(--shape oft-7b openvla-7b --dtype bfloat16 --steps 12 --warmup 3 --stride 1)
    HARNESS_TIMEOUT=200        # with the tests' 120 s, the graphs' 140 + 50 s and the layer split's 50 s: 9.3 minutes
fi
EXACT='specprune, exact counts=specprune:{"gather_counts": "exact"}'

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

# -- 1. the CUDA tests -------------------------------------------------------------------------------------------
mapfile -t CUDA_TESTS < <(grep -l "_cuda_or_skip" test/test_*.py 2>/dev/null || true)
echo "running ${CUDA_TESTS[*]}"
timeout 120 "$PY" -m pytest "${CUDA_TESTS[@]}" -q -rA -p no:cacheprovider 2>&1 | tee "$OUT_DIR/cuda_tests.txt" || \
    echo "gpu_benchmark: the CUDA tests failed (see $OUT_DIR/cuda_tests.txt); timing anyway" >&2

# -- 2. the harness at the 7B shapes ----------------------------------------------------------------------------
timeout "$HARNESS_TIMEOUT" "$PY" benchmarks/deployment_latency.py "${HARNESS_ARGS[@]}" "${FRAME_ARGS[@]}" \
    --extra "$EXACT" --device "$DEVICE" --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/deployment_latency.log" || \
    echo "gpu_benchmark: the harness did not finish (see $OUT_DIR/deployment_latency.log)" >&2
# -- 3. vision and decoder layers as CUDA graphs at the OFT 7B shape ----------------------------------------------
timeout 140 "$PY" benchmarks/deployment_latency.py "${GRAPH_ARGS[@]}" "${FRAME_ARGS[@]}" --cuda-graphs --profile 2 \
    --methods none specprune 'vla_pruner 25%' 'divprune 25%' 'random 25%' coverage_ranked --extra "$EXACT" \
    --no-reference --device "$DEVICE" --out "$OUT_DIR" --name deployment_latency_cuda_graphs --no-plot \
    2>&1 | tee "$OUT_DIR/deployment_latency_cuda_graphs.log" || \
    echo "gpu_benchmark: the CUDA-graph run did not finish (see $OUT_DIR/deployment_latency_cuda_graphs.log)" >&2
timeout 50 "$PY" benchmarks/deployment_latency.py "${LAYER_ARGS[@]}" "${FRAME_ARGS[@]}" --cuda-graphs --graphs-per-layer \
    --methods none specprune 'vla_pruner 25%' 'random 25%' --no-reference --device "$DEVICE" --out "$OUT_DIR" \
    --name deployment_latency_graphs_per_layer --no-plot \
    2>&1 | tee "$OUT_DIR/deployment_latency_graphs_per_layer.log" || \
    echo "gpu_benchmark: the per-layer CUDA-graph run did not finish (see its log in $OUT_DIR)" >&2
# -- 4. the decoder layers timed apart at the OFT 7B shape --------------------------------------------------------
timeout 50 "$PY" benchmarks/deployment_latency.py "${LAYER_ARGS[@]}" "${FRAME_ARGS[@]}" --layer-times \
    --methods none specprune 'vla_pruner 25%' 'divprune 25%' 'random 25%' coverage_ranked --extra "$EXACT" \
    --no-reference --device "$DEVICE" --out "$OUT_DIR" --name deployment_latency_layers --no-plot \
    2>&1 | tee "$OUT_DIR/deployment_latency_layers.log" || \
    echo "gpu_benchmark: the layer split did not finish (see $OUT_DIR/deployment_latency_layers.log)" >&2
# -- the targets, read off the eager and the graphed runs --------------------------------------------------------
"$PY" benchmarks/gpu_targets.py "$OUT_DIR/deployment_latency.json" "$OUT_DIR/deployment_latency_cuda_graphs.json" \
    --out "$OUT_DIR/targets.md" || echo "gpu_benchmark: the targets could not be read (see above)" >&2
tar czf "$OUT_DIR.tgz" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")"
echo "gpu_benchmark: done in $(( $(date +%s) - started )) s; results in $OUT_DIR (packed: $OUT_DIR.tgz)"
