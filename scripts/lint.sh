#!/usr/bin/env bash
# Runs kloop's linters and exits non-zero when any of them reports something.
#
#   bash scripts/lint.sh                       everything
#   KLOOP_LINT="format python" bash scripts/lint.sh
#
# Linters (KLOOP_LINT picks them, space-separated; default all three):
#   format  clang-format --dry-run --Werror (.clang-format) on the C and C++
#           files git tracks, except include/kloop.h (its tables of macros and
#           comments are laid out by hand; tests/abi checks the header)
#   tidy    clang-tidy (.clang-tidy) on libkloop/*.cc with the flags of a
#           meson build's compile_commands.json
#   python  flake8 (.flake8) on every Python file; ruff too when installed
#           ([tool.ruff] in pyproject.toml)
# Environment:
#   KLOOP_BUILD  meson build directory whose compile_commands.json clang-tidy
#                uses (default: build; when it has none, build-lint is
#                configured, not compiled, for it)
#   JOBS         parallel clang-tidy processes (default: number of cores)
# To fix formatting: clang-format -i FILE (the tree's .clang-format applies).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
LINTERS=${KLOOP_LINT:-format tidy python}
JOBS=${JOBS:-$(nproc)}
BUILD=${KLOOP_BUILD:-build}
PY=/usr/bin/python3
failed=()

say() { printf '\n=== lint %s\n' "$*"; }

# Files of the tree: what git tracks (and new files not ignored), else find.
tree_files() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files --cached --others --exclude-standard -- "$@" |
      while IFS= read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done
  else
    local args=() p
    for p in "$@"; do args+=(-o -name "${p#\*}"); done
    find . -path ./.git -prune -o -path './build*' -prune -o -type f \( -false "${args[@]}" \) \
      -print | sed 's|^\./||'
  fi
}

lint_format() {
  say "format: clang-format --dry-run --Werror"
  if ! command -v clang-format >/dev/null; then
    echo "clang-format not found (Debian package clang-format)"
    return 1
  fi
  mapfile -t files < <(tree_files '*.c' '*.cc' '*.h' | grep -v -x 'include/kloop.h' | sort)
  if [ ${#files[@]} -eq 0 ]; then
    echo "no C or C++ files found"
    return 1
  fi
  local bad=() f
  for f in "${files[@]}"; do
    clang-format --dry-run --Werror --style=file "$f" >/dev/null 2>&1 || bad+=("$f")
  done
  if [ ${#bad[@]} -gt 0 ]; then
    # Show the first findings of each file, then the list.
    for f in "${bad[@]}"; do
      clang-format --dry-run --style=file "$f" 2>&1 | grep -m 3 -A 2 'warning:' || true
    done
    echo "clang-format: ${#bad[@]} of ${#files[@]} files need formatting:"
    printf '  %s\n' "${bad[@]}"
    return 1
  fi
  echo "clang-format: ${#files[@]} files formatted"
}

lint_tidy() {
  say "tidy: clang-tidy on libkloop"
  if ! command -v clang-tidy >/dev/null; then
    echo "clang-tidy not found (Debian package clang-tidy)"
    return 1
  fi
  local db=$BUILD
  if [ ! -f "$db/compile_commands.json" ]; then
    db=build-lint
    if [ ! -f "$db/compile_commands.json" ]; then
      echo "no $BUILD/compile_commands.json: configuring $db (no compilation)"
      meson setup "$db" -Dtests=false -Dbenchmarks=false >/dev/null || {
        echo "meson setup $db failed"
        return 1
      }
    fi
  fi
  mapfile -t files < <(tree_files 'libkloop/*.cc' | sort)
  if [ ${#files[@]} -eq 0 ]; then
    echo "no libkloop/*.cc"
    return 1
  fi
  # One process per file, JOBS at a time; any finding is an error
  # (WarningsAsErrors in .clang-tidy).
  local out rc
  out=$(printf '%s\n' "${files[@]}" |
        xargs -P "$JOBS" -n 1 clang-tidy -p "$db" --quiet 2>/dev/null)
  rc=$?
  if [ $rc -ne 0 ]; then
    printf '%s\n' "$out" | grep -E ': (warning|error):' | sort -u
    echo "clang-tidy: $(printf '%s\n' "$out" | grep -E ': (warning|error):' | sort -u |
                        wc -l) finding(s) in ${#files[@]} files (compile database: $db)"
    return 1
  fi
  echo "clang-tidy: ${#files[@]} files clean (compile database: $db)"
}

lint_python() {
  say "python: flake8"
  if ! "$PY" -m flake8 --version >/dev/null 2>&1; then
    echo "flake8 not found (Debian package python3-flake8)"
    return 1
  fi
  local rc=0 n
  "$PY" -m flake8 . || rc=1
  n=$(tree_files '*.py' | wc -l)
  if command -v ruff >/dev/null; then
    say "python: ruff"
    if ruff check --help >/dev/null 2>&1; then
      ruff check . || rc=1
    else  # ruff before 0.1 has no subcommands
      ruff . || rc=1
    fi
  fi
  [ $rc -eq 0 ] && echo "flake8: $n Python files clean"
  return $rc
}

for linter in $LINTERS; do
  case $linter in
    format) lint_format || failed+=(format) ;;
    tidy) lint_tidy || failed+=(tidy) ;;
    python) lint_python || failed+=(python) ;;
    *) echo "lint.sh: unknown linter $linter" >&2; failed+=("$linter") ;;
  esac
done

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: FAILED: ${failed[*]}"
  exit 1
fi
echo "lint: all clean ($LINTERS)"
