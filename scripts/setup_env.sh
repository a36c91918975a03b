#!/usr/bin/env bash
# Creates (or refreshes) the project's .venv with pinned versions. Idempotent: a stamp holding the
# hash of the requirement files and the settings below skips the install when nothing changed. Source-able or
# executable.
#
# Settings (environment):
#   PYTHON                  the interpreter that creates the venv (python3)
#   SPECPRUNE_VENV          where the venv goes (.venv)
#   SPECPRUNE_SYSTEM_ROS=1  no ROS wheels: the venv uses a system ROS 2 (create it with --system-site-packages)
#   SPECPRUNE_ROS_DISTRO    which ROS 2 wheels: kilted (default) or jazzy (requirements-ros[-<distro>].txt)
#   SPECPRUNE_PINS          pins that replace the same packages' pins in requirements.txt, e.g. the robot image's
#                           "torch==2.11.0 numpy==2.5.2" (docs/compatibility.md lists the stacks tested)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPECPRUNE_VENV:-$repo/.venv}"
python_bin="${PYTHON:-python3}"
distro="${SPECPRUNE_ROS_DISTRO:-kilted}"
ros_requirements="$repo/requirements-ros.txt"
[ "$distro" = "kilted" ] || ros_requirements="$repo/requirements-ros-$distro.txt"
if [ ! -f "$ros_requirements" ]; then
  echo "[setup] no ROS 2 wheels listed for '$distro' ($ros_requirements); use kilted or jazzy" >&2
  exit 2
fi
read -r -a pins <<< "${SPECPRUNE_PINS:-}"
settings="${SPECPRUNE_PINS:-}${SPECPRUNE_SYSTEM_ROS:+ system-ros=$SPECPRUNE_SYSTEM_ROS}"
stamp="$venv/.specprune-requirements.sha256"
want="$( { cat "$repo/requirements.txt" "$ros_requirements"; [ -z "$settings" ] || echo "$settings"; } \
  | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements into $venv (first run takes a few minutes)" >&2
  requirements="$repo/requirements.txt"
  if [ "${#pins[@]}" -gt 0 ]; then       # requirements.txt less the packages SPECPRUNE_PINS names, then those pins
    requirements="$(mktemp)"
    trap 'rm -f "$requirements"' EXIT
    names="$(printf '%s\n' "${pins[@]}" | sed -E 's/[=<>!~ ;].*//' | paste -sd'|' -)"
    grep -viE "^(${names})([=<>!~ ;]|$)" "$repo/requirements.txt" > "$requirements" || true
    printf '%s\n' "${pins[@]}" >> "$requirements"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # torch first and pinned, so nothing later can pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install --quiet "$(grep -iE '^torch([=<>!~ ;]|$)' "$requirements")"
  "$venv/bin/python" -m pip install --quiet -r "$requirements"
  if [ "${SPECPRUNE_SYSTEM_ROS:-0}" != "1" ]; then
    "$venv/bin/python" -m pip install --quiet -r "$ros_requirements"
  fi
  "$venv/bin/python" -m pip install --quiet --no-deps -e "$repo"
  echo "$want" > "$stamp"
fi
