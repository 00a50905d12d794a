#!/usr/bin/env bash
# Hello-world uvicorn and aiohttp under wrk on asyncio, uvloop and kloop,
# interleaved rounds, server on CPU 0 and wrk on CPU 1 (needs 2 CPUs, wrk,
# taskset, uvicorn, aiohttp, uvloop; see docs/integrations.md).
#
#   bash scripts/integration_bench.sh [--rounds 3] [--duration 5] [--connections 50]
#
# Run it on a quiet machine: it prints the load average before and after.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=.venv/bin/python
[ -x "$PY" ] || PY=/usr/bin/python3
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export KLOOP_LIBRARY=${KLOOP_LIBRARY:-$ROOT/build/libkloop/libkloop.so}
exec "$PY" tests/integration/bench_http.py "$@"
