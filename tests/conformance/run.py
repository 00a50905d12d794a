#!/usr/bin/python3
"""Run CPython 3.11's loop-generic asyncio tests against event loops.

    /usr/bin/python3 tests/conformance/run.py [--loops asyncio,kloop]
        [--suites events,ssl,...] [--jobs 2] [--json out.json] [--text out.txt]

Every (loop, suite) pair runs in child processes (run_class.py) with a time
limit per test and per suite.  A test that hangs is killed (after a stack
dump) and counted as an error, a child that dies (a crash in the engine)
counts the running test as an error; in both cases the suite goes on in a
fresh child with the tests that are left.  The stock asyncio loop runs
through the same runner as the control.

Output: per-suite and total counts (passed/failed/errors/skipped) for each
loop, as text on stdout (and --text) and as JSON (--json) with every test's
status and, for the ones that did not pass, the traceback.

Exit status: 0 when every test that passes on the control loop ("asyncio")
passes on every other loop given, apart from the names in exceptions.txt;
1 otherwise; 2 on usage errors.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loops  # noqa: E402

CHILD = os.path.join(HERE, "run_class.py")
EXCEPTIONS_FILE = os.path.join(HERE, "exceptions.txt")
CONTROL = "asyncio"

# Kept in step with suites.SUITE_NAMES; not imported from there so that the
# parent does not import CPython's test modules.
SUITE_NAMES = (
    "events",
    "ssl",
    "sslproto",
    "subprocess_threaded",
    "subprocess_safe",
    "subprocess_fast",
    "subprocess_pidfd",
    "sendfile",
    "sock_lowlevel",
    "streams",
    "server",
    "buffered_proto",
)

#: The subset CPython's own SelectEventLoopTests-style classes cover once:
#: one child watcher, and BaseStartServer without the Unix-socket test.
#: BRIEF.md's "234 tests" counts this set.
CORE_SUITES = (
    "events",
    "sock_lowlevel",
    "sendfile",
    "server",
    "buffered_proto",
    "sslproto",
    "ssl",
    "streams",
    "subprocess_threaded",
)

STATUSES = ("pass", "fail", "error", "skip", "xfail", "xpass")

#: Tests that CPython itself skips for loops of another kind: the skip is the
#: test's own decision (its exact message is required), not a kloop failure.
NOT_APPLICABLE = {
    # Inspects the selector loop's self-pipe (_internal_fds, _csock, _ssock);
    # CPython skips it for loops that are not BaseSelectorEventLoop.
    "events.test_internal_fds": "loop is not a BaseSelectorEventLoop",
}


def load_exceptions(path=EXCEPTIONS_FILE):
    """Parse exceptions.txt: `suite.test_name  reason...` per line, # comments.

    Returns {"suite.test": reason}.  Raises ValueError on a malformed line.
    """
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fp:
        for lineno, raw in enumerate(fp, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or "." not in parts[0]:
                raise ValueError(f"{path}:{lineno}: want 'suite.test_name reason', got {line!r}")
            out[parts[0]] = parts[1].strip()
    return out


class SuiteRun:
    """Runs one suite on one loop, restarting the child after hangs and crashes."""

    def __init__(self, loop, suite, *, test_timeout, suite_timeout, workdir, env, hard_deadline):
        self.loop = loop
        self.hard_deadline = hard_deadline
        self.suite = suite
        self.test_timeout = test_timeout
        self.suite_timeout = suite_timeout
        self.workdir = workdir
        self.env = env
        self.plan = None
        self.results = {}  # name -> {"status", "detail", "time"}
        self.class_errors = []
        self.unavailable = None
        self.children = 0
        self.elapsed = 0.0

    # -- one child ---------------------------------------------------------
    def _spawn(self, events_path, skip):
        skip_path = events_path + ".skip.json"
        with open(skip_path, "w", encoding="utf-8") as fp:
            json.dump(sorted(skip), fp)
        log_path = events_path + ".log"
        log = open(log_path, "wb")
        cwd = tempfile.mkdtemp(prefix="cwd-", dir=self.workdir)
        proc = subprocess.Popen(
            [
                sys.executable,
                CHILD,
                "--loop",
                self.loop,
                "--suite",
                self.suite,
                "--events",
                events_path,
                "--skip-file",
                skip_path,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return proc, log_path

    @staticmethod
    def _tail(path, limit=4000):
        try:
            with open(path, "rb") as fp:
                fp.seek(0, os.SEEK_END)
                size = fp.tell()
                fp.seek(max(0, size - limit))
                return fp.read().decode("utf-8", "replace")
        except OSError:
            return ""

    @staticmethod
    def _kill_group(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _list_only(self):
        path = os.path.join(self.workdir, f"{self.loop}-{self.suite}-list.jsonl")
        subprocess.run(
            [sys.executable, CHILD, "--loop", self.loop, "--suite", self.suite,
             "--events", path, "--list"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=60, check=False,
        )
        try:
            with open(path, encoding="utf-8") as fp:
                for line in fp:
                    ev = json.loads(line)
                    if ev["event"] == "plan":
                        self.plan = ev["tests"]
                    elif ev["event"] == "unavailable":
                        self.unavailable = ev["reason"]
        except FileNotFoundError:
            pass

    def _one_child(self, deadline):
        """Run a child for the tests not yet done; return True if it ended cleanly."""
        self.children += 1
        events_path = os.path.join(self.workdir, f"{self.loop}-{self.suite}-{self.children}.jsonl")
        skip = set(self.results)
        proc, log_path = self._spawn(events_path, skip)
        pos = 0
        buf = b""
        current = None
        current_t0 = None
        done = False
        hung = None
        while True:
            rc = proc.poll()
            try:
                with open(events_path, "rb") as fp:
                    fp.seek(pos)
                    chunk = fp.read()
            except FileNotFoundError:
                chunk = b""
            pos += len(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = json.loads(line)
                kind = ev["event"]
                if kind == "plan":
                    if self.plan is None:
                        self.plan = ev["tests"]
                elif kind == "start":
                    current, current_t0 = ev["test"], time.monotonic()
                elif kind == "result":
                    self.results[ev["test"]] = {
                        "status": ev["status"],
                        "detail": ev["detail"],
                        "time": ev["time"],
                    }
                    current = None
                elif kind == "class_error":
                    self.class_errors.append({"where": ev["where"], "detail": ev["detail"]})
                elif kind == "unavailable":
                    self.unavailable = ev["reason"]
                elif kind == "done":
                    done = True
            if rc is not None:
                break
            now = time.monotonic()
            if current is not None and now - current_t0 > self.test_timeout:
                hung = f"hung: no result after {self.test_timeout:.0f} s (killed)"
            elif now > deadline:
                hung = "suite time limit reached (killed)"
            if hung:
                # Ask faulthandler for every thread's stack, then kill.
                try:
                    os.kill(proc.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
                time.sleep(1.0)
                self._kill_group(proc)
                break
            time.sleep(0.1)

        # Reap anything the child left behind in its session (e.g. a
        # subprocess of a test), so that the next child starts clean.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

        if self.unavailable:
            return True
        if current is not None:
            if hung:
                why = hung
            else:
                why = f"child died (exit status {_rc_text(proc.returncode)}) during this test"
            self.results[current] = {
                "status": "error",
                "detail": why + "\n--- tail of the child's output ---\n" + self._tail(log_path),
                "time": round(time.monotonic() - current_t0, 3),
            }
            return False
        if hung:  # suite deadline hit between tests
            return False
        if not done:
            self.class_errors.append(
                {
                    "where": "child process",
                    "detail": f"exited with status {_rc_text(proc.returncode)} before finishing\n"
                    + self._tail(log_path),
                }
            )
            return False
        return True

    def run(self):
        t0 = time.monotonic()
        deadline = min(t0 + self.suite_timeout, self.hard_deadline)
        if deadline <= t0 + 1.0:
            # Out of time before starting: only learn the names, run nothing.
            self._list_only()
            self.class_errors.append({"where": "runner", "detail": "total time limit reached"})
            deadline = t0
        while deadline > t0:
            clean = self._one_child(deadline)
            if self.unavailable or self.plan is None:
                break
            left = [n for n in self.plan if n not in self.results]
            if clean or not left or time.monotonic() >= deadline:
                break
        if self.plan is not None and not self.unavailable:
            why = "not run"
            if self.class_errors:
                last = self.class_errors[-1]
                why += ": " + last["where"] + "\n" + last["detail"]
            elif time.monotonic() >= deadline:
                why += ": suite time limit reached"
            for name in self.plan:
                if name not in self.results:
                    self.results[name] = {"status": "error", "detail": why, "time": 0.0}
        self.elapsed = round(time.monotonic() - t0, 2)
        return self

    def summary(self):
        counts = {s: 0 for s in STATUSES}
        for r in self.results.values():
            counts[r["status"]] += 1
        return {
            "tests": len(self.results),
            "passed": counts["pass"],
            "failed": counts["fail"] + counts["xpass"],
            "errors": counts["error"],
            "skipped": counts["skip"] + counts["xfail"],
            "by_status": counts,
            "seconds": self.elapsed,
            "children": self.children,
        }


def _rc_text(rc):
    if rc is None:
        return "none"
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return str(rc)
    return str(rc)


def _sum(summaries):
    keys = ("tests", "passed", "failed", "errors", "skipped")
    return {k: sum(s[k] for s in summaries) for k in keys}


def compare(report, control, other, exceptions):
    """Names (suite.test) that pass on `control` and do not pass on `other`.

    Returns (regressions, excused): excused are those listed in
    exceptions.txt (with "reason") or CPython's own not-applicable skips
    (NOT_APPLICABLE, with "reason" starting "not applicable:").
    """
    regressions, excused = [], []
    c_suites = report["loops"][control]["suites"]
    o_suites = report["loops"][other]["suites"]
    for suite, c in c_suites.items():
        o = o_suites.get(suite)
        for test, res in c["results"].items():
            if res["status"] != "pass":
                continue
            name = f"{suite}.{test}"
            o_res = (o or {}).get("results", {}).get(test)
            o_status = o_res["status"] if o_res else "missing"
            if o_status == "pass":
                continue
            entry = {"test": name, "status": o_status, "detail": (o_res or {}).get("detail", "")}
            if o_status == "skip" and NOT_APPLICABLE.get(name) == entry["detail"]:
                entry["reason"] = "not applicable: CPython skips it itself: " + entry["detail"]
                excused.append(entry)
            elif name in exceptions:
                entry["reason"] = exceptions[name]
                excused.append(entry)
            else:
                regressions.append(entry)
    return regressions, excused


def run_all(
    loop_names,
    suite_names,
    *,
    jobs,
    test_timeout,
    suite_timeout,
    total_timeout,
    workdir,
    progress=None,
):
    env = dict(os.environ)
    pp = [HERE, loops.PYTHON_DIR]
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    env.setdefault("PYTHONFAULTHANDLER", "1")
    env.pop("PYTHONASYNCIODEBUG", None)

    report = {
        "python": sys.version,
        "executable": sys.executable,
        "kernel": platform.release(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jobs": jobs,
        "test_timeout": test_timeout,
        "suite_timeout": suite_timeout,
        "total_timeout": total_timeout,
        "loops": {},
    }
    for name in loop_names:
        report["loops"][name] = {"unavailable": loops.availability(name), "suites": {}}

    tasks = [
        (loop, suite)
        for suite in suite_names
        for loop in loop_names
        if report["loops"][loop]["unavailable"] is None
    ]
    lock = threading.Lock()
    t0 = time.monotonic()
    hard_deadline = t0 + total_timeout

    def work(task):
        loop, suite = task
        sr = SuiteRun(
            loop,
            suite,
            test_timeout=test_timeout,
            suite_timeout=suite_timeout,
            workdir=workdir,
            env=env,
            hard_deadline=hard_deadline,
        ).run()
        with lock:
            entry = {
                "summary": sr.summary(),
                "class_errors": sr.class_errors,
                "unavailable": sr.unavailable,
                "results": {n: sr.results[n] for n in (sr.plan or [])},
            }
            report["loops"][loop]["suites"][suite] = entry
            if progress:
                s = entry["summary"]
                progress(
                    f"[{time.monotonic() - t0:6.1f}s] {loop:8s} {suite:20s} "
                    f"pass {s['passed']:3d} fail {s['failed']:3d} err {s['errors']:3d} "
                    f"skip {s['skipped']:3d}  ({s['seconds']:.1f}s"
                    f"{', %d children' % s['children'] if s['children'] > 1 else ''})"
                    + (f"  UNAVAILABLE: {sr.unavailable}" if sr.unavailable else "")
                )

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        list(ex.map(work, tasks))

    for name, data in report["loops"].items():
        ordered = {s: data["suites"][s] for s in suite_names if s in data["suites"]}
        data["suites"] = ordered
        data["total"] = _sum([v["summary"] for v in ordered.values()])
        core = [v["summary"] for s, v in ordered.items() if s in CORE_SUITES]
        core_sum = _sum(core)
        # BRIEF.md's count leaves out SelectorStartServerTests' Unix test.
        srv = ordered.get("server", {}).get("results", {}).get("test_start_unix_server_1")
        if srv is not None:
            core_sum["tests"] -= 1
            key = {"pass": "passed", "fail": "failed", "xpass": "failed", "error": "errors"}.get(
                srv["status"], "skipped"
            )
            core_sum[key] -= 1
        data["core_total"] = core_sum
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def format_text(report, comparisons):
    lines = []
    loops_ = [n for n in report["loops"]]
    lines.append(
        f"CPython asyncio conformance -- Python {report['python'].split()[0]}, "
        f"kernel {report['kernel']}, {report['seconds']} s wall, {report['jobs']} jobs"
    )
    for name in loops_:
        if report["loops"][name]["unavailable"]:
            lines.append(f"  {name}: UNAVAILABLE: {report['loops'][name]['unavailable']}")
    header = f"{'suite':22s}" + "".join(f" | {n + ' p/f/e/s':>22s}" for n in loops_)
    lines.append(header)
    lines.append("-" * len(header))
    suites_ = []
    for name in loops_:
        for s in report["loops"][name]["suites"]:
            if s not in suites_:
                suites_.append(s)

    def cell(name, s):
        e = report["loops"][name]["suites"].get(s)
        if e is None:
            return "-"
        if e["unavailable"]:
            return "n/a"
        x = e["summary"]
        return f"{x['passed']}/{x['failed']}/{x['errors']}/{x['skipped']}"

    for s in suites_:
        lines.append(f"{s:22s}" + "".join(f" | {cell(n, s):>22s}" for n in loops_))
    lines.append("-" * len(header))
    for label, key in (("total", "total"), ("core (BRIEF's 234 set)", "core_total")):
        row = f"{label:22s}"
        for n in loops_:
            t = report["loops"][n].get(key)
            txt = f"{t['passed']}/{t['failed']}/{t['errors']}/{t['skipped']}" if t else "-"
            row += f" | {txt:>22s}"
        lines.append(row)
    for n in loops_:
        t = report["loops"][n].get("total")
        c = report["loops"][n].get("core_total")
        if t:
            lines.append(
                f"{n}: {t['tests']} tests: {t['passed']} passed, {t['failed']} failed, "
                f"{t['errors']} errors, {t['skipped']} skipped "
                f"(core set: {c['tests']} tests, {c['passed']} passed)"
            )
    for other, (regressions, excused) in comparisons.items():
        lines.append("")
        lines.append(
            f"{other} vs {CONTROL}: {len(regressions)} test(s) pass on {CONTROL} "
            f"but not on {other}; {len(excused)} excused (exceptions.txt, not applicable)"
        )
        for r in regressions:
            first = _first_line(r["detail"])
            lines.append(f"  FAIL {r['test']} [{r['status']}] {first}")
        for r in excused:
            lines.append(f"  excused {r['test']} [{r['status']}]: {r['reason']}")
    return "\n".join(lines) + "\n"


def _first_line(detail):
    """The most telling line of a traceback: its last non-empty one."""
    for line in reversed((detail or "").strip().splitlines()):
        line = line.strip()
        if line and not line.startswith("---"):
            return line[:160]
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--loops", default=None, help="comma list (default: asyncio,kloop)")
    ap.add_argument("--suites", default=",".join(SUITE_NAMES))
    ap.add_argument("--core", action="store_true", help="only the CORE_SUITES")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--test-timeout",
        type=float,
        default=40.0,
        help="seconds one test may run before it is killed as hung (stock loop: <= 2.1 s)",
    )
    ap.add_argument("--suite-timeout", type=float, default=180.0)
    ap.add_argument(
        "--total-timeout",
        type=float,
        default=540.0,
        help="wall-clock budget of the whole run; suites not finished by then count as errors",
    )
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--text", help="write the text summary here too")
    ap.add_argument("--workdir", help="keep child logs here (default: a temp dir)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    loop_names = (args.loops or "asyncio,kloop").split(",")
    for n in loop_names:
        if n not in loops.LOOP_NAMES:
            ap.error(f"unknown loop {n}")
    suite_names = list(CORE_SUITES) if args.core else args.suites.split(",")
    for s in suite_names:
        if s not in SUITE_NAMES:
            ap.error(f"unknown suite {s}")
    try:
        exceptions = load_exceptions()
    except ValueError as exc:
        ap.error(str(exc))

    workdir = args.workdir or tempfile.mkdtemp(prefix="kloop-conformance-")
    os.makedirs(workdir, exist_ok=True)
    progress = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    report = run_all(
        loop_names,
        suite_names,
        jobs=args.jobs,
        test_timeout=args.test_timeout,
        suite_timeout=args.suite_timeout,
        total_timeout=args.total_timeout,
        workdir=workdir,
        progress=progress,
    )
    comparisons = {}
    if CONTROL in loop_names:
        for other in loop_names:
            if other != CONTROL and report["loops"][other]["unavailable"] is None:
                comparisons[other] = compare(report, CONTROL, other, exceptions)
    report["comparisons"] = {
        other: {"regressions": r, "excused": e} for other, (r, e) in comparisons.items()
    }
    report["workdir"] = workdir
    text = format_text(report, comparisons)
    sys.stdout.write(text)
    if args.text:
        with open(args.text, "w", encoding="utf-8") as fp:
            fp.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fp:
            json.dump(report, fp, indent=1)
    bad = any(r for r, _ in comparisons.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
