#!/usr/bin/env bash
# The README's test command: set up the pinned .venv (idempotent; scripts/setup_env.sh says which settings choose
# another one), then run the whole test suite, or the test files / node ids given (other arguments go to pytest).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup_env.sh"
python="$(cd "${SPECPRUNE_VENV:-$repo/.venv}" && pwd)/bin/python"
cd "$repo"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
targets=(test)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then targets=(); break; fi
done
exec "$python" -m pytest "${targets[@]}" -q -rs "$@"
