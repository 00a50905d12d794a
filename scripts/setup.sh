#!/usr/bin/env bash
# Prepares a Debian 12 machine to build and test kloop, then builds it.
#
#   bash scripts/setup.sh
#
# Idempotent: installs only the Debian packages that are missing (as root, or
# through sudo), creates .venv only when it is missing or was made from
# another Python, configures build/ (or reconfigures it) and runs ninja.
# Needs no input (CI runs it with no stdin). Environment:
#   JOBS        parallel build jobs (default: number of cores)
#   KLOOP_BUILD build directory (default: build)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
JOBS=${JOBS:-$(nproc)}
BUILD=${KLOOP_BUILD:-build}

# Debian 12 package names. Keep one reason per group.
PACKAGES=(
  # the engine: C++20 over liburing and OpenSSL, built with meson
  g++ gcc binutils meson ninja-build pkg-config liburing-dev libssl-dev
  # engine tests, sanitizer builds (ASan/UBSan) and libFuzzer targets
  libgtest-dev clang libclang-rt-14-dev
  # the Python package: Debian's CPython 3.11 with CFFI, its test tools, and
  # uvloop and CPython's own test_asyncio for comparison and conformance;
  # python3-dev (Python.h) for the compiled CFFI API-mode module
  python3 python3-venv python3-cffi python3-dev python3-pytest python3-uvloop
  libpython3.11-testsuite
  # syscall counting in tests and benchmarks; instruction counts
  # (benchmarks/callgrind_echo.sh)
  strace valgrind
  # the benchmark driver's charts (benchmarks/run.py --chart, --doc)
  python3-matplotlib
  # packaging (pip install through meson-python) and linters
  python3-mesonpy python3-flake8 clang-format clang-tidy
  # integration tests: real frameworks, drivers and servers on loopback
  python3-uvicorn python3-starlette python3-fastapi python3-websockets python3-wsproto
  python3-httptools python3-aiohttp python3-asyncpg python3-psycopg python3-psycopg-pool
  python3-redis python3-anyio python3-httpx python3-pytest-asyncio gunicorn
  postgresql redis-server wrk openssl
  # TLS tests: certificates (CA, server, client, expired) made at test time
  python3-cryptography
  # kTLS tests: a Debian kernel with tls.ko booted in qemu (scripts/ktls-vm.sh)
  qemu-system-x86 busybox-static cpio
)

log() { printf 'setup: %s\n' "$*"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done
# The Rust example needs a cargo; any works (it uses no crates). Debian's
# (1.63) is the fallback when none is on PATH or in ~/.cargo.
if ! command -v cargo >/dev/null && [ ! -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
  missing+=(cargo)
fi

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      SUDO=(sudo -n)
    else
      log "not root and no sudo: install these packages first: ${missing[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q </dev/null
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
  log "all ${#PACKAGES[@]} Debian packages present"
fi

# Python: always Debian's /usr/bin/python3 (another python3 may come first on
# PATH, without Debian's packages). The venv sees Debian's site-packages.
venv_ok() {
  [ -x .venv/bin/python ] &&
    [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" = /usr ] &&
    .venv/bin/python -c 'import cffi, pytest' 2>/dev/null
}
if ! venv_ok; then
  log "creating .venv from /usr/bin/python3"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  venv_ok || { log ".venv cannot import cffi and pytest" >&2; exit 1; }
fi

if [ -f "$BUILD/build.ninja" ]; then
  log "reconfiguring $BUILD"
  meson setup --reconfigure "$BUILD" </dev/null
else
  log "configuring $BUILD"
  meson setup "$BUILD" </dev/null
fi
log "building $BUILD with $JOBS jobs"
ninja -C "$BUILD" -j "$JOBS" </dev/null
log "done: $ROOT/$BUILD"
