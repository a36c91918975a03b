#!/usr/bin/env bash
# The README's main command: set up the pinned .venv (idempotent), then run a short closed-loop session of the
# reference VLA in the MuJoCo tabletop tasks (unpruned and with SpecPrune-VLA) and print success and latency.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
episodes="${EPISODES_PER_FAMILY:-3}"
for method in none specprune; do
  "$repo/.venv/bin/python" scripts/run_closed_loop.py --method "$method" --episodes-per-family "$episodes" \
    --out outputs/demo "$@"
done
