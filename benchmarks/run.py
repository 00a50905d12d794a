#!/usr/bin/python3
"""Benchmark driver: echo servers on asyncio, uvloop and kloop (and the
native epoll and libkloop servers), measured with the native load generator.

How a measurement is made (see docs/performance.md for the reasons):
  * every run starts a fresh server pinned to CPU 0 and the load generator
    (build/benchmarks/loadgen) pinned to CPU 1;
  * the loops are interleaved: round 1 runs A B C for a cell, round 2 B C A,
    round 3 C A B, ... so slow drifts of the machine hit every loop alike;
  * each run has a warm-up, then a measured phase; the load generator reads
    the server's utime+stime and RSS from /proc at the edges of that phase;
  * medians over rounds with min-max; ratios are computed per round (kloop
    against uvloop and asyncio of the same round) and their median reported;
  * /proc/stat is sampled around every run: CPU time used by anything other
    than the server and the load generator is recorded as "other", and time
    stolen by the hypervisor as "steal", so that a measurement disturbed by
    either can be seen (and, with --retries, redone).

Tiers:
  quick     the 4 cells of the brief's target table (< 5 minutes)
  full      6 server kinds x 64 B..100 KiB x 1..1000 connections (udp: up to
            10 KiB, one datagram per message), and http at 1..1000
            connections
  native    echo_epoll vs echo_kloop at 10/100/1000 conns, 1 KiB and 100 KiB
  syscalls  untimed: strace -c -f on each server for a fixed number of
            requests; syscalls and io_uring_enter calls per request
  tls       TLS echo (Protocol server with ssl=; load generator --tls) at
            TLS 1.3 and TLS 1.2, and HTTPS keep-alive under wrk; the test
            certificate is made at run time in a temporary directory. Runs
            kloop twice: as it chooses (engine TLS where safe) and as
            kloop-sslproto (KLOOP_TLS=sslproto: asyncio's sslproto)
  http      HTTP/1.1 keep-alive over plain TCP: the minimal Protocol server
            of echo_server.py --kind http (each response written in two
            pieces, head then body) under `wrk -t1 -cN --latency` pinned to
            the client CPU, at 10 and 100 connections; the same server and
            measurement as the https cells of the tls tier, without ssl=.
            Python loops only (the native servers do not speak HTTP)
  ablation  kloop with one engine feature switched off at a time (multishot
            receive, the provided-buffer ring, DEFER_TASKRUN, write
            gathering, completion batching; KLOOP_DISABLE / KLOOP_CQ_BATCH)
            against kloop with all of them, interleaved: Protocol echo 1 KiB
            at 10 and 100 conns, 100 KiB at 10, HTTP (two-piece responses)
            at 10; ratios to kloop of req/s and server CPU per request
  churn     connect/accept/close churn: each of N client slots (loadgen
            --churn) connects, sends 64 B, reads the echo until the server
            (a Protocol that echoes, then closes) closes, and starts over;
            connections per second at 10 and 100 slots
  micro     scheduling micro-benchmarks run inside one process per loop
            and round (benchmarks/servers/micro.py, pinned to CPU 0):
            call_soon chain, call_later + cancel, sleep(0) in a task,
            future ping-pong between two tasks, create_task + await; ns per
            operation, ratios of times (below 1.00x kloop is faster)
  spawn     subprocess spawn rate, in-process like micro:
            create_subprocess_exec('/bin/true') + wait(), one at a time and
            8 at a time; spawns per second
  custom    the cells given by --kinds, --sizes, --conns

Server kinds (--kinds): protocol, streams, buffered, sock (echo in four API
styles), udp (DatagramProtocol echo, loadgen --udp over connected UDP
sockets), readline (streams server reading 5 lines per request with
StreamReader.readline, loadgen --lines 5), churn (as the churn tier), http
(as the http tier: the client is wrk, so --sizes does not apply).

Loop variants for --loops: kloop-sslproto (above), kloop-abi and kloop-api
(KLOOP_FFI=abi|api: kloop's CFFI binding in ABI mode, or through the
compiled API-mode module; plain kloop takes the module when it was built).

Examples:
  /usr/bin/python3 benchmarks/run.py quick
  /usr/bin/python3 benchmarks/run.py native --rounds 5 --doc
  /usr/bin/python3 benchmarks/run.py tls --doc
  /usr/bin/python3 benchmarks/run.py http --rounds 3 --nice -20 --doc
  /usr/bin/python3 benchmarks/run.py report benchmarks/results/quick-DATE.json --chart q.png
  /usr/bin/python3 benchmarks/run.py micro --rounds 3 --nice -20 --doc
  /usr/bin/python3 benchmarks/run.py ablation --rounds 3 --nice -20 --doc
  /usr/bin/python3 benchmarks/run.py custom --kinds udp,readline --sizes 1k \\
      --conns 10,100 --doc --section udp-readline
  /usr/bin/python3 benchmarks/run.py custom --loops uvloop,kloop \\
      --kinds protocol --sizes 1024 --conns 10,100 --rounds 3
  /usr/bin/python3 benchmarks/run.py custom --loops kloop-abi,kloop-api \\
      --kinds protocol --sizes 1k --conns 10 --rounds 2
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_PY = ROOT / "benchmarks" / "servers" / "echo_server.py"
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
PYTHON = "/usr/bin/python3"
SERVER_CPU = 0
CLIENT_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

PY_LOOPS = ("asyncio", "uvloop", "kloop")
READLINE_LINES = 5
UDP_MAX = 65507  # the largest UDP payload over IPv4

# Kinds whose load generator needs arguments of its own (the server kind has
# the same name in echo_server.py): one datagram per message; messages of
# READLINE_LINES lines; one message per connection, which the server closes.
KIND_LOADGEN = {"udp": ["--udp"], "readline": ["--lines", str(READLINE_LINES)],
                "churn": ["--churn"]}
CHURN_CELLS = [("churn", 64, 10), ("churn", 64, 100)]
MICRO_RUNNER = ROOT / "benchmarks" / "servers" / "micro.py"
# Python servers that are one of PY_LOOPS run with extra environment:
# kloop with KLOOP_TLS=sslproto keeps every TLS connection on asyncio's
# sslproto, which puts kloop's two TLS paths side by side in one run;
# kloop-abi and kloop-api force its CFFI binding (KLOOP_FFI; plain kloop
# takes the API-mode module when it was built), to compare the two.
LOOP_VARIANTS = {"kloop-sslproto": ("kloop", {"KLOOP_TLS": "sslproto"}),
                 "kloop-abi": ("kloop", {"KLOOP_FFI": "abi"}),
                 "kloop-api": ("kloop", {"KLOOP_FFI": "api"})}
# The ablation tier: kloop with one engine feature switched off at a time
# (KLOOP_DISABLE, KLOOP_CQ_BATCH: python/kloop/_proactor.py), and what each
# variant does instead.
ABLATIONS = {
    "kloop-no-multishot-recv": ({"KLOOP_DISABLE": "multishot_recv"},
                                "multishot receive", "a one-shot receive re-armed after "
                                "each completion (still from the buffer ring)"),
    "kloop-no-buf-ring": ({"KLOOP_DISABLE": "buf_ring"},
                          "provided-buffer ring", "one-shot receives into buffers the "
                          "engine picks itself (multishot needs the ring)"),
    "kloop-no-defer-taskrun": ({"KLOOP_DISABLE": "defer_taskrun"},
                               "DEFER_TASKRUN", "the kernel runs completion work when it "
                               "likes (interrupting the loop), not when the loop waits"),
    "kloop-no-send-gather": ({"KLOOP_DISABLE": "send_gather"},
                             "write gathering", "one queued block per send instead of "
                             "up to 64 in one sendmsg"),
    "kloop-no-direct-send": ({"KLOOP_DISABLE": "direct_send"},
                             "direct send", "a large write to an idle stream is copied "
                             "into the queue and sent by the next poll"),
    "kloop-no-batch": ({"KLOOP_CQ_BATCH": "1"},
                       "completion batching", "one completion record per kloop_poll() "
                       "call instead of up to 256"),
}
LOOP_VARIANTS.update({name: ("kloop", env) for name, (env, _, _) in ABLATIONS.items()})
ABLATION_CELLS = [("protocol", 1024, 10), ("protocol", 1024, 100), ("protocol", 102400, 10),
                  ("http", 0, 10)]
NATIVE = ("epoll", "libkloop")
KINDS = ("protocol", "streams", "buffered", "sock", "udp", "readline")
KIND_TITLE = {"protocol": "Protocol", "streams": "streams", "buffered": "BufferedProtocol",
              "sock": "sock_recv/sendall", "native": "C echo",
              "udp": "UDP echo (DatagramProtocol)",
              "readline": f"streams readline ({READLINE_LINES} lines/request)",
              "churn": "churn (connect, echo, close)",
              "tls13": "TLS 1.3 echo", "tls12": "TLS 1.2 echo (AES-128-GCM)",
              "https": "HTTPS keep-alive (wrk)", "http": "HTTP keep-alive (wrk)"}

# TLS kinds: the server kind behind ssl=, and the load generator's TLS
# arguments (None: the client is wrk). The test certificate has a P-256 key,
# hence ECDSA in the TLS 1.2 cipher; TLS 1.3 takes OpenSSL's default suite.
TLS_KINDS = {
    "tls13": ("protocol", ["--tls", "--tls-version", "1.3"]),
    "tls12": ("protocol", ["--tls", "--tls-version", "1.2",
                           "--tls-ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
    "https": ("http", None),
}
TLS_CELLS = [("tls13", 1024, 10), ("tls13", 102400, 10), ("tls13", 1024, 100),
             ("tls12", 1024, 10), ("https", 0, 10), ("https", 0, 100)]

# Kinds whose client is wrk, and the scheme of its URL: both run the HTTP/1.1
# server of echo_server.py (--kind http), https behind ssl=. The size of
# their cells is 0: wrk sends its own GET requests, the responses are fixed.
WRK_KINDS = {"https": "https", "http": "http"}
HTTP_CELLS = [("http", 0, 10), ("http", 0, 100)]

# The tiers measured as a matrix of cells x loops (run_matrix, summarize,
# emit_matrix): the ones --chart draws.
MATRIX_TIERS = ("quick", "full", "custom", "tls", "http", "churn", "native", "ablation")

QUICK_CELLS = [("protocol", 1024, 10), ("streams", 1024, 10),
               ("protocol", 102400, 10), ("protocol", 1024, 100)]


# ---------------------------------------------------------------------------
# Environment: where the binaries are, what is installed
# ---------------------------------------------------------------------------

class BenchError(Exception):
    pass


class Env:
    """Paths of the build and of the Python interpreter used for servers."""

    def __init__(self, build=None, python=PYTHON):
        self.python = python
        self.build = self._find_build(build)
        self.loadgen = self.build / "benchmarks" / "loadgen"
        self.libkloop = self.build / "libkloop" / "libkloop.so"
        self.python_dir = ROOT / "python"
        self._availability = {}
        self._snapshot = None
        self.tls_files = None  # (certfile, keyfile) for the TLS kinds
        self._tls_dir = None

    def make_test_certificate(self):
        """A self-signed P-256 certificate for localhost, in a temporary
        directory that lives as long as this Env (nothing is kept)."""
        self._tls_dir = tempfile.TemporaryDirectory(prefix="kloop-bench-tls-")
        cert = os.path.join(self._tls_dir.name, "cert.pem")
        key = os.path.join(self._tls_dir.name, "key.pem")
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                            "-keyout", key, "-out", cert, "-days", "2",
                            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError("openssl req failed: " + r.stderr.strip()[-200:])
        self.tls_files = (cert, key)

    def snapshot(self):
        """Run every server from a copy of python/ taken now, so that edits
        made to the tree during a long run do not change what is measured."""
        import shutil
        self._snapshot = tempfile.TemporaryDirectory(prefix="kloop-bench-py-")
        dst = Path(self._snapshot.name) / "python"
        shutil.copytree(ROOT / "python", dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        self.python_dir = dst

    @staticmethod
    def _find_build(build):
        if build:
            b = Path(build).resolve()
            if not (b / "benchmarks" / "loadgen").exists():
                raise BenchError(f"{b}/benchmarks/loadgen not found: build it with "
                                 f"`meson setup {b} && ninja -C {b}`")
            return b
        env = os.environ.get("KLOOP_BUILD")
        candidates = [Path(env)] if env else []
        candidates += [ROOT / "build"] + sorted(ROOT.glob("build*"))
        for b in candidates:
            if (b / "benchmarks" / "loadgen").exists():
                return b.resolve()
        raise BenchError("the load generator is not built: run scripts/setup.sh, or "
                         "`meson setup build && ninja -C build` (looked for "
                         "build*/benchmarks/loadgen under " + str(ROOT) + ")")

    def stale(self):
        """Sources newer than the binaries built from them (a list of paths)."""
        lib = self.build / "libkloop" / "libkloop.so"
        pairs = [(self.loadgen, [ROOT / "benchmarks" / "loadgen.c"]),
                 (self.native_exe("epoll"), [ROOT / "benchmarks" / "echo_epoll.c"]),
                 (self.native_exe("libkloop"), [ROOT / "benchmarks" / "echo_kloop.c"])]
        if lib.exists():
            srcs = [*(ROOT / "libkloop").glob("*.cc"), *(ROOT / "libkloop").glob("*.h"),
                    ROOT / "include" / "kloop.h"]
            pairs.append((lib, srcs))
        out = []
        for binary, srcs in pairs:
            if not binary.exists():
                continue
            built = binary.resolve().stat().st_mtime
            out += [str(src.relative_to(ROOT)) for src in srcs
                    if src.exists() and src.stat().st_mtime > built]
        return out

    def server_env(self, loop=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.python_dir)
        if self.libkloop.exists():
            env["KLOOP_LIBRARY"] = str(self.libkloop)
        env.pop("PYTHONASYNCIODEBUG", None)
        env.pop("KLOOP_TLS", None)
        env.pop("KLOOP_FFI", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if loop in LOOP_VARIANTS:
            env.update(LOOP_VARIANTS[loop][1])
        return env

    def availability(self, loop):
        """None if `loop` can run a server, else a one-line reason."""
        if loop in self._availability:
            return self._availability[loop]
        reason = None
        base = LOOP_VARIANTS[loop][0] if loop in LOOP_VARIANTS else loop
        if base not in PY_LOOPS and loop not in NATIVE:
            known = ", ".join(PY_LOOPS + tuple(LOOP_VARIANTS) + NATIVE)
            reason = f"unknown server {loop!r} (known: {known})"
        elif base in PY_LOOPS:
            probe = {
                "asyncio": "import asyncio; asyncio.new_event_loop().close()",
                "uvloop": "import uvloop; uvloop.new_event_loop().close()",
                "kloop": "import kloop; kloop.new_event_loop().close()",
            }[base]
            r = subprocess.run([self.python, "-c", probe], env=self.server_env(loop),
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
                reason = lines[-1] if lines else f"exit status {r.returncode}"
        else:
            exe = self.native_exe(loop)
            if not exe.exists():
                reason = f"{exe} not built"
        self._availability[loop] = reason
        return reason

    def native_exe(self, name):
        return self.build / "benchmarks" / ("echo_epoll" if name == "epoll" else "echo_kloop")

    def server_cmd(self, loop, kind):
        loop = LOOP_VARIANTS[loop][0] if loop in LOOP_VARIANTS else loop
        if loop in PY_LOOPS and kind in TLS_KINDS:
            if not self.tls_files:
                raise BenchError("TLS cell without a test certificate")
            return [self.python, str(SERVER_PY), "--loop", loop, "--kind", TLS_KINDS[kind][0],
                    "--port", "0", "--certfile", self.tls_files[0],
                    "--keyfile", self.tls_files[1]]
        if loop in PY_LOOPS and kind == "readline":
            return [self.python, str(SERVER_PY), "--loop", loop, "--kind", kind, "--port", "0",
                    "--lines", str(READLINE_LINES)]
        if loop in PY_LOOPS:
            return [self.python, str(SERVER_PY), "--loop", loop, "--kind", kind, "--port", "0"]
        return [str(self.native_exe(loop)), "--port", "0"]


# Scheduling priority of the server and the load generator (run.py --nice).
# On a machine shared with other work, a high priority (negative nice, root
# only) keeps other processes from taking the two pinned cores during a run.
NICE = 0


def _pin(cpu):
    nice = NICE

    def fn():
        os.sched_setaffinity(0, {cpu})
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError:
                pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return fn


# ---------------------------------------------------------------------------
# /proc sampling
# ---------------------------------------------------------------------------

def cpu_totals():
    """(busy, steal) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def proc_cpu(pid):
    """utime+stime of a process in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def busy_processes(min_share=0.05, interval=0.3):
    """Processes that used more than min_share of a core over `interval` s."""
    exclude = {os.getpid()}

    def snap():
        out = {}
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in exclude:
                try:
                    with open(f"/proc/{d}/stat") as f:
                        data = f.read()
                    comm = data[data.index("(") + 1:data.rindex(")")]
                    fields = data[data.rindex(")") + 2:].split()
                    out[int(d)] = (comm, int(fields[11]) + int(fields[12]))
                except (OSError, ValueError):
                    pass
        return out
    a = snap()
    time.sleep(interval)
    b = snap()
    busy = []
    for pid, (comm, t) in b.items():
        t0 = a[pid][1] if pid in a else 0
        share = (t - t0) / CLK_TCK / interval
        if share >= min_share:
            busy.append((round(share, 2), pid, comm))
    return sorted(busy, reverse=True)


def wait_quiet(max_wait, threshold=0.10, interval=0.5):
    """Wait until the machine's busy CPU falls below `threshold` of a core.

    Returns the seconds waited, or None if it stayed busy for max_wait s.
    """
    t0 = time.monotonic()
    while True:
        b0, _ = cpu_totals()
        time.sleep(interval)
        b1, _ = cpu_totals()
        if (b1 - b0) / CLK_TCK / interval < threshold:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= max_wait:
            return None


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

class Server:
    """A server process pinned to SERVER_CPU, started and waited for READY."""

    def __init__(self, env, loop, kind, log):
        self.cmd = env.server_cmd(loop, kind)
        self.proc = subprocess.Popen(self.cmd, env=env.server_env(loop), stdout=subprocess.PIPE,
                                     stderr=log, text=True, preexec_fn=_pin(SERVER_CPU))
        self.port = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                if line.startswith("READY "):
                    self.port = line.split()[1]
                    return
                if line.startswith("UNAVAILABLE") or not line:
                    break
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise BenchError(f"server {' '.join(self.cmd)} did not start"
                         + (f": {line.strip()}" if r and line else ""))

    @property
    def pid(self):
        return self.proc.pid

    def read_tls_info(self, wait=1.0):
        """The TLSINFO line the server prints at its first TLS connection."""
        info = None
        while True:
            r, _, _ = select.select([self.proc.stdout], [], [], wait)
            if not r:
                return info
            line = self.proc.stdout.readline()
            if not line:
                return info
            if line.startswith("TLSINFO "):
                info = json.loads(line[8:])
            wait = 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def kind_loadgen_args(kind):
    """The load generator arguments a server kind needs (None: the client is wrk)."""
    if kind in WRK_KINDS:
        return None
    if kind in TLS_KINDS:
        return list(TLS_KINDS[kind][1])
    return list(KIND_LOADGEN.get(kind, ()))


def loadgen_cmd(env, port, size, conns, duration, warmup, pipeline=1, extra=(), server_pid=None,
                requests=None):
    cmd = [str(env.loadgen), "-P", str(port), "-c", str(conns), "-s", str(size),
           "-p", str(pipeline), "-w", str(warmup), "-j"]
    cmd += ["-n", str(requests)] if requests else ["-d", str(duration)]
    if server_pid:
        cmd += ["--server-pid", str(server_pid)]
    return cmd + list(extra)


def tls_path(loop, transport):
    """Which TLS implementation served a connection, from its transport type."""
    if not transport:
        return None
    if transport == "asyncio.sslproto._SSLProtocolTransport":
        return "sslproto"
    return "engine" if loop.startswith("kloop") else transport.rsplit(".", 1)[0]


def _note_tls(rec, server):
    info = server.read_tls_info()
    if info:
        rec["server_tls"] = info
        rec["tls_path"] = tls_path(rec["loop"], info.get("transport"))


def proc_status(pid):
    """(utime s, stime s, VmRSS kB) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        fields = data[data.rindex(")") + 2:].split()
        rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, rss


def _wrk_seconds(text):
    m = re.match(r"^([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        return None
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_wrk(text):
    """requests, seconds, errors and latency percentiles (µs) from wrk --latency."""
    out = {"latency_us": {}}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        out["requests"] = int(m.group(1))
        out["duration_s"] = _wrk_seconds(m.group(2) + m.group(3))
    for pct, val in re.findall(r"^\s+(50|75|90|99)(?:\.000)?%\s+(\S+)", text, re.M):
        v = _wrk_seconds(val)
        if v is not None:
            out["latency_us"][f"p{pct}"] = round(v * 1e6, 2)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                  text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    return out


def run_wrk(env, server, rec, conns, duration, warmup):
    """wrk against an HTTP(S) server (rec["kind"] is one of WRK_KINDS): a
    warm-up run, then the measured run with the server's CPU time and RSS
    read from /proc around it."""
    url = f"{WRK_KINDS[rec['kind']]}://127.0.0.1:{server.port}/"
    secs = max(1, round(duration))
    base = ["wrk", "-t1", f"-c{conns}"]
    if warmup > 0:
        subprocess.run(base + [f"-d{max(1, round(warmup))}s", url], capture_output=True,
                       timeout=warmup + 60, preexec_fn=_pin(CLIENT_CPU))
    cmd = base + [f"-d{secs}s", "--latency", url]
    rec["loadgen_cmd"] = " ".join(cmd)
    s0 = proc_status(server.pid)
    busy0, steal0 = cpu_totals()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60,
                           preexec_fn=_pin(CLIENT_CPU))
    except subprocess.TimeoutExpired:
        rec["error"] = "wrk timed out"
        return rec
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, steal1 = cpu_totals()
    s1 = proc_status(server.pid)
    res = parse_wrk(r.stdout)
    if r.returncode != 0 or not res.get("requests"):
        rec["error"] = f"wrk exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}"
        return rec
    n, dur = res["requests"], res["duration_s"]
    client = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rec.update(requests=n, duration_s=dur, rps=n / dur, latency_us=res["latency_us"],
               client={"util": round(client / wall, 4),
                       "cpu_us_per_req": round(client * 1e6 / n, 4)},
               wrk_socket_errors=res["socket_errors"], wrk_non_2xx=res["non_2xx"])
    if s0 and s1:
        su, ss = s1[0] - s0[0], s1[1] - s0[1]
        rec["server"] = {"pid": server.pid, "user_s": su, "sys_s": ss,
                         "util": round((su + ss) / wall, 4),
                         "cpu_us_per_req": (su + ss) * 1e6 / n,
                         "user_us_per_req": su * 1e6 / n, "sys_us_per_req": ss * 1e6 / n,
                         "rss_kb": s1[2]}
    machine = (busy1 - busy0) / CLK_TCK
    server_total = (s1[0] + s1[1] - s0[0] - s0[1]) if s0 and s1 else 0
    rec["other_cpu"] = round(max(0.0, machine - client - server_total) / wall, 4)
    rec["steal"] = round((steal1 - steal0) / CLK_TCK / wall, 4)
    if res["socket_errors"] or res["non_2xx"]:
        rec["error"] = (f"wrk: {res['socket_errors']} socket errors, "
                        f"{res['non_2xx']} non-2xx responses")
    if server.proc.poll() is not None:
        rec["error"] = f"server exited with {server.proc.returncode} during the run"
    return rec


def run_one(env, loop, kind, size, conns, duration, warmup, pipeline=1, loadgen_extra=(),
            log=None):
    """One measured run of one server; returns a result dict (with "error" on failure)."""
    rec = {"loop": loop, "kind": kind, "size": size, "conns": conns, "pipeline": pipeline,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    if kind in WRK_KINDS and loop in NATIVE:
        rec["error"] = f"n/a: the {loop} server does not speak HTTP"
        return rec
    try:
        server = Server(env, loop, kind, log)
    except BenchError as e:
        rec["error"] = str(e)
        return rec
    if kind in WRK_KINDS:
        try:
            run_wrk(env, server, rec, conns, duration, warmup)
            if kind in TLS_KINDS:
                _note_tls(rec, server)
            return rec
        finally:
            server.stop()
    loadgen_extra = kind_loadgen_args(kind) + list(loadgen_extra)
    try:
        cmd = loadgen_cmd(env, server.port, size, conns, duration, warmup, pipeline,
                          loadgen_extra, server.pid)
        rec["loadgen_cmd"] = " ".join(shlex.quote(c) for c in cmd)
        s_cpu0 = proc_cpu(server.pid)
        busy0, steal0 = cpu_totals()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=duration + warmup + 60, preexec_fn=_pin(CLIENT_CPU))
        except subprocess.TimeoutExpired:
            rec["error"] = "load generator timed out"
            return rec
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, steal1 = cpu_totals()
        s_cpu1 = proc_cpu(server.pid)
        if not r.stdout.strip():
            rec["error"] = f"loadgen exit {r.returncode}: {r.stderr.strip()[-300:]}"
            return rec
        res = json.loads(r.stdout)
        rec.update(res)
        if res.get("stalled"):
            rec["error"] = "the server stopped answering (no echo for 10 s)"
        elif r.returncode != 0:
            rec["error"] = f"loadgen exit {r.returncode}: {r.stderr.strip()[-300:]}"
        client_total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        server_total = (s_cpu1 - s_cpu0) if s_cpu0 is not None and s_cpu1 is not None else 0
        machine = (busy1 - busy0) / CLK_TCK
        rec["other_cpu"] = round(max(0.0, machine - client_total - server_total) / wall, 4)
        rec["steal"] = round((steal1 - steal0) / CLK_TCK / wall, 4)
        if res.get("dead_conns") or res.get("verify_errors"):
            rec["error"] = (f"{res.get('dead_conns')} connections failed "
                            f"({res.get('first_error')})")
        if server.proc.poll() is not None:
            rec["error"] = f"server exited with {server.proc.returncode} during the run"
        if kind in TLS_KINDS:
            _note_tls(rec, server)
        return rec
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Matrices of runs
# ---------------------------------------------------------------------------

def size_label(n):
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB" if n < 1 << 20 else f"{n >> 20} MiB"
    return f"{n} B"


def cell_label(kind, size, conns):
    if kind == "churn":
        return f"churn: connect, echo {size_label(size)}, close; {conns} at a time"
    if kind in WRK_KINDS:
        return f"{KIND_TITLE[kind]}, {conns} conn{'s' * (conns != 1)}"
    return f"{KIND_TITLE.get(kind, kind)}, {size_label(size)}, {conns} conn{'s' * (conns != 1)}"


def disturbance(rec, share):
    """Why run record `rec` is disturbed, or None: other processes used more
    than `share` of a core during it, or the hypervisor stole more than
    `share` of a core's time (on a shared VM both slow a run down at random,
    and stolen time does not show in /proc as another process's CPU)."""
    if "error" in rec:
        return None
    why = []
    if rec.get("other_cpu", 0) > share:
        why.append(f"other processes used {rec['other_cpu']:.0%} of a core")
    if rec.get("steal", 0) > share:
        why.append(f"the hypervisor stole {rec['steal']:.0%} of a core")
    return " and ".join(why) or None


def run_matrix(env, cells, loops, rounds, duration, warmup, pipeline=1, loadgen_extra=(),
               progress=None, log=None, quiet_wait=0.0, retries=0, disturbed=0.10):
    """Run every (cell, loop) `rounds` times, interleaved and rotated per round.

    cells: list of (kind, size, conns); kind "native" runs the native servers.
    quiet_wait: before each run, wait up to this many seconds for the machine
      to be idle (other processes < 10 % of a core).
    retries: run again (up to this many times) when the run was disturbed
      (disturbance(): other processes or the hypervisor took more than
      `disturbed` of a core during it); the last attempt is kept.
    Returns the list of run records (each with "round").
    """
    usable = [lp for lp in loops if env.availability(lp) is None]
    total = rounds * len(cells) * len(usable)
    records, done = [], 0
    for rnd in range(rounds):
        for cell in cells:
            kind, size, conns = cell
            order = usable[rnd % len(usable):] + usable[:rnd % len(usable)] if usable else []
            for loop in order:
                if progress:
                    progress(done, total, f"round {rnd + 1}/{rounds}: "
                             f"{cell_label(kind, size, conns)}: {loop}")
                for attempt in range(retries + 1):
                    waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
                    rec = run_one(env, loop, kind, size, conns, duration, warmup, pipeline,
                                  loadgen_extra, log)
                    rec["attempt"] = attempt
                    rec["quiet_wait"] = waited
                    why = disturbance(rec, disturbed)
                    if why is None:
                        break
                    if progress and attempt < retries:
                        progress(done, total, f"  {loop}: disturbed ({why}), again")
                rec["round"] = rnd
                records.append(rec)
                done += 1
                if progress:
                    if "error" in rec:
                        note = "FAILED: " + rec["error"][:120]
                    else:
                        note = (f"{rec['rps']:,.0f} req/s, "
                                f"{rec.get('server', {}).get('cpu_us_per_req', 0):.2f} us CPU/req")
                        if rec["other_cpu"] > 0.10:
                            note += f" (other processes used {rec['other_cpu']:.0%} of a core)"
                    progress(done, total, f"  {loop}: {note}")
    return records


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records, cells, loops, ratio_pairs):
    """Per cell: per loop median/min/max of rps, CPU/req, p99, RSS; ratios per round."""
    rows = []
    for cell in cells:
        kind, size, conns = cell
        row = {"kind": kind, "size": size, "conns": conns, "loops": {}, "ratios": {}}
        ok = [r for r in records if (r["kind"], r["size"], r["conns"]) == cell and "error" not in r]
        for loop in loops:
            runs = [r for r in ok if r["loop"] == loop]
            failed = [r for r in records if (r["kind"], r["size"], r["conns"]) == cell
                      and r["loop"] == loop and "error" in r]
            if not runs:
                row["loops"][loop] = {"n": 0, "error": failed[0]["error"] if failed else None}
                continue
            rps = [r["rps"] for r in runs]
            srv = [r.get("server", {}) for r in runs]
            row["loops"][loop] = {
                "n": len(runs),
                "failed": len(failed),
                "rps": _med(rps), "rps_min": min(rps), "rps_max": max(rps),
                "cpu_us": _med([s.get("cpu_us_per_req") for s in srv]),
                "user_us": _med([s.get("user_us_per_req") for s in srv]),
                "sys_us": _med([s.get("sys_us_per_req") for s in srv]),
                "server_util": _med([s.get("util") for s in srv]),
                "client_util": _med([r["client"]["util"] for r in runs]),
                "p50": _med([r["latency_us"].get("p50") for r in runs]),
                "p99": _med([r["latency_us"].get("p99") for r in runs]),
                "p999": _med([r["latency_us"].get("p999") for r in runs]),
                "rss_kb": _med([s.get("rss_kb") for s in srv]),
                "other_cpu_max": max(r["other_cpu"] for r in runs),
            }
            if kind in TLS_KINDS:
                d = row["loops"][loop]
                d["tls_path"] = sorted({r.get("tls_path") or "?" for r in runs})
                d["transport"] = sorted({r.get("server_tls", {}).get("transport") or "?"
                                         for r in runs})
                d["cipher"] = sorted({"{version} {cipher}".format(**r["server_tls"])
                                      for r in runs if r.get("server_tls")})
        for a, b in ratio_pairs:
            per_round = []
            cpu_round = []
            for rnd in sorted({r["round"] for r in ok}):
                ra = [r for r in ok if r["loop"] == a and r["round"] == rnd]
                rb = [r for r in ok if r["loop"] == b and r["round"] == rnd]
                if ra and rb and rb[0]["rps"] > 0:
                    per_round.append(ra[0]["rps"] / rb[0]["rps"])
                    ca = ra[0].get("server", {}).get("cpu_us_per_req")
                    cb = rb[0].get("server", {}).get("cpu_us_per_req")
                    if ca and cb:
                        cpu_round.append(ca / cb)
            if per_round:
                row["ratios"][f"{a}/{b}"] = {
                    "rps": _med(per_round), "min": min(per_round), "max": max(per_round),
                    "cpu": _med(cpu_round),
                }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Syscall counts (untimed)
# ---------------------------------------------------------------------------

def parse_strace_summary(text):
    """{syscall: calls} from the table `strace -c` writes."""
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and re.match(r"^[\d.]+$", parts[0]) and parts[-1] != "total":
            # % time, seconds, usecs/call, calls, [errors], syscall
            try:
                calls = int(parts[3])
            except ValueError:
                continue
            counts[parts[-1]] = calls
    return counts


def syscall_run(env, loop, kind, size, conns, requests, log=None):
    """strace -c -f the running server while `requests` echoes go through."""
    rec = {"loop": loop, "kind": kind, "size": size, "conns": conns, "requests": requests}
    try:
        server = Server(env, loop, kind, log)
    except BenchError as e:
        rec["error"] = str(e)
        return rec
    out = tempfile.NamedTemporaryFile(prefix="kloop-strace-", suffix=".txt", delete=False)
    out.close()
    st = None
    try:
        errf = tempfile.TemporaryFile(mode="w+")
        st = subprocess.Popen(["strace", "-c", "-f", "-o", out.name, "-p", str(server.pid)],
                              stdout=subprocess.DEVNULL, stderr=errf, text=True)
        time.sleep(1.0)  # let strace attach to every thread
        if st.poll() is not None:
            errf.seek(0)
            rec["error"] = "strace failed: " + errf.read().strip()[-200:]
            return rec
        extra = kind_loadgen_args(kind)
        if extra is None:
            rec["error"] = "no syscall count for a wrk cell"
            return rec
        cmd = loadgen_cmd(env, server.port, size, conns, 0, 0, extra=extra, requests=requests)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                               preexec_fn=_pin(CLIENT_CPU))
        except subprocess.TimeoutExpired:
            rec["error"] = "load generator timed out under strace"
            return rec
        st.send_signal(signal.SIGINT)
        st.wait(30)
        if r.returncode != 0:
            rec["error"] = f"loadgen exit {r.returncode}: {r.stderr.strip()[-200:]}"
            return rec
        res = json.loads(r.stdout)
        counts = parse_strace_summary(Path(out.name).read_text())
        n = res["requests"]
        rec["measured_requests"] = n
        rec["counts"] = counts
        rec["per_request"] = {k: v / n for k, v in counts.items()}
        rec["total_per_request"] = sum(counts.values()) / n
        rec["io_uring_enter_per_request"] = counts.get("io_uring_enter", 0) / n
        rec["loadgen_cmd"] = " ".join(cmd)
        return rec
    finally:
        if st is not None and st.poll() is None:
            st.send_signal(signal.SIGINT)
            try:
                st.wait(30)
            except subprocess.TimeoutExpired:
                st.kill()
                st.wait()
        server.stop()
        os.unlink(out.name)


def idle_run(env, loop, kind, conns, size=1024, hold=1.0, log=None):
    """Server RSS growth per idle connection (loadgen --idle)."""
    rec = {"loop": loop, "kind": kind, "conns": conns, "size": size}
    if kind in WRK_KINDS:
        rec["error"] = "no idle-connection count for a wrk cell"
        return rec
    try:
        server = Server(env, loop, kind, log)
    except BenchError as e:
        rec["error"] = str(e)
        return rec
    try:
        time.sleep(0.3)  # let start-up allocations settle
        cmd = [str(env.loadgen), "-P", server.port, "-c", str(conns), "-s", str(size),
               "--idle", str(hold), "--server-pid", str(server.pid), "-j"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           preexec_fn=_pin(CLIENT_CPU))
        if r.returncode != 0 or not r.stdout.strip():
            rec["error"] = f"loadgen exit {r.returncode}: {r.stderr.strip()[-200:]}"
            return rec
        rec.update(json.loads(r.stdout))
        rec["loadgen_cmd"] = " ".join(cmd)
        return rec
    finally:
        server.stop()


def profile_run(env, loop, kind, size, conns, duration, log=None):
    """Where a server's CPU time goes: perf (share per binary) and cProfile.

    Two runs: one under `perf record -e cpu-clock` (kernel, interpreter,
    libkloop, CFFI, ... as shares of the server's samples), one under
    cProfile (Python-level function calls per request, top functions by
    own time). Neither is timed: profilers slow the server down.
    """
    rec = {"loop": loop, "kind": kind, "size": size, "conns": conns}
    if kind in WRK_KINDS:
        rec["error"] = "no profile of a wrk cell (the load generator drives the profiled runs)"
        return rec
    with tempfile.TemporaryDirectory(prefix="kloop-prof-") as tmp:
        # 1. perf: shares per DSO of the server's CPU samples
        try:
            server = Server(env, loop, kind, log)
        except BenchError as e:
            rec["error"] = str(e)
            return rec
        data = os.path.join(tmp, "perf.data")
        perf = None
        try:
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999",
                                     "-p", str(server.pid), "-o", data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            cmd = loadgen_cmd(env, server.port, size, conns, duration, 0.3,
                              extra=kind_loadgen_args(kind) or (), server_pid=server.pid)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60,
                               preexec_fn=_pin(CLIENT_CPU))
            if r.stdout.strip():
                res = json.loads(r.stdout)
                rec["rps_under_perf"] = res["rps"]
                rec["server_under_perf"] = res.get("server")
        except (OSError, subprocess.SubprocessError) as e:
            rec["perf_error"] = str(e)
        finally:
            if perf is not None and perf.poll() is None:
                perf.send_signal(signal.SIGINT)
                perf.wait(30)
            server.stop()
        rep_out = _cmd_out(["perf", "report", "-i", data, "--no-children", "--sort", "dso",
                            "-g", "none", "--stdio"])
        shares = {}
        for line in rep_out.splitlines():
            m = re.match(r"^\s*([\d.]+)%\s+(\S+)", line)
            if m:
                shares[m.group(2)] = float(m.group(1))
        rec["perf_dso_shares"] = shares
        sym_out = _cmd_out(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym",
                            "-g", "none", "--stdio"])
        syms = []
        for line in sym_out.splitlines():
            m = re.match(r"^\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.+)$", line)
            if m and len(syms) < 25:
                syms.append((float(m.group(1)), m.group(2), m.group(3).strip()))
        rec["perf_top_symbols"] = syms

        # 2. cProfile: Python calls per request (Python servers only)
        if LOOP_VARIANTS.get(loop, (loop,))[0] in PY_LOOPS:
            prof = os.path.join(tmp, "prof.out")
            cmdline = env.server_cmd(loop, kind) + ["--profile", prof]
            proc = subprocess.Popen(cmdline, env=env.server_env(loop), stdout=subprocess.PIPE,
                                    stderr=log, text=True, preexec_fn=_pin(SERVER_CPU))
            try:
                line = proc.stdout.readline()
                if line.startswith("READY"):
                    n = 20000
                    cmd = loadgen_cmd(env, line.split()[1], size, conns, 0, 0,
                                      extra=kind_loadgen_args(kind) or (), requests=n)
                    subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                   preexec_fn=_pin(CLIENT_CPU))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            if os.path.exists(prof):
                import pstats
                st = pstats.Stats(prof)
                calls = sum(v[1] for v in st.stats.values())
                rec["python_calls_per_request"] = calls / n
                top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]
                rec["python_top"] = [
                    {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls_per_request": v[1] / n,
                     "own_s": v[2]} for k, v in top]
    return rec


def profile_markdown(recs):
    out = []
    dsos = ["[kernel.kallsyms]", "python3.11", "libkloop", "_cffi_api", "_cffi_backend", "libffi",
            "libc", "libssl", "libcrypto", "libuv", "loop.cpython"]
    head = ["server"] + [d.strip("[]").split(".")[0] for d in dsos] + ["other", "Python calls/req"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" + "---:|" * (len(head) - 1))
    for r in recs:
        name = r["loop"] if r["kind"] == "native" else f"{r['loop']} ({r['kind']})"
        if "error" in r:
            out.append(f"| {name} | " + " | ".join(["n/a"] * (len(head) - 1)) + " |")
            continue
        shares = r.get("perf_dso_shares", {})
        row, used = [name], 0.0
        for d in dsos:
            # "libc" is libc.so.6, not libcrypto.so.3: the name ends there
            v = sum(pct for k, pct in shares.items()
                    if k == d or k.startswith((d + ".", d + "-")))
            used += v
            row.append(f"{v:.0f} %" if v else "–")
        row.append(f"{max(0.0, sum(shares.values()) - used):.0f} %")
        cpr = r.get("python_calls_per_request")
        row.append("–" if cpr is None else f"{cpr:.1f}")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


LOADGEN_VARIANTS = {"uring (multishot recv)": [], "uring (one-shot recv)": ["--single-recv"],
                    "epoll": ["-e", "epoll"]}


def loadgen_compare(env, size, conns, depths, rounds, duration, warmup, quiet_wait=0.0,
                    progress=None):
    """The load generator's own cost: its engines against one echo_epoll server.

    The C epoll server is about as cheap per request as a client can be, so
    this shows how much CPU per request the load generator needs and where
    it, not the server, becomes the limit.
    """
    server = Server(env, "epoll", "native", None)
    recs = []
    try:
        total = rounds * len(depths) * len(LOADGEN_VARIANTS)
        for rnd in range(rounds):
            for depth in depths:
                for name, extra in LOADGEN_VARIANTS.items():
                    if quiet_wait:
                        wait_quiet(quiet_wait)
                    cmd = loadgen_cmd(env, server.port, size, conns, duration, warmup, depth,
                                      extra, server.pid)
                    b0, _ = cpu_totals()
                    t0 = time.monotonic()
                    r = subprocess.run(cmd, capture_output=True, text=True,
                                       timeout=duration + warmup + 60,
                                       preexec_fn=_pin(CLIENT_CPU))
                    b1, _ = cpu_totals()
                    rec = {"variant": name, "pipeline": depth, "round": rnd,
                           "loadgen_cmd": " ".join(cmd)}
                    if r.returncode != 0 or not r.stdout.strip():
                        rec["error"] = f"loadgen exit {r.returncode}: {r.stderr.strip()[-200:]}"
                    else:
                        rec.update(json.loads(r.stdout))
                        wall = time.monotonic() - t0
                        rec["other_cpu"] = round(max(0.0, (b1 - b0) / CLK_TCK / wall
                                                     - rec["client"]["util"]
                                                     - rec["server"]["util"]), 4)
                    recs.append(rec)
                    if progress:
                        progress(len(recs) - 1, total, f"{name}, pipeline {depth}: "
                                 + (rec.get("error") or f"{rec['rps']:,.0f} req/s"))
    finally:
        server.stop()
    return recs


def loadgen_markdown(recs):
    out = ["| load generator | pipeline | req/s | client CPU µs/req | client util | "
           "server CPU µs/req | server util | p99 µs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = []
    for r in recs:
        if (r["variant"], r["pipeline"]) not in keys:
            keys.append((r["variant"], r["pipeline"]))
    for name, depth in sorted(keys, key=lambda k: k[1]):
        ds = [r for r in recs
              if (r["variant"], r["pipeline"]) == (name, depth) and "error" not in r]
        if not ds:
            out.append(f"| {name} | {depth} | n/a | | | | | |")
            continue

        def med(f):
            return statistics.median(f(d) for d in ds)
        out.append(f"| {name} | {depth} | {med(lambda d: d['rps']) / 1000:,.0f}k | "
                   f"{med(lambda d: d['client']['cpu_us_per_req']):.2f} | "
                   f"{med(lambda d: d['client']['util']):.2f} | "
                   f"{med(lambda d: d['server']['cpu_us_per_req']):.2f} | "
                   f"{med(lambda d: d['server']['util']):.2f} | "
                   f"{med(lambda d: d['latency_us']['p99']):.0f} |")
    return "\n".join(out)


def memory_markdown(recs, counts):
    """RSS growth per idle connection at each count, and per further
    connection between the first and the last count (the difference of the
    two growths of the same round, divided by the difference of counts)."""
    lo, hi = counts[0], counts[-1]
    head = ["server", "RSS before, MiB"] + [f"KiB per connection, {c} conns" for c in counts]
    if hi > lo:
        head.append(f"KiB per further connection, {lo} → {hi}")
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    names = []
    for r in recs:
        key = (r["loop"], r["kind"])
        if key not in names:
            names.append(key)

    def fmt(vals, digits=2):
        if not vals:
            return "n/a"
        med = statistics.median(vals)
        if len(vals) == 1:
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})"

    for loop, kind in names:
        name = loop if kind == "native" else f"{loop} ({kind})"
        mine = [r for r in recs if (r["loop"], r["kind"]) == (loop, kind)]
        good = [r for r in mine if "error" not in r]
        if not good:
            out.append(f"| {name} | " + " | ".join(["n/a"] * (len(head) - 1)) + " |")
            continue
        row = [name, fmt([r["rss_kb_before"] / 1024 for r in good], 1)]
        for c in counts:
            row.append(fmt([r["rss_kb_per_conn"] for r in good if r["conns"] == c]))
        if hi > lo:
            further = []
            for rnd in sorted({r.get("round", 0) for r in good}):
                a = [r for r in good if r.get("round", 0) == rnd and r["conns"] == lo]
                b = [r for r in good if r.get("round", 0) == rnd and r["conns"] == hi]
                if a and b:
                    ga = a[0]["rss_kb_after"] - a[0]["rss_kb_before"]
                    gb = b[0]["rss_kb_after"] - b[0]["rss_kb_before"]
                    further.append((gb - ga) / (hi - lo))
            row.append(fmt(further))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# In-process suites: scheduling micro-benchmarks, subprocess spawn rate
# ---------------------------------------------------------------------------

# What a suite reports: the per-operation figure of its table, and whether a
# ratio above 1 means kloop is faster (a rate) or slower (a time).
INPROC = {
    "micro": {"title": "ns per operation", "higher_is_better": False},
    "spawn": {"title": "subprocesses per second", "higher_is_better": True},
}
INPROC_TITLE = {
    "call_soon": "call_soon chain (one callback)",
    "call_later": "call_later + cancel",
    "sleep0": "`await asyncio.sleep(0)` in a task",
    "future_pingpong": "future ping-pong between two tasks (one round trip)",
    "create_task": "create_task + await of a trivial coroutine",
    "sequential": "`create_subprocess_exec('/bin/true')` + `wait()`, one at a time",
    "concurrent8": "the same, 8 at a time (`gather`)",
}


def inproc_run(env, loop, suite, scale, log=None):
    """One process of benchmarks/servers/micro.py on `loop`, pinned to
    SERVER_CPU; its results plus the CPU other processes used meanwhile."""
    rec = {"loop": loop, "suite": suite, "scale": scale,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    base = LOOP_VARIANTS[loop][0] if loop in LOOP_VARIANTS else loop
    cmd = [env.python, str(MICRO_RUNNER), "--loop", base, "--suite", suite,
           "--scale", f"{scale:g}"]
    rec["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    busy0, steal0 = cpu_totals()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=env.server_env(loop), capture_output=True, text=True,
                           timeout=600, preexec_fn=_pin(SERVER_CPU))
    except subprocess.TimeoutExpired:
        rec["error"] = "timed out"
        return rec
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, steal1 = cpu_totals()
    if log is not None and r.stderr:
        log.write(r.stderr)
        log.flush()
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        rec["error"] = f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
        return rec
    if "unavailable" in res:
        rec["error"] = "n/a: " + res["unavailable"]
        return rec
    if r.returncode != 0:
        rec["error"] = f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
        return rec
    rec["results"] = res["results"]
    # The runner and what it waited for (the spawned children) against the
    # whole machine: the rest is other processes' share of a core.
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rec["wall_s"] = round(wall, 3)
    rec["other_cpu"] = round(max(0.0, (busy1 - busy0) / CLK_TCK - own) / wall, 4)
    rec["steal"] = round((steal1 - steal0) / CLK_TCK / wall, 4)
    return rec


def inproc_matrix(env, suite, loops, rounds, scale, progress=None, log=None,
                  quiet_wait=0.0, retries=0, disturbed=0.10):
    """Every loop once per round, the order rotated each round (as run_matrix)."""
    usable = [lp for lp in loops if env.availability(lp) is None]
    total, records = rounds * len(usable), []
    for rnd in range(rounds):
        order = usable[rnd % len(usable):] + usable[:rnd % len(usable)] if usable else []
        for loop in order:
            if progress:
                progress(len(records), total, f"round {rnd + 1}/{rounds}: {suite}: {loop}")
            for attempt in range(retries + 1):
                waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
                rec = inproc_run(env, loop, suite, scale, log)
                rec["attempt"], rec["quiet_wait"] = attempt, waited
                if disturbance(rec, disturbed) is None:
                    break
            rec["round"] = rnd
            records.append(rec)
            if progress:
                if "error" in rec:
                    note = "FAILED: " + rec["error"][:120]
                else:
                    key = "ops_per_s" if INPROC[suite]["higher_is_better"] else "ns_per_op"
                    note = ", ".join(f"{k} {v[key]:,.0f}" for k, v in rec["results"].items())
                    note += " (" + ("per s" if key == "ops_per_s" else "ns/op") + ")"
                    if rec["other_cpu"] > 0.10:
                        note += f" (other processes used {rec['other_cpu']:.0%} of a core)"
                progress(len(records) - 1, total, f"  {loop}: {note}")
    return records


def summarize_inproc(records, suite, loops, ratio_pairs):
    """Per benchmark and loop: median (min, max) of the suite's figure and of
    the CPU per operation; ratios a/b computed within each round."""
    key = "ops_per_s" if INPROC[suite]["higher_is_better"] else "ns_per_op"
    ok = [r for r in records if "error" not in r]
    names = []
    for r in ok:
        names += [n for n in r["results"] if n not in names]
    rows = []
    for name in names:
        row = {"bench": name, "key": key, "loops": {}, "ratios": {}}
        for loop in loops:
            vals = [r["results"][name] for r in ok if r["loop"] == loop and name in r["results"]]
            if not vals:
                errs = [r["error"] for r in records if r["loop"] == loop and "error" in r]
                row["loops"][loop] = {"n": 0, "error": errs[0] if errs else None}
                continue
            v = [x[key] for x in vals]
            row["loops"][loop] = {
                "n": len(vals), "value": _med(v), "min": min(v), "max": max(v),
                "ns_per_op": _med([x["ns_per_op"] for x in vals]),
                "cpu_ns_per_op": _med([x["cpu_ns_per_op"] for x in vals]),
                "children_cpu_ns_per_op": _med([x["children_cpu_ns_per_op"] for x in vals]),
            }
        for a, b in ratio_pairs:
            per_round = []
            for rnd in sorted({r["round"] for r in ok}):
                ra = [r for r in ok if r["loop"] == a and r["round"] == rnd]
                rb = [r for r in ok if r["loop"] == b and r["round"] == rnd]
                if ra and rb and name in ra[0]["results"] and name in rb[0]["results"]:
                    per_round.append(ra[0]["results"][name][key] / rb[0]["results"][name][key])
            if per_round:
                row["ratios"][f"{a}/{b}"] = {"value": _med(per_round), "min": min(per_round),
                                             "max": max(per_round)}
        rows.append(row)
    return rows


def _fmt_range(d, scale=1.0, digits=0):
    return (f"{d['value'] * scale:,.{digits}f} ({d['min'] * scale:,.{digits}f}–"
            f"{d['max'] * scale:,.{digits}f})")


def inproc_markdown(rows, suite, loops, ratio_pairs):
    """The micro or spawn table: the figure per loop, the ratios, and for
    micro whether kloop meets its target (no slower than stock asyncio)."""
    better = INPROC[suite]["higher_is_better"]
    unit = "spawns/s" if better else "ns/op"
    target = suite == "micro" and "kloop" in loops and "asyncio" in loops
    head = (["benchmark"] + [f"{lp} {unit}" for lp in loops]
            + [f"{a}/{b}" for a, b in ratio_pairs]
            + (["kloop ≤ asyncio?"] if target else []))
    out = ["| " + " | ".join(head) + " |",
           "|---|" + "---:|" * (len(head) - 1 - target) + "---|" * target]
    for row in rows:
        cells = [INPROC_TITLE.get(row["bench"], row["bench"])]
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") else _fmt_range(d))
        for a, b in ratio_pairs:
            rt = row["ratios"].get(f"{a}/{b}")
            cells.append("n/a" if not rt else
                         f"{rt['value']:.2f}× ({rt['min']:.2f}–{rt['max']:.2f})")
        if target:
            rt = row["ratios"].get("kloop/asyncio")
            cells.append("n/a" if not rt else ("yes" if rt["value"] <= 1.0 else "**no**"))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    if better:
        head = (["benchmark"] + [f"{lp} µs/spawn (wall)" for lp in loops]
                + [f"{lp} CPU µs/spawn: loop process / children" for lp in loops])
    else:
        head = ["benchmark"] + [f"{lp} CPU ns/op" for lp in loops]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|" + "---:|" * (len(head) - 1))
    for row in rows:
        cells = [INPROC_TITLE.get(row["bench"], row["bench"])]
        for lp in loops:
            d = row["loops"].get(lp, {})
            if not d.get("n"):
                cells.append("n/a")
            elif better:
                cells.append(f"{d['ns_per_op'] / 1000:,.0f}")
            else:
                cells.append(f"{d['cpu_ns_per_op']:,.0f}")
        if better:
            for lp in loops:
                d = row["loops"].get(lp, {})
                cells.append("n/a" if not d.get("n") else
                             f"{d['cpu_ns_per_op'] / 1000:,.0f} / "
                             f"{d['children_cpu_ns_per_op'] / 1000:,.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def inproc_main(env, args, meta, loops, log):
    """The micro and spawn tiers: run, summarize, print, --doc."""
    suite = args.tier
    rounds = args.rounds or 3
    scale = args.scale
    pairs = [(a, b) for a, b in (("kloop", "asyncio"), ("kloop", "uvloop"),
                                 ("uvloop", "asyncio")) if a in loops and b in loops]
    print(f"run.py: {suite}: {len(loops)} loops x {rounds} rounds, one process each",
          file=sys.stderr)
    records = inproc_matrix(env, suite, loops, rounds, scale, progress=stderr_progress,
                            log=log, quiet_wait=args.wait_quiet, retries=args.retries,
                            disturbed=args.disturbed)
    meta["loadavg_end"] = loadavg()
    rows = summarize_inproc(records, suite, loops, pairs)
    payload = {"tier": suite, "meta": meta, "rounds": rounds, "scale": scale,
               "runs": records, "summary": rows}
    path = Path(args.json_out) if args.json_out else save_json(suite, payload)
    if args.json_out:
        path.write_text(json.dumps(payload, indent=1))
    table = inproc_markdown(rows, suite, loops, pairs)
    notes = unavailable_notes(env, loops)
    interf = interference_note(records, args.nice)
    if suite == "micro":
        reading = ("Ratios are of the time per operation, computed within each round: "
                   "below 1.00× the first loop is faster (kloop/asyncio 0.80× = kloop "
                   "needs 80 % of asyncio's time). Target of the issue: kloop no slower "
                   "than stock asyncio (kloop/asyncio ≤ 1.00×); uvloop, whose loop core "
                   "is compiled Cython, is expected to be faster than both.")
    else:
        reading = ("Ratios are of the spawn rates, computed within each round: above "
                   "1.00× the first loop spawns faster. The loop process and every child "
                   "run on CPU 0 (children inherit the affinity); the CPU time of the "
                   "children (fork/exec of `/bin/true`) is shown apart from the loop "
                   "process's own.")
    print(table)
    print("\n" + reading)
    if notes:
        print("\n".join(notes))
    print(interf)
    if args.doc:
        ops = ", ".join(f"{k} {max(1, int(n * scale)):,}" for k, n in _runner_sizes(env, suite))
        body = (f"Measured {meta['date']}: kernel {meta['kernel']}, {meta['cpu']} "
                f"({meta['cpus']} CPUs), Python {meta['python']}, uvloop {meta['uvloop']}, "
                f"liburing {meta['liburing']}, commit {meta['commit']}. {rounds} interleaved "
                f"rounds, one fresh process per loop and round pinned to CPU {SERVER_CPU}; "
                f"operations per benchmark after a warm-up of a tenth as many: {ops}; "
                f"median (min–max); " + (f"nice {args.nice}; " if args.nice else "")
                + f"load average at start {meta['loadavg_start'][0]:.2f}.\n\n"
                f"`{meta['command']}`\n\n{table}\n\n{reading}\n")
        if notes:
            body += "\n" + "\n".join(notes) + "\n"
        if interf:
            body += "\n" + interf + "\n"
        write_doc_section(args.section or suite, body)
    print(f"run.py: results in {path}", file=sys.stderr)
    return 0


def _runner_sizes(env, suite):
    """(name, operations) of a suite's benchmarks, read from the runner itself."""
    out = _cmd_out([env.python, "-c",
                    "import json, sys; sys.path.insert(0, sys.argv[1]); import micro; "
                    "print(json.dumps({k: v[1] for k, v in micro.SUITES[sys.argv[2]].items()}))",
                    str(MICRO_RUNNER.parent), suite])
    try:
        return list(json.loads(out).items())
    except ValueError:
        return []


# ---------------------------------------------------------------------------
# Metadata and output
# ---------------------------------------------------------------------------

def _cmd_out(cmd, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def metadata(env):
    py = _cmd_out([env.python, "-c", "import sys; print(sys.version.split()[0])"])
    uv = _cmd_out([env.python, "-c", "import uvloop; print(uvloop.__version__)"])
    kl = _cmd_out([env.python, "-c", "import kloop; print(getattr(kloop, '__version__', '?'))"],
                  env=env.server_env())
    ffi = _cmd_out([env.python, "-c", "from kloop import _ffi; print(_ffi.MODE)"],
                   env=env.server_env())
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [PYTHON] + sys.argv),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": py,
        "uvloop": uv or None,
        "kloop": kl or None,
        "kloop_ffi": ffi or None,  # the CFFI mode of the plain kloop server
        "liburing": _cmd_out(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"]) or None,
        "commit": commit + ("-dirty" if dirty else ""),
        "build": str(env.build),
        "loadavg_start": loadavg(),
    }


def fmt_rps(d):
    if not d or not d.get("n"):
        return "n/a"
    return f"{d['rps'] / 1000:,.1f}k ({d['rps_min'] / 1000:,.1f}–{d['rps_max'] / 1000:,.1f})"


def fmt_ratio(rt):
    if not rt:
        return "n/a"
    return f"{rt['rps']:.2f}× ({rt['min']:.2f}–{rt['max']:.2f})"


def fmt_num(v, digits=1):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def markdown_tables(rows, loops, ratio_pairs, title_kind=True, unit="req", shares=False):
    """Markdown: throughput with ratios, then CPU/latency/RSS. unit: what one
    request is called ("conn" for the churn tier, where it is a connection).
    shares: also the share of a core used by server and client (whether the
    server or the client is the limit: wrk has one thread on one core)."""
    out = []
    head = ["cell"] + [f"{lp} {unit}/s" for lp in loops] + [f"{a}/{b}" for a, b in ratio_pairs]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" + "---:|" * (len(head) - 1))
    for row in rows:
        label = cell_label(row["kind"], row["size"], row["conns"]) if title_kind else \
            f"{size_label(row['size'])}, {row['conns']} conns"
        cells = [label] + [fmt_rps(row["loops"].get(lp)) for lp in loops]
        cells += [fmt_ratio(row["ratios"].get(f"{a}/{b}")) for a, b in ratio_pairs]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    head = ["cell"] + [f"{lp} CPU µs/{unit} (user+sys)" for lp in loops] + \
        [f"{a}/{b} CPU" for a, b in ratio_pairs[:1]] + \
        [f"{lp}: share of a core, server / client" for lp in loops if shares] + \
        [f"{lp} p50 / p99 µs" for lp in loops] + [f"{lp} RSS MiB" for lp in loops]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" + "---:|" * (len(head) - 1))
    for row in rows:
        label = cell_label(row["kind"], row["size"], row["conns"]) if title_kind else \
            f"{size_label(row['size'])}, {row['conns']} conns"
        cells = [label]
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") else
                         f"{d['cpu_us']:.2f} ({d['user_us']:.2f}+{d['sys_us']:.2f})")
        for a, b in ratio_pairs[:1]:
            rt = row["ratios"].get(f"{a}/{b}")
            cells.append("n/a" if not rt or rt.get("cpu") is None else f"{rt['cpu']:.2f}×")
        for lp in loops if shares else ():
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") or d.get("server_util") is None else
                         f"{d['server_util']:.0%} / {d['client_util']:.0%}")
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") else f"{d['p50']:.0f} / {d['p99']:.0f}")
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") or not d.get("rss_kb") else
                         f"{d['rss_kb'] / 1024:.1f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ablation_markdown(rows, ratio_pairs):
    """One row per switched-off feature: per cell, its requests per second
    and server CPU per request as a ratio to kloop with every feature on, in
    the same round (below 1.00x req/s, or above 1.00x CPU: the feature helps)."""
    head = ["feature switched off", "instead"] + \
        [cell_label(r["kind"], r["size"], r["conns"]) + ": req/s, CPU/req vs kloop"
         for r in rows]
    out = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(rows)]
    for a, b in ratio_pairs:
        _, what, instead = ABLATIONS[a]
        cells = [f"{what} (`{a}`)", instead]
        for r in rows:
            rt = r["ratios"].get(f"{a}/{b}")
            if not rt:
                cells.append("n/a")
                continue
            cpu = "n/a" if rt.get("cpu") is None else f"{rt['cpu']:.2f}×"
            cells.append(f"{fmt_ratio(rt)}, {cpu}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("| cell | kloop req/s | kloop CPU µs/req (user+sys) |")
    out.append("|---|---:|---:|")
    for r in rows:
        d = r["loops"].get("kloop", {})
        cpu = "n/a" if not d.get("n") else \
            f"{d['cpu_us']:.2f} ({d['user_us']:.2f}+{d['sys_us']:.2f})"
        out.append(f"| {cell_label(r['kind'], r['size'], r['conns'])} | {fmt_rps(d)} | {cpu} |")
    return "\n".join(out)


def _paths(rows, loop):
    out = []
    for row in rows:
        for p in row["loops"].get(loop, {}).get("tls_path", []):
            if p not in out:
                out.append(p)
    return out


def tls_markdown(rows, loops, ratio_pairs):
    """The TLS tier's tables: like markdown_tables, plus the TLS path kloop
    took per cell, the CPU shares of server and load generator (which of the
    two is the limit) and the negotiated cipher."""
    kls = [lp for lp in loops if lp.startswith("kloop")]
    names = {lp: lp for lp in loops}
    for lp in kls:
        paths = _paths(rows, lp)
        if len(paths) == 1:
            names[lp] = f"{lp} ({paths[0]})"
    out = []
    head = (["cell"] + [f"{names[lp]} req/s" for lp in loops]
            + [f"{a}/{b}" for a, b in ratio_pairs]
            + [f"{lp} TLS path" for lp in kls])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" + "---:|" * (len(head) - 1 - len(kls)) + "---|" * len(kls))
    for row in rows:
        cells = [cell_label(row["kind"], row["size"], row["conns"])]
        cells += [fmt_rps(row["loops"].get(lp)) for lp in loops]
        cells += [fmt_ratio(row["ratios"].get(f"{a}/{b}")) for a, b in ratio_pairs]
        for lp in kls:
            cells.append(", ".join(row["loops"].get(lp, {}).get("tls_path", [])) or "n/a")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    head = (["cell"] + [f"{names[lp]} CPU µs/req (user+sys)" for lp in loops]
            + [f"{a}/{b} CPU" for a, b in ratio_pairs[:1]]
            + [f"{lp}: share of a core, server / client" for lp in loops]
            + [f"{lp} p50 / p99 µs" for lp in loops])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" + "---:|" * (len(head) - 1))
    for row in rows:
        cells = [cell_label(row["kind"], row["size"], row["conns"])]
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") else
                         f"{d['cpu_us']:.1f} ({d['user_us']:.1f}+{d['sys_us']:.1f})")
        for a, b in ratio_pairs[:1]:
            rt = row["ratios"].get(f"{a}/{b}")
            cells.append("n/a" if not rt or rt.get("cpu") is None else f"{rt['cpu']:.2f}×")
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") or d.get("server_util") is None else
                         f"{d['server_util']:.0%} / {d['client_util']:.0%}")
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append("n/a" if not d.get("n") or d.get("p50") is None else
                         f"{d['p50']:.0f} / {d['p99']:.0f}")
        out.append("| " + " | ".join(cells) + " |")
    ciphers = []
    for row in rows:
        cs = sorted({c for lp in loops for c in row["loops"].get(lp, {}).get("cipher", [])})
        if cs:
            ciphers.append(f"{cell_label(row['kind'], row['size'], row['conns'])}: "
                           + ", ".join(cs))
    transports = sorted({f"{lp}: {', '.join(row['loops'][lp].get('transport', []))}"
                         for row in rows for lp in loops if row["loops"].get(lp, {}).get("n")})
    out.append("")
    out.append("Negotiated (as the server reported it): " + "; ".join(ciphers) + ".")
    out.append("")
    out.append("Transport handed to the protocol: " + "; ".join(transports) + ".")
    return "\n".join(out)


# Issue 5's target: kloop at 1.25x uvloop's requests per second. The tiers
# whose cells that target is about get a dashed line at it in their chart.
TARGET_RATIO = 1.25
TARGET_TIERS = ("quick", "full", "custom", "http")
NO_MATPLOTLIB = ("matplotlib is not installed, so no chart: apt-get install python3-matplotlib "
                 "(scripts/setup.sh installs it)")


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def chart_png(payload, path):
    """Draw a matrix run's ratios as a PNG at path: per cell, one bar per
    ratio of row["ratios"] (median of the per-round ratios of req/s, min-max
    as error bar), a line at 1.0 and, for the tiers of the target table, a
    dashed one at TARGET_RATIO. Returns path, or None when the summary has no
    ratio to draw. Needs matplotlib (Agg backend: no display)."""
    import textwrap
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, meta, tier = payload["summary"], payload["meta"], payload["tier"]
    keys = list(dict.fromkeys(k for row in rows for k in row["ratios"]))
    if not keys:
        return None
    n, k = len(rows), len(keys)
    many = n > 12
    fig = Figure(figsize=(min(40.0, max(7.0, 1.5 + n * (0.45 * k + 0.35))), 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / k
    for i, key in enumerate(keys):
        rts = [row["ratios"].get(key) for row in rows]
        x = [c + (i - (k - 1) / 2) * width for c in range(n)]
        med = [rt["rps"] if rt else float("nan") for rt in rts]
        err = [[rt["rps"] - rt["min"] if rt else 0 for rt in rts],
               [rt["max"] - rt["rps"] if rt else 0 for rt in rts]]
        bars = ax.bar(x, med, width * 0.92, yerr=err, capsize=3 if not many else 0,
                      label=key, error_kw={"elinewidth": 1, "ecolor": "0.25"})
        for xi, rt, bar in zip(x, rts, bars) if n * k <= 40 else ():
            ax.annotate(f"{rt['rps']:.2f}" if rt else "n/a", (xi, rt["max"] if rt else 0),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, color=bar.get_facecolor())
    ax.axhline(1.0, color="black", linewidth=1, label="1.0 (equal)")
    if tier in TARGET_TIERS and "kloop/uvloop" in keys:
        ax.axhline(TARGET_RATIO, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"target: kloop/uvloop {TARGET_RATIO:g}")
    ax.set_xticks(range(n))
    labels = [cell_label(row["kind"], row["size"], row["conns"]) for row in rows]
    if many:
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    else:
        ax.set_xticklabels([textwrap.fill(lb, 18) for lb in labels], fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(bottom=0)
    unit = "conn/s" if tier == "churn" else "req/s"
    ax.set_ylabel(f"ratio of {unit}: median of rounds (min–max)")
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    section = payload.get("section")
    name = f"{tier} ({section})" if section and section != tier else tier
    ax.set_title(f"kloop benchmarks, {name} tier: {meta.get('date', '?').replace('T', ' ')}, "
                 f"commit {meta.get('commit', '?')}", fontsize=10)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def matrix_doc_body(payload, tables, notes, interf, image=None):
    """The doc section of a matrix run: how it was measured, the command,
    the chart (image: its path relative to the doc) and the tables."""
    meta, nice = payload["meta"], payload["meta"].get("nice", 0)
    body = (f"Measured {meta['date']}: kernel {meta['kernel']}, {meta['cpu']} "
            f"({meta['cpus']} CPUs), Python {meta['python']}, uvloop {meta['uvloop']}, "
            f"liburing {meta['liburing']}, "
            + (f"{meta['openssl']}, " if meta.get("openssl") else "")
            + (f"wrk {meta['wrk']}, " if meta.get("wrk") else "")
            + f"commit {meta['commit']}. "
            f"{payload['rounds']} interleaved rounds of {payload['warmup']:g} s warm-up + "
            f"{payload['duration']:g} s measured per server; median (min–max); "
            + (f"nice {nice}; " if nice else "") +
            f"load average at start {meta['loadavg_start'][0]:.2f}.\n\n"
            f"`{meta['command']}`\n\n")
    if image:
        section = payload.get("section") or payload["tier"]
        unit = "conn/s" if payload["tier"] == "churn" else "req/s"
        body += f"![{section}: ratios of {unit} per cell, median (min–max)]({image})\n\n"
    body += f"{tables}\n"
    if notes:
        body += "\n" + "\n".join(notes) + "\n"
    if interf:
        body += "\n" + interf + "\n"
    return body


def _draw(payload, path):
    """chart_png for a run that must not fail over its chart: True when drawn."""
    try:
        if chart_png(payload, path) is None:
            print(f"run.py: no chart for {path}: the summary has no ratios", file=sys.stderr)
            return False
    except Exception as e:  # a chart is an extra: the results are saved already
        print(f"run.py: chart {path} failed: {e!r}", file=sys.stderr)
        return False
    print(f"run.py: chart in {path}", file=sys.stderr)
    return True


def emit_matrix(payload, loops, ratio_pairs, notes, doc, chart=None, doc_path=None):
    """Print the tables of a matrix run; with chart, draw its ratios there;
    with doc, write its section of doc_path (default docs/performance.md),
    with the chart as img/perf-<section>.png beside it."""
    tier = payload["tier"]
    records, rows = payload["runs"], payload["summary"]
    nice = payload["meta"].get("nice", 0)
    if tier == "tls":
        tables = tls_markdown(rows, loops, ratio_pairs)
    elif tier == "ablation":
        tables = ablation_markdown(rows, ratio_pairs)
    else:
        tables = markdown_tables(rows, loops, ratio_pairs, title_kind=tier != "native",
                                 unit="conn" if tier == "churn" else "req",
                                 shares=bool(rows) and all(r["kind"] in WRK_KINDS for r in rows))
    interf = interference_note(records, nice)
    print(tables)
    if notes:
        print("\n".join(notes))
    print(interf)
    drawing = (chart or doc) and have_matplotlib()
    if (chart or doc) and not drawing:
        print(f"run.py: {NO_MATPLOTLIB}", file=sys.stderr)
    if chart and drawing:
        _draw(payload, chart)
    if doc:
        doc_path = Path(doc_path or DOC)
        section = payload.get("section") or tier
        image = None
        if drawing:
            img = doc_path.parent / "img" / f"perf-{section}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            if _draw(payload, img):
                image = f"img/{img.name}"
        write_doc_section(section, matrix_doc_body(payload, tables, notes, interf, image),
                          doc_path)


def report_main(path, doc, chart=None):
    """Tables (and doc section, chart) again from a saved results file."""
    payload = json.loads(Path(path).read_text())
    if payload.get("tier") in INPROC and "summary" in payload:
        if chart:
            print(f"run.py: no chart for the {payload['tier']} tier (--chart draws the ratios "
                  f"of a matrix run's cells)", file=sys.stderr)
        rows = payload["summary"]
        loops = list(dict.fromkeys(lp for row in rows for lp in row["loops"]))
        pairs = list(dict.fromkeys(tuple(k.split("/")) for row in rows for k in row["ratios"]))
        print(inproc_markdown(rows, payload["tier"], loops, pairs))
        return
    if "summary" not in payload:
        raise BenchError(f"{path}: not a matrix run (tier {payload.get('tier')})")
    rows = payload["summary"]
    loops = []
    for row in rows:
        for lp in row["loops"]:
            if lp not in loops:
                loops.append(lp)
    pairs = []
    for row in rows:
        for key in row["ratios"]:
            a, b = key.split("/")
            if (a, b) not in pairs:
                pairs.append((a, b))
    notes = [f"- {lp}: n/a — {err}" for lp in loops
             for err in {r["loops"][lp].get("error") for r in rows
                         if lp in r["loops"] and not r["loops"][lp].get("n")} if err]
    emit_matrix(payload, loops, pairs, sorted(set(notes)), doc, chart)


def unavailable_notes(env, loops):
    notes = []
    for lp in loops:
        why = env.availability(lp)
        if why:
            notes.append(f"- {lp}: n/a — {why}")
    return notes


def interference_note(records, nice=0):
    ok = [r for r in records if "error" not in r]
    if not ok:
        return ""
    others = [r.get("other_cpu", 0) for r in ok]
    steal = [r.get("steal", 0) for r in ok]
    worst = max(others)
    med = statistics.median(others)
    s = (f"CPU used by other processes during the runs: median {med:.0%} of a core, "
         f"worst {worst:.0%}; time stolen by the hypervisor: median "
         f"{statistics.median(steal):.0%}, worst {max(steal):.0%}")
    if nice:
        s += (f". Servers and load generator ran at nice {nice}, so other processes "
              f"mostly used the moments they were idle")
    if worst > 0.10 or max(steal) > 0.10:
        s += " — the machine was shared: treat these figures as preliminary"
    return s + "."


def syscall_markdown(recs):
    out = ["| server | syscalls/request | io_uring_enter/request | top syscalls per request |",
           "|---|---:|---:|---|"]
    for r in recs:
        name = r["loop"] if r["kind"] == "native" else f"{r['loop']} ({r['kind']})"
        if "error" in r:
            out.append(f"| {name} | n/a | n/a | {r['error'][:80]} |")
            continue
        top = sorted(r["per_request"].items(), key=lambda kv: -kv[1])[:5]
        tops = ", ".join(f"{k} {v:.2f}" for k, v in top)
        out.append(f"| {name} | {r['total_per_request']:.2f} | "
                   f"{r['io_uring_enter_per_request']:.2f} | {tops} |")
    return "\n".join(out)


def write_doc_section(name, body, doc=DOC):
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in doc."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def save_json(tier, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{tier}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def stderr_progress(done, total, msg):
    if msg.startswith("  "):
        print(f"         {msg.strip()}", file=sys.stderr, flush=True)
    else:
        print(f"[{done + 1:3d}/{total}] {msg}", file=sys.stderr, flush=True)


def _ints(s):
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x)
            for x in s.split(",") if x]


def tier_cells(tier, kinds="protocol", sizes="1024", conns="10"):
    """The (kind, size, conns) cells a matrix tier measures; kinds, sizes and
    conns are the command line's comma lists (custom; conns and sizes also
    for churn, conns for http, when given)."""
    if tier == "quick":
        return list(QUICK_CELLS)
    if tier == "full":
        return ([(k, s, c) for k in KINDS for s in (64, 1024, 10240, 102400)
                 for c in (1, 10, 100, 1000)]
                + [("http", 0, c) for c in (1, 10, 100, 1000)])
    if tier == "churn":
        return list(CHURN_CELLS) if sizes == "1024" and conns == "10" else \
            [("churn", s, c) for s in _ints(sizes) for c in _ints(conns)]
    if tier == "native":
        return [("native", s, c) for s in (1024, 102400) for c in (10, 100, 1000)]
    if tier == "tls":
        return list(TLS_CELLS)
    if tier == "http":
        return list(HTTP_CELLS) if conns == "10" else [("http", 0, c) for c in _ints(conns)]
    if tier == "ablation":
        return list(ABLATION_CELLS)
    # custom: a wrk kind has one cell per connection count, whatever --sizes
    cells = [(k, 0 if k in WRK_KINDS else s, c) for k in kinds.split(",")
             for s in _ints(sizes) for c in _ints(conns)]
    return list(dict.fromkeys(cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tier", choices=["quick", "full", "native", "syscalls", "memory", "profile",
                                    "loadgen", "custom", "report", "tls", "http", "churn",
                                    "micro", "spawn", "ablation"])
    p.add_argument("results", nargs="?", help="report: a results JSON file of a matrix run")
    p.add_argument("--build", help="meson build directory (default: build/, else build*/)")
    p.add_argument("--loops", help="comma list (default asyncio,uvloop,kloop; "
                                   "native: epoll,libkloop; tls: also kloop-sslproto, "
                                   "kloop with KLOOP_TLS=sslproto; kloop-abi, kloop-api: "
                                   "kloop with KLOOP_FFI=abi|api)")
    p.add_argument("--kinds", default="protocol",
                   help="custom: comma list of " + ",".join(KINDS + ("churn", "http")))
    p.add_argument("--sizes", default="1024", help="custom: comma list of sizes (k = KiB)")
    p.add_argument("--conns", default="10", help="custom: comma list of connection counts")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    p.add_argument("--pipeline", type=int, default=1, help="messages in flight per connection")
    p.add_argument("--requests", type=int, default=20000, help="syscalls: requests per server")
    p.add_argument("--loadgen-arg", action="append", default=[],
                   help="extra argument for the load generator (repeatable)")
    p.add_argument("--nice", type=int, default=0,
                   help="nice value of servers and load generator (e.g. -20 as root on a "
                        "shared machine; recorded in the results)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for an idle machine")
    p.add_argument("--retries", type=int, default=0,
                   help="repeat a run disturbed by other processes or by time stolen by "
                        "the hypervisor up to N times")
    p.add_argument("--disturbed", type=float, default=0.10, metavar="SHARE",
                   help="with --retries: a run is disturbed when other processes used, or "
                        "the hypervisor stole, more than SHARE of a core (default 0.10)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="micro, spawn: multiply every benchmark's operation count")
    p.add_argument("--doc", action="store_true",
                   help="write the tables into docs/performance.md (section per tier)")
    p.add_argument("--section", help="with --doc: name of the section to write (default: the "
                                     "tier; e.g. for a custom run of its own)")
    p.add_argument("--chart", metavar="PATH",
                   help="matrix tiers and report: draw the ratios per cell as a PNG at PATH "
                        "(needs python3-matplotlib; with --doc the chart also goes to "
                        "docs/img/perf-<section>.png)")
    p.add_argument("--json-out", help="write the results here instead of benchmarks/results/")
    p.add_argument("--allow-stale", action="store_true",
                   help="measure even if sources are newer than the build")
    args = p.parse_args(argv)
    # SIGTERM ends a run like Ctrl-C: servers are stopped and the temporary
    # snapshot and test certificate are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.chart and args.tier not in MATRIX_TIERS + ("report",):
        p.error("--chart is for the matrix tiers (" + ", ".join(MATRIX_TIERS) + ") and report")

    global NICE
    NICE = args.nice
    if args.tier == "report":
        if not args.results:
            p.error("report needs a results file")
        try:
            report_main(args.results, args.doc, args.chart)
        except BenchError as e:
            print(f"run.py: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        env = Env(args.build)
    except BenchError as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2

    stale = env.stale()
    if stale:
        print(f"run.py: the build in {env.build} is older than {', '.join(stale[:4])}"
              + (" ..." if len(stale) > 4 else "")
              + f": run `ninja -C {env.build}` first (or pass --allow-stale)", file=sys.stderr)
        if not args.allow_stale:
            return 2

    tier = args.tier
    native = tier == "native"
    env.snapshot()
    loops = args.loops.split(",") if args.loops else list(NATIVE if native else PY_LOOPS)
    if tier == "tls" and not args.loops:
        loops.append("kloop-sslproto")
    if tier == "ablation" and not args.loops:
        loops = ["kloop"] + list(ABLATIONS)
    cells = tier_cells(tier, args.kinds, args.sizes, args.conns)
    too_big = [c for c in cells if c[0] == "udp" and c[1] > UDP_MAX]
    if too_big:
        print(f"run.py: left out {len(too_big)} udp cells with messages over {UDP_MAX} B "
              f"(one datagram per message)", file=sys.stderr)
        cells = [c for c in cells if c not in too_big]
    rounds = args.rounds or 3
    duration = args.duration or (3.0 if tier == "full" else 4.0)

    meta = metadata(env)
    meta["nice"] = args.nice
    if tier == "tls" or any(k in TLS_KINDS for k, _, _ in cells):
        try:
            env.make_test_certificate()
        except (BenchError, OSError) as e:
            print(f"run.py: {e}", file=sys.stderr)
            return 2
        meta["openssl"] = _cmd_out(["openssl", "version"])
    if any(k in WRK_KINDS for k, _, _ in cells):
        import shutil
        if not shutil.which("wrk"):
            print("run.py: the http and https cells need wrk: apt-get install wrk",
                  file=sys.stderr)
            return 2
        meta["wrk"] = _cmd_out(["dpkg-query", "-W", "-f=${Version}", "wrk"]) or None
    busy = busy_processes()
    meta["busy_at_start"] = [f"{comm} ({pid}) {share:.0%}" for share, pid, comm in busy]
    if busy:
        print("run.py: warning: other processes are using CPU: "
              + ", ".join(meta["busy_at_start"][:5]), file=sys.stderr)

    RESULTS.mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / "servers.log", "a")
    print(f"run.py: build {env.build}; kernel {meta['kernel']}; Python {meta['python']}; "
          f"uvloop {meta['uvloop']}", file=sys.stderr)
    for note in unavailable_notes(env, loops):
        print("run.py: " + note[2:], file=sys.stderr)

    if tier in INPROC:
        return inproc_main(env, args, meta, loops, log)

    if tier == "loadgen":
        size, conns = _ints(args.sizes)[0], _ints(args.conns)[0]
        rounds = args.rounds or 5
        duration = args.duration or 3.0
        recs = loadgen_compare(env, size, conns, [1, 8], rounds, duration, args.warmup,
                               args.wait_quiet, progress=stderr_progress)
        payload = {"tier": tier, "meta": meta, "runs": recs}
        path = save_json(tier, payload)
        table = loadgen_markdown(recs)
        interf = interference_note(recs, args.nice)
        print(table)
        print(interf)
        if args.doc:
            body = (f"Measured {meta['date']} on kernel {meta['kernel']}, commit {meta['commit']}: "
                    f"each load generator engine against one `echo_epoll` server, "
                    f"{size_label(size)} messages over {conns} connections, {rounds} "
                    f"interleaved rounds of {duration:g} s, medians.\n\n"
                    f"`{meta['command']}`\n\n{table}\n\n{interf}\n")
            write_doc_section("loadgen", body)
        print(f"run.py: results in {path}", file=sys.stderr)
        return 0

    if tier == "profile":
        chosen = args.loops.split(",") if args.loops else list(PY_LOOPS + NATIVE)
        size, conns = _ints(args.sizes)[0], _ints(args.conns)[0]
        recs = []
        for lp in chosen:
            for kind in (["native"] if lp in NATIVE else args.kinds.split(",")):
                why = env.availability(lp)
                if why:
                    recs.append({"loop": lp, "kind": kind, "error": f"n/a: {why}"})
                    continue
                print(f"run.py: profiling {lp} {kind}", file=sys.stderr)
                recs.append(profile_run(env, lp, kind, size, conns, args.duration or 3.0, log))
        payload = {"tier": tier, "meta": meta, "runs": recs}
        path = save_json(tier, payload)
        table = profile_markdown(recs)
        print(table)
        for r in recs:
            if r.get("python_top"):
                print(f"\n{r['loop']} ({r['kind']}): top Python functions by own time")
                for t in r["python_top"][:8]:
                    print(f"  {t['calls_per_request']:6.2f}/req  {t['own_s']:7.3f} s  "
                          f"{t['function']}")
        if args.doc:
            body = (f"Measured {meta['date']} on kernel {meta['kernel']}, Python {meta['python']}, "
                    f"uvloop {meta['uvloop']}, commit {meta['commit']}: echo of "
                    f"{size_label(size)} over {conns} connections. Shares of the server's CPU "
                    f"samples per binary (`perf record -e cpu-clock`), and Python function "
                    f"calls per request (cProfile, separate run).\n\n"
                    f"`{meta['command']}`\n\n{table}\n")
            write_doc_section("profile", body)
        print(f"run.py: results in {path}", file=sys.stderr)
        return 0

    if tier == "memory":
        chosen = args.loops.split(",") if args.loops else list(PY_LOOPS + NATIVE)
        # Two counts, each in a fresh server: growth per connection at the
        # first, and what each connection beyond it costs (the difference
        # of the two growths), which leaves out per-process memory that the
        # first connections touch once (receive buffers, code pages).
        counts = _ints(args.conns) if args.conns != "10" else [1000, 3000]
        recs = []
        rounds = args.rounds or 3
        for rnd in range(rounds):
            for lp in chosen[rnd % len(chosen):] + chosen[:rnd % len(chosen)]:
                kinds = ["native"] if lp in NATIVE else args.kinds.split(",")
                for kind in kinds:
                    why = env.availability(lp)
                    for conns in counts:
                        if why:
                            recs.append({"loop": lp, "kind": kind, "conns": conns,
                                         "round": rnd, "error": f"n/a: {why}"})
                            continue
                        print(f"run.py: round {rnd + 1}: {lp} {kind}: {conns} idle connections",
                              file=sys.stderr)
                        rec = idle_run(env, lp, kind, conns, log=log)
                        rec["round"] = rnd
                        recs.append(rec)
        payload = {"tier": tier, "meta": meta, "counts": counts, "runs": recs}
        path = save_json(tier, payload)
        table = memory_markdown(recs, counts)
        print(table)
        if args.doc:
            shown = " and ".join(str(c) for c in counts)
            body = (f"Measured {meta['date']} on kernel {meta['kernel']}, Python {meta['python']}, "
                    f"uvloop {meta['uvloop']}, commit {meta['commit']}: {shown} connections "
                    f"(each count in a fresh server), each echoed one 1 KiB message, then held "
                    f"idle for 1 s; server RSS from /proc/PID/status before connecting and "
                    f"after; {rounds} round(s), loops interleaved, median (min–max).\n\n"
                    f"`{meta['command']}`\n\n{table}\n")
            write_doc_section("memory", body)
        print(f"run.py: results in {path}", file=sys.stderr)
        return 0

    if tier == "syscalls":
        recs = []
        chosen = args.loops.split(",") if args.loops else list(PY_LOOPS + NATIVE)
        targets = [(lp, k) for lp in chosen if lp in PY_LOOPS or lp in LOOP_VARIANTS
                   for k in args.kinds.split(",")]
        targets += [(lp, "native") for lp in chosen if lp in NATIVE]
        size = _ints(args.sizes)[0]
        conns = _ints(args.conns)[0]
        for lp, kind in targets:
            why = env.availability(lp)
            if why:
                recs.append({"loop": lp, "kind": kind, "error": f"n/a: {why}"})
                continue
            print(f"run.py: strace {lp} {kind}: {args.requests} requests", file=sys.stderr)
            recs.append(syscall_run(env, lp, kind, size, conns, args.requests, log))
        payload = {"tier": tier, "meta": meta, "runs": recs}
        path = Path(args.json_out) if args.json_out else save_json(tier, payload)
        if args.json_out:
            path.write_text(json.dumps(payload, indent=1))
        table = syscall_markdown(recs)
        print(table)
        if args.doc:
            body = (f"Measured {meta['date']} on kernel {meta['kernel']}, Python {meta['python']}, "
                    f"uvloop {meta['uvloop']}, commit {meta['commit']}: echo of "
                    f"{size_label(size)} over {conns} connections, {args.requests} requests, "
                    f"server under `strace -c -f`.\n\n`{meta['command']}`\n\n{table}\n")
            write_doc_section("syscalls", body)
        print(f"run.py: results in {path}", file=sys.stderr)
        return 0

    ratio_pairs = [("libkloop", "epoll")] if native else \
        [(a, b) for a, b in (("kloop", "uvloop"), ("kloop", "asyncio"), ("uvloop", "asyncio"),
                             ("kloop", "kloop-sslproto"), ("kloop-api", "kloop-abi"))
         if a in loops and b in loops]
    if tier == "ablation":
        ratio_pairs = [(v, "kloop") for v in loops if v in ABLATIONS and "kloop" in loops]
    est = rounds * len(cells) * len(loops) * (duration + args.warmup + 0.8)
    print(f"run.py: {len(cells)} cells x {len(loops)} servers x {rounds} rounds, "
          f"about {est / 60:.0f} min", file=sys.stderr)
    extra = list(args.loadgen_arg)
    records = run_matrix(env, cells, loops, rounds, duration, args.warmup, args.pipeline,
                         extra, progress=stderr_progress, log=log,
                         quiet_wait=args.wait_quiet, retries=args.retries,
                         disturbed=args.disturbed)
    meta["loadavg_end"] = loadavg()
    rows = summarize(records, cells, loops, ratio_pairs)
    payload = {"tier": tier, "section": args.section, "meta": meta, "rounds": rounds,
               "duration": duration,
               "warmup": args.warmup, "pipeline": args.pipeline, "loadgen_extra": extra,
               "runs": records, "summary": rows}
    if args.json_out:
        path = Path(args.json_out)
        path.write_text(json.dumps(payload, indent=1))
    else:
        path = save_json(tier, payload)
    notes = unavailable_notes(env, loops)
    emit_matrix(payload, loops, ratio_pairs, notes, args.doc, args.chart)
    print(f"run.py: results in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
