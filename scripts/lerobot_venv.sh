#!/usr/bin/env bash
# Builds the Python >= 3.12 venv with lerobot for the interop tests: scripts/lerobot_venv.sh DIR.
# The interpreter: pyenv's 3.12.1 when pyenv has it (asked by version, since `python` may be the
# project venv's 3.11 under make), else the first python3.13 / python3.12 that runs.
set -euo pipefail
venv="$1"
here="$(cd "$(dirname "$0")" && pwd)"
is_312() { "$1" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; }
if [ ! -x "$venv/bin/python" ]; then
    py=""
    if command -v pyenv >/dev/null && cand="$(PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null)" && is_312 "$cand"; then
        py="$cand"
    else
        for c in python3.13 python3.12; do
            if command -v "$c" >/dev/null && is_312 "$c"; then py="$(command -v "$c")"; break; fi
        done
    fi
    if [ -z "$py" ]; then
        echo "lerobot_venv.sh: lerobot 0.6.1 needs Python >= 3.12; none found (pyenv 3.12.1, python3.13 or python3.12)" >&2
        exit 1
    fi
    "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-lerobot.txt"
