#!/usr/bin/env bash
# Instructions per request of kloop's Protocol echo server, counted by
# callgrind (user space only; no hardware counters needed):
#
#   bash benchmarks/callgrind_echo.sh [MODE [REQUESTS [SIZE [CONNS]]]]
#
# MODE is KLOOP_FFI's value (abi, api or auto; default auto). The server
# (benchmarks/servers/echo_server.py --loop kloop --kind protocol) runs under
# valgrind --tool=callgrind from the build in $KLOOP_BUILD (default build);
# build/benchmarks/loadgen sends 500 warm-up requests, then the counters are
# zeroed (callgrind_control -z), REQUESTS requests of SIZE bytes go over CONNS
# connections (default 20000, 1024, 10), and the counters are dumped
# (callgrind_control -d). Prints the dump's instruction total divided by
# REQUESTS. The server is slowed down about 50 times: use it for counts, not
# for time. With TLS=1.2 or TLS=1.3 in the environment the echo runs over
# TLS of that version (a throw-away self-signed certificate; the engine's
# TLS unless KLOOP_TLS says otherwise). LOOP=uvloop or LOOP=asyncio counts
# that loop's server instead (MODE then does not apply).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=${1:-auto} REQUESTS=${2:-20000} SIZE=${3:-1024} CONNS=${4:-10}
BUILD=${KLOOP_BUILD:-build}
LOOP=${LOOP:-kloop}
case $LOOP in
  kloop | uvloop | asyncio) ;;
  *) echo "LOOP must be kloop, uvloop or asyncio, not '$LOOP'" >&2; exit 2 ;;
esac
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

export PYTHONPATH=$PWD/python KLOOP_LIBRARY=$PWD/$BUILD/libkloop/libkloop.so KLOOP_FFI=$MODE
export PYTHONDONTWRITEBYTECODE=1
server_tls=() client_tls=()
case ${TLS:-} in
  "") ;;
  1.2 | 1.3)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 2 -subj /CN=localhost \
      -addext subjectAltName=DNS:localhost 2>/dev/null
    server_tls=(--certfile "$OUT/cert.pem" --keyfile "$OUT/key.pem")
    client_tls=(--tls --tls-version "$TLS")
    ;;
  *) echo "TLS must be 1.2 or 1.3, not '$TLS'" >&2; exit 2 ;;
esac
coproc SERVER {
  exec valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    /usr/bin/python3 benchmarks/servers/echo_server.py --loop "$LOOP" --kind protocol \
    --port 0 "${server_tls[@]}" 2>"$OUT/valgrind.log"
}
server=$SERVER_PID
read -r ready port <&"${SERVER[0]}" || { cat "$OUT/valgrind.log" >&2; exit 1; }
[ "$ready" = READY ] || { echo "server said: $ready $port" >&2; exit 1; }
load() {
  "$BUILD/benchmarks/loadgen" -P "$port" -c "$CONNS" -s "$SIZE" -p 1 -w 0 -j -n "$1" \
    "${client_tls[@]}"
}
load 500 >/dev/null
callgrind_control -z "$server" >/dev/null 2>&1
load "$REQUESTS" >"$OUT/loadgen.json"
callgrind_control -d "$server" >/dev/null 2>&1
kill -KILL "$server"
wait "$server" 2>/dev/null || true
if [ "$LOOP" = kloop ]; then
  mode=$(/usr/bin/python3 -c "from kloop import _ffi; print(_ffi.MODE)")
  what="KLOOP_FFI=$MODE (CFFI $mode mode)"
else
  what=$LOOP
fi
dump=$(ls "$OUT"/callgrind.out.* | tail -1)
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
echo "$what${TLS:+, TLS $TLS}: $total instructions for" \
  "$REQUESTS requests of $SIZE bytes over $CONNS connections: $((total / REQUESTS)) per request"
