#!/usr/bin/env bash
# The README's first command: install what is missing, build, and run kloop's
# main job — a short side-by-side echo benchmark of stock asyncio, uvloop and
# kloop (python -m kloop bench).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export KLOOP_LIBRARY="${KLOOP_LIBRARY:-$PWD/build/libkloop/libkloop.so}"
exec .venv/bin/python -m kloop bench "$@"
