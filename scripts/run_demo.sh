#!/usr/bin/env bash
# The README's main command: set up the pinned .venv (idempotent; scripts/setup_env.sh says which settings choose
# another one), then run a short closed-loop session of the reference VLA in the MuJoCo tabletop tasks (unpruned
# and with SpecPrune-VLA) and print success and latency, then the speed of the same methods at a deployment shape.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
python="$(cd "${SPECPRUNE_VENV:-$repo/.venv}" && pwd)/bin/python"
cd "$repo"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
episodes="${EPISODES_PER_FAMILY:-3}"
for method in none specprune; do
  "$python" scripts/run_closed_loop.py --method "$method" --episodes-per-family "$episodes" \
    --out outputs/demo "$@"
done
# The same methods at a deployment shape: OpenVLA-OFT's token layout (2 cameras x 256 patches, 56 action
# queries) on a random-weight decoder of the papers' depth (256 wide x 32 layers). Latency only: with random
# weights success means nothing. Set DEMO_LATENCY=0 to skip.
if [ "${DEMO_LATENCY:-1}" != "0" ]; then
  echo
  echo "== Speed at a deployment shape (OpenVLA-OFT layout, random 256 x 32 decoder; latency only) =="
  "$python" benchmarks/deployment_latency.py --shape oft --width 256 --steps "${DEMO_LATENCY_STEPS:-4}" \
    --threads 2 --methods none specprune --no-reference --no-plot --out outputs/demo
fi
