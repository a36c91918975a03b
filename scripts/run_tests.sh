#!/usr/bin/env bash
# The README's test command: set up the pinned .venv (idempotent), then run the whole test suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
cd "$repo"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "$repo/.venv/bin/python" -m pytest test -q -rs "$@"
