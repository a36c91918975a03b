#!/usr/bin/env bash
# Creates (or refreshes) the project's .venv with pinned versions. Idempotent: a stamp holding the
# hash of the requirement files skips the install when nothing changed. Source-able or executable.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPECPRUNE_VENV:-$repo/.venv}"
python_bin="${PYTHON:-python3}"
stamp="$venv/.specprune-requirements.sha256"
want="$(cat "$repo/requirements.txt" "$repo/requirements-ros.txt" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first and pinned, so nothing later can pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -r "$repo/requirements.txt"
  if [ "${SPECPRUNE_SYSTEM_ROS:-0}" != "1" ]; then
    "$venv/bin/python" -m pip install --quiet -r "$repo/requirements-ros.txt"
  fi
  "$venv/bin/python" -m pip install --quiet --no-deps -e "$repo"
  echo "$want" > "$stamp"
fi
