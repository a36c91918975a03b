#!/usr/bin/env bash
# The README's test command: set up the pinned .venv (idempotent; scripts/setup_env.sh says
# which settings choose another one), then run the whole test suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
python="$(cd "${SPECPRUNE_VENV:-$repo/.venv}" && pwd)/bin/python"
cd "$repo"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "$python" -m pytest test -q -rs "$@"
