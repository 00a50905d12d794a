"""Hello-world HTTP servers under wrk, on asyncio, uvloop and kloop.

    python tests/integration/bench_http.py [--rounds 3] [--duration 5]
        [--connections 50] [--servers uvicorn,aiohttp] [--loops asyncio,uvloop,kloop]

Not a test (scripts/integration_bench.sh runs it). For each round, for each
server, for each loop in turn (interleaved, so a drift in machine load hits
every loop alike): start the server pinned to CPU 0, run wrk pinned to
CPU 1 for 1 s of warm-up and then `--duration` s measured, and read the
server's CPU time (utime+stime from /proc/PID/stat) around the measured
run. Prints one line per run and a table of medians with ratios to
uvloop. The servers:

* uvicorn: serve_uvicorn.py with a bare ASGI app (integ_apps:hello_asgi),
  --http httptools (h11 with --http h11), no access log;
* aiohttp: serve_aiohttp.py (web.run_app), route "/", no access log.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import integ_util  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def start(server, loop, port, http):
    if server == "uvicorn":
        args = ["serve_uvicorn.py", "--loop", loop, "--app", "integ_apps:hello_asgi",
                "--port", str(port), "--http", http, "--log-level", "warning", "--ws", "none"]
    else:
        args = ["serve_aiohttp.py", "--loop", loop, "--port", str(port)]
    srv = integ_util.PythonServer(["-c", "import os, runpy, sys; os.sched_setaffinity(0, {0}); "
                                   "sys.argv = sys.argv[1:]; "
                                   "runpy.run_path(sys.argv[0], run_name='__main__')", *args],
                                  [("127.0.0.1", port)], f"{server} on {loop}")
    return srv


def wrk(url, duration, connections):
    r = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                        "--latency", url], capture_output=True, text=True,
                       timeout=duration + 60)
    out = r.stdout + r.stderr
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = "Socket errors" in out or "Non-2xx" in out
    if not m or not n:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {"rps": float(m.group(1)), "requests": int(n.group(1)),
            "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
            "errors": errors, "out": out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--servers", default="uvicorn,aiohttp")
    p.add_argument("--loops", default="asyncio,uvloop,kloop")
    p.add_argument("--http", default="httptools", choices=["httptools", "h11"])
    args = p.parse_args()
    if os.cpu_count() < 2:
        sys.exit("needs 2 CPUs (server on CPU 0, wrk on CPU 1)")
    with open("/proc/loadavg") as f:
        print(f"# load average before: {f.read().split()[:3]}")
    print(f"# wrk -t1 -c{args.connections} -d{args.duration}s (CPU 1), server on CPU 0, "
          f"uvicorn --http {args.http}, {args.rounds} interleaved rounds")
    results = {}
    for rnd in range(args.rounds):
        for server in args.servers.split(","):
            for loop in args.loops.split(","):
                port = integ_util.free_port()
                srv = start(server, loop, port, args.http)
                try:
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 1, args.connections)  # warm-up
                    c0 = cpu_seconds(srv.proc.pid)
                    w = wrk(url, args.duration, args.connections)
                    c1 = cpu_seconds(srv.proc.pid)
                finally:
                    srv.cleanup()
                us_per_req = (c1 - c0) / w["requests"] * 1e6
                results.setdefault((server, loop), []).append((w["rps"], us_per_req, w["p99_ms"]))
                print(f"round {rnd + 1} {server:8s} {loop:8s} {w['rps']:9.0f} req/s "
                      f"{us_per_req:6.1f} us CPU/req  p99 {w['p99_ms']:.2f} ms"
                      f"{'  ERRORS' if w['errors'] else ''}", flush=True)
    with open("/proc/loadavg") as f:
        print(f"# load average after: {f.read().split()[:3]}")
    print()
    print("| server | loop | req/s (median) | server CPU µs/req | p99 ms | req/s vs uvloop "
          "| CPU/req vs uvloop |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for server in args.servers.split(","):
        base = results.get((server, "uvloop"))
        for loop in args.loops.split(","):
            rs = results[(server, loop)]
            rps = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            p99 = statistics.median(r[2] for r in rs)
            if base:
                brps = statistics.median(r[0] for r in base)
                bcpu = statistics.median(r[1] for r in base)
                ratios = f"{rps / brps:.2f} | {cpu / bcpu:.2f}"
            else:
                ratios = "- | -"
            print(f"| {server} | {loop} | {rps:.0f} | {cpu:.1f} | {p99:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
