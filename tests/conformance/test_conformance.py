"""The conformance rule, as pytest tests.

Every test of CPython 3.11's loop-generic asyncio suites that passes on the
stock loop must pass on kloop, apart from the names in exceptions.txt (only
subprocess and pipe tests, and test_ssl tests that drive private hooks of
asyncio's SSLProtocol -- those must pass on kloop's sslproto path instead --
each with a reason).

The run takes ~2 minutes for both loops on 2 cores (run.py schedules the
suites over 2 workers with per-test and total time limits).  To check a
report made earlier instead of running again, set
KLOOP_CONFORMANCE_JSON=<path of run.py --json output>.
"""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import run  # noqa: E402  (tests/conformance/run.py)
from conftest import add_summary_line, loop_unavailable  # noqa: E402

#: A test may be excused only if it is about subprocesses or pipes, or if it
#: is a test_ssl test that drives a private hook of asyncio's SSLProtocol.
ALLOWED_EXCEPTION_WORDS = ("subprocess", "pipe")
SSLPROTO_HOOK = "sslproto private hook:"


def _excusable(name, why=""):
    suite, test = name.split(".", 1)
    if suite == "ssl" and why.startswith(SSLPROTO_HOOK):
        return True
    return suite.startswith("subprocess_") or any(w in test for w in ALLOWED_EXCEPTION_WORDS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = os.environ.get("KLOOP_CONFORMANCE_JSON")
    if path:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
        add_summary_line(f"conformance: report read from {path}")
    else:
        skip, fail = loop_unavailable("kloop")
        if skip:
            pytest.skip(skip)
        if fail:
            pytest.fail(f"kloop cannot be used: {fail}", pytrace=False)
        workdir = str(tmp_path_factory.mktemp("conformance"))
        rep = run.run_all(
            ["asyncio", "kloop"],
            list(run.SUITE_NAMES),
            jobs=2,
            test_timeout=40.0,
            suite_timeout=180.0,
            total_timeout=540.0,
            workdir=workdir,
        )
        with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=1)
        add_summary_line(f"conformance: full report in {workdir}/report.json")
    comparisons = {}
    if rep["loops"].get("kloop", {}).get("unavailable") is None and "kloop" in rep["loops"]:
        comparisons["kloop"] = run.compare(rep, "asyncio", "kloop", run.load_exceptions())
    text = run.format_text(rep, comparisons)
    for line in text.splitlines():
        add_summary_line(line)
    print(text)
    return rep


@pytest.mark.conformance
def test_exceptions_file_lists_only_allowed_kinds():
    exceptions = run.load_exceptions()
    bad = [n for n, why in exceptions.items() if not _excusable(n, why)]
    assert not bad, ("only subprocess/pipe tests and test_ssl tests on sslproto's private "
                     f"hooks may be excused in exceptions.txt: {bad}")
    short = [n for n, why in exceptions.items() if len(why.split()) < 4]
    assert not short, f"each exception needs a reason (what, why, evidence): {short}"
    unknown = [n for n in exceptions if n.split(".", 1)[0] not in run.SUITE_NAMES]
    assert not unknown, f"unknown suites in exceptions.txt: {unknown}"


@pytest.mark.conformance
def test_control_loop_passes_everything(report):
    """On this machine the stock loop passes every selected test (else the
    rule below would compare against a broken reference)."""
    a = report["loops"]["asyncio"]
    assert a["unavailable"] is None
    assert a["total"]["tests"] >= 300, a["total"]
    not_passing = [f"{s}.{t}: {r['status']}" for s, e in a["suites"].items()
                   for t, r in e["results"].items() if r["status"] != "pass"]
    assert not not_passing, not_passing


@pytest.mark.conformance
def test_kloop_passes_what_the_stock_loop_passes(report):
    k = report["loops"].get("kloop")
    assert k is not None and k["unavailable"] is None, "kloop did not run"
    exceptions = run.load_exceptions()
    regressions, excused = run.compare(report, "asyncio", "kloop", exceptions)
    lines = []
    for r in regressions:
        lines.append(f"{r['test']} [{r['status']}]: {run._first_line(r['detail'])}")
    assert not regressions, (
        f"{len(regressions)} CPython asyncio test(s) pass on the stock loop but not on kloop:\n  "
        + "\n  ".join(lines))


@pytest.mark.conformance
def test_exceptions_are_still_needed(report):
    """An excused test that passes on kloop must leave exceptions.txt."""
    exceptions = run.load_exceptions()
    k = report["loops"].get("kloop")
    assert k is not None and k["unavailable"] is None, "kloop did not run"
    stale = []
    for name in exceptions:
        suite, test = name.split(".", 1)
        res = k["suites"].get(suite, {}).get("results", {}).get(test)
        if res is None:
            stale.append(f"{name}: no such test in this run")
        elif res["status"] == "pass":
            stale.append(f"{name}: passes on kloop now")
    assert not stale, stale


@pytest.mark.conformance
def test_sslproto_hook_tests_pass_on_kloop_sslproto_path(tmp_path):
    """The test_ssl tests excused for driving SSLProtocol's private hooks
    pass on kloop when its TLS goes through asyncio's sslproto."""
    names = [n.split(".", 1)[1] for n, why in run.load_exceptions().items()
             if n.startswith("ssl.") and why.startswith(SSLPROTO_HOOK)]
    if not names:
        pytest.skip("no test_ssl test is excused for sslproto hooks")
    skip, fail = loop_unavailable("kloop")
    if skip:
        pytest.skip(skip)
    if fail:
        pytest.fail(f"kloop cannot be used: {fail}", pytrace=False)
    import subprocess
    script = (
        "import asyncio, sys, unittest\n"
        "import kloop\n"
        "asyncio.set_event_loop_policy(kloop.IouringProactorEventLoopPolicy())\n"
        "from test.test_asyncio import test_ssl\n"
        "suite = unittest.TestSuite(test_ssl.TestSSL(n) for n in sys.argv[1:])\n"
        "result = unittest.TextTestRunner(verbosity=2).run(suite)\n"
        "sys.exit(0 if result.wasSuccessful() and result.testsRun == len(sys.argv) - 1 else 1)\n")
    env = dict(os.environ, KLOOP_TLS="sslproto",
               PYTHONPATH=os.pathsep.join([run.loops.PYTHON_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, *names], env=env, cwd=str(tmp_path),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
