#!/usr/bin/env bash
# Builds the Python >= 3.12 venv with lerobot for the interop tests: scripts/lerobot_venv.sh DIR.
# Uses pyenv's 3.12 when present (PYENV_VERSION=3.12.1), else python3.12 on PATH.
set -euo pipefail
venv="$1"
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$venv/bin/python" ]; then
    if PYENV_VERSION=3.12.1 python -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
        PYENV_VERSION=3.12.1 python -m venv "$venv"
    elif command -v python3.12 >/dev/null; then
        python3.12 -m venv "$venv"
    else
        echo "lerobot_venv.sh: lerobot 0.6.1 needs Python >= 3.12; none found (pyenv 3.12.1 or python3.12)" >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-lerobot.txt"
