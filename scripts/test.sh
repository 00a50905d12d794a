#!/usr/bin/env bash
# Runs every test of kloop and ends with one line "N passed, N failed, N skipped"
# that adds up all stages; exits non-zero if anything failed.
#
#   bash scripts/test.sh            (after scripts/setup.sh)
#
# Stages:
#   meson    meson test -C build, all but the install suite: engine
#            GoogleTests, ABI checks, fuzz replays
#   examples meson test -C build --suite install: libkloop installed into a
#            temporary root, a C consumer and the C and Rust echo examples
#            built from it with pkg-config, echoing over loopback TCP
#   asan     a clang ASan+UBSan build of the engine, its tests and the fuzz
#            targets (build-asan) and its meson test: engine tests, ABI
#            checks, fuzz corpus replays (the install suite is left out of
#            sanitized builds: programs built outside meson cannot load such
#            a library)
#   python   pytest tests/python (kloop calls libkloop through the compiled
#            CFFI API-mode module that meson builds; test_ffi_modes.py checks)
#   python-abi  pytest tests/python again with KLOOP_FFI=abi: the same tests
#            through CFFI's ABI mode (ffi.dlopen), the fallback where the
#            module is not built
#   conform  pytest tests/conformance
#   integ    pytest tests/integration: real servers and frameworks on both loops
#   package  pytest tests/packaging: sdist -> wheel -> fresh venv -> echo;
#            python -m kloop info/run; scripts/lint.sh
#   ktls     the kernel TLS tests (tests/ktls, built statically in build/)
#            inside a qemu guest whose Debian kernel has tls.ko, through
#            scripts/ktls-vm.sh; counted from GoogleTest's summary. Skipped
#            (one skip) when qemu-system-x86_64 is not installed. The first
#            run downloads the kernel package with apt-get (then cached).
#   ktls-py  tests/ktls/test_python_ktls.py with pytest in the same guest,
#            on this machine's root file system shared read-only (9p):
#            kloop's TLS transports over kernel TLS, sendfile spliced
# A stage that cannot run (configure or build error, no tests collected,
# missing directory) counts as one failure. Environment:
#   JOBS          parallel build/test jobs (default: number of cores)
#   KLOOP_STAGES  the stages to run, space-separated (default: all)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
JOBS=${JOBS:-$(nproc)}
STAGES=${KLOOP_STAGES:-meson examples asan python python-abi conform integ package ktls ktls-py}
PY=/usr/bin/python3
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT
exec </dev/null

say() { printf '\n=== %s\n' "$*"; }

# record STAGE PASSED FAILED SKIPPED [NOTE]; the time counts from STAGE_START.
record() {
  printf '%s %s %s %s %s %s\n' "$1" "$2" "$3" "$4" $((SECONDS - STAGE_START)) "${5:-}" \
    >>"$RESULTS/stages"
}

# Counts of a meson test run from its JSON log: passed failed skipped xfail
# (expected failures count as passed; xfail says how many of them there are).
meson_counts() {
  "$PY" - "$1/meson-logs/testlog.json" <<'EOF'
import json, sys
counts = {"passed": 0, "failed": 0, "skipped": 0, "xfail": 0}
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    lines = []
for line in lines:
    result = json.loads(line)["result"]
    if result in ("OK", "EXPECTEDFAIL"):
        counts["passed"] += 1
        counts["xfail"] += result == "EXPECTEDFAIL"
    elif result == "SKIP":
        counts["skipped"] += 1
    else:  # FAIL, TIMEOUT, UNEXPECTEDPASS, ERROR
        counts["failed"] += 1
print(counts["passed"], counts["failed"], counts["skipped"], counts["xfail"])
EOF
}

# Counts of a pytest run from its JUnit XML: passed failed skipped.
junit_counts() {
  "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print(0, 0, 0)
    raise SystemExit
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests = failed = skipped = 0
for s in suites:
    tests += int(s.get("tests", 0))
    failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
    skipped += int(s.get("skipped", 0))
print(tests - failed - skipped, failed, skipped)
EOF
}

# meson_stage NAME BUILD_DIR [meson test args...]
meson_stage() {
  local name=$1 dir=$2 rc note=""
  shift 2
  rm -f "$dir/meson-logs/testlog.json"
  meson test -C "$dir" --num-processes "$JOBS" --print-errorlogs "$@"
  rc=$?
  read -r passed failed skipped xfail < <(meson_counts "$dir")
  [ "$xfail" -gt 0 ] && note="$xfail of them expected failures"
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1  # meson itself failed (build error, bad arguments)
    record "$name" "$passed" "$failed" "$skipped" "meson test exited $rc"
  elif [ $((passed + failed)) -eq 0 ]; then
    record "$name" 0 1 "$skipped" "no test ran"
  else
    record "$name" "$passed" "$failed" "$skipped" "$note"
  fi
}

# build_stage NAME [meson test args...]: a meson test run in build/.
build_stage() {
  local name=$1
  shift
  say "$name: meson test -C build $*"
  if [ ! -f build/build.ninja ]; then
    record "$name" 0 1 0 "build/ is not configured: run scripts/setup.sh"
    return
  fi
  meson_stage "$name" build "$@"
}

stage_asan() {
  say "asan: clang ASan+UBSan build in build-asan"
  # -fno-sanitize-recover: an UBSan report fails the test instead of
  # scrolling by. libkloop links with --no-undefined, and clang links the
  # sanitizer runtime statically into executables only: -shared-libasan
  # links the shared runtime (it carries UBSan too) into the library and the
  # tests alike, found through an rpath. -Dfuzz=true (clang only) builds the
  # libFuzzer targets too, so their corpus replays run under the sanitizers.
  # The CFFI API-mode module is left out: no test of this stage loads it
  # (Python would need the sanitizer runtime preloaded to).
  local rt opts
  rt=$(dirname "$(clang -print-file-name=libclang_rt.asan-x86_64.so)")
  opts=("-Db_sanitize=address,undefined" -Db_lundef=false -Dbuildtype=debug
        -Dbenchmarks=false -Dfuzz=true -Dpython_api=disabled
        -Dc_args=-fno-sanitize-recover=all -Dcpp_args=-fno-sanitize-recover=all
        "-Dc_link_args=-shared-libasan -Wl,-rpath,$rt"
        "-Dcpp_link_args=-shared-libasan -Wl,-rpath,$rt")
  if [ -f build-asan/build.ninja ]; then
    # --reconfigure: a build dir made before an option was added knows it too
    CC=clang CXX=clang++ meson setup --reconfigure build-asan "${opts[@]}" || {
      record asan 0 1 0 "meson setup --reconfigure build-asan failed"
      return
    }
  elif ! CC=clang CXX=clang++ meson setup build-asan "${opts[@]}"; then
    record asan 0 1 0 "meson setup build-asan failed"
    return
  fi
  if ! ninja -C build-asan -j "$JOBS"; then
    record asan 0 1 0 "ninja -C build-asan failed"
    return
  fi
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:halt_on_error=1} \
  UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    meson_stage asan build-asan
}

# pytest_stage NAME DIR
pytest_stage() {
  local name=$1 dir=$2 rc
  say "$name: pytest $dir"
  if [ ! -d "$dir" ]; then
    record "$name" 0 1 0 "$dir does not exist"
    return
  fi
  if [ ! -x .venv/bin/python ]; then
    record "$name" 0 1 0 ".venv is missing: run scripts/setup.sh"
    return
  fi
  PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" \
  KLOOP_LIBRARY="$ROOT/build/libkloop/libkloop.so" \
    .venv/bin/python -m pytest -p no:cacheprovider -ra --junitxml="$RESULTS/$name.xml" "$dir"
  rc=$?
  read -r passed failed skipped < <(junit_counts "$RESULTS/$name.xml")
  case $rc in
    0) record "$name" "$passed" "$failed" "$skipped" ;;
    5) record "$name" "$passed" 1 "$skipped" "pytest collected no tests" ;;
    *)
      [ "$failed" -eq 0 ] && failed=1  # interrupted, internal or usage error
      record "$name" "$passed" "$failed" "$skipped" "pytest exited $rc"
      ;;
  esac
}

# Counts of a GoogleTest run from its console output: passed failed skipped
# and how many tests ran (-1 when the final summary is missing).
gtest_counts() {
  "$PY" - "$1" <<'EOF'
import re, sys
try:
    text = open(sys.argv[1], errors="replace").read()
except OSError:
    text = ""
def count(label):
    m = re.search(r"^\[ +%s +\] (\d+) tests?\b" % label, text, re.M)
    return int(m.group(1)) if m else 0
ran = re.search(r"^\[==========\] (\d+) tests? from .* ran\.", text, re.M)
print(count("PASSED"), count("FAILED"), count("SKIPPED"), int(ran.group(1)) if ran else -1)
EOF
}

stage_ktls() {
  local log=$RESULTS/ktls.log rc passed failed skipped ran
  local exe=build/tests/ktls/kloop-ktls-tests
  say "ktls: tests/ktls in a qemu guest with kernel TLS (scripts/ktls-vm.sh)"
  if ! command -v qemu-system-x86_64 >/dev/null; then
    record ktls 0 0 1 "qemu-system-x86_64 is not installed: run scripts/setup.sh"
    return
  fi
  if [ ! -f build/build.ninja ]; then
    record ktls 0 1 0 "build/ is not configured: run scripts/setup.sh"
    return
  fi
  if ! ninja -C build -j "$JOBS" tests/ktls/kloop-ktls-tests; then
    record ktls 0 1 0 "ninja -C build tests/ktls/kloop-ktls-tests failed"
    return
  fi
  bash scripts/ktls-vm.sh "$exe" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r passed failed skipped ran < <(gtest_counts "$log")
  if [ "$ran" -lt 0 ]; then
    record ktls "$passed" $((failed > 0 ? failed : 1)) "$skipped" \
      "no GoogleTest summary: scripts/ktls-vm.sh exited $rc"
  elif [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    # e.g. the program's own check that nothing skipped in the guest
    record ktls "$passed" 1 "$skipped" "the guest program exited $rc"
  elif [ "$ran" -eq 0 ]; then
    record ktls 0 1 0 "no test ran"
  else
    record ktls "$passed" "$failed" "$skipped"
  fi
}

# Counts from pytest's last summary line ("3 passed, 1 skipped in 2.3s"):
# passed failed skipped (errors count as failed); -1 -1 -1 without one.
pytest_line_counts() {
  "$PY" - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b.* in [\d.]+s", l)]
if not lines:
    print(-1, -1, -1)
    raise SystemExit
last = lines[-1]
def n(word):
    m = re.search(r"(\d+) " + word, last)
    return int(m.group(1)) if m else 0
print(n("passed"), n("failed") + n("errors?"), n("skipped"))
EOF
}

# kloop's Python loop in the same guest: the host's root over 9p, pytest.
stage_ktls_python() {
  local log=$RESULTS/ktls-py.log rc passed failed skipped
  say "ktls-py: tests/ktls/test_python_ktls.py in the qemu guest (kloop over kernel TLS)"
  if ! command -v qemu-system-x86_64 >/dev/null; then
    record ktls-py 0 0 1 "qemu-system-x86_64 is not installed: run scripts/setup.sh"
    return
  fi
  if [ ! -f build/libkloop/libkloop.so ] && ! ninja -C build -j "$JOBS"; then
    record ktls-py 0 1 0 "build/ does not build: run scripts/setup.sh"
    return
  fi
  bash scripts/ktls-vm.sh --host-root --cwd "$ROOT" "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/ktls/test_python_ktls.py 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r passed failed skipped < <(pytest_line_counts "$log")
  if [ "$passed" -lt 0 ]; then
    record ktls-py 0 1 0 "no pytest summary: scripts/ktls-vm.sh exited $rc"
  elif [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    record ktls-py "$passed" 1 "$skipped" "pytest in the guest exited $rc"
  else
    record ktls-py "$passed" "$failed" "$skipped"
  fi
}

for stage in $STAGES; do
  STAGE_START=$SECONDS
  case $stage in
    meson) build_stage meson --no-suite install ;;
    examples) build_stage examples --suite install ;;
    asan) stage_asan ;;
    python) KLOOP_FFI=auto pytest_stage python tests/python ;;
    python-abi) KLOOP_FFI=abi pytest_stage python-abi tests/python ;;
    conform) pytest_stage conform tests/conformance ;;
    integ) pytest_stage integ tests/integration ;;
    package) pytest_stage package tests/packaging ;;
    ktls) stage_ktls ;;
    ktls-py) stage_ktls_python ;;
    *) echo "test.sh: unknown stage $stage" >&2; record "$stage" 0 1 0 "unknown stage" ;;
  esac
done

say "summary"
total_passed=0 total_failed=0 total_skipped=0
while read -r name passed failed skipped seconds note; do
  printf '%-10s %5d passed %4d failed %4d skipped %5ds %s\n' \
    "$name" "$passed" "$failed" "$skipped" "$seconds" "${note:+($note)}"
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  total_skipped=$((total_skipped + skipped))
done <"$RESULTS/stages"
echo "$total_passed passed, $total_failed failed, $total_skipped skipped"
[ "$total_failed" -eq 0 ]
