"""Child side of the conformance runner: run one suite on one loop.

    python3 run_class.py --loop kloop --suite events --events out.jsonl \
        [--skip-file skip.json]

Writes one JSON object per line to --events, flushed as it goes, so that the
parent knows which test was running when this process hung or died:

    {"event": "plan", "tests": [...all names...], "run": [...to run now...]}
    {"event": "start", "test": NAME}
    {"event": "result", "test": NAME, "status": S, "detail": TEXT, "time": SECS}
    {"event": "class_error", "where": TEXT, "detail": TEXT}
    {"event": "done"}

S is one of pass, fail, error, skip, xfail, xpass.  SIGUSR1 dumps every
thread's Python stack to stderr (the parent sends it before killing a hang).
"""

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
import unittest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import loops  # noqa: E402

DETAIL_LIMIT = 6000


class _Emitter:
    def __init__(self, path):
        self._fp = open(path, "a", encoding="utf-8")

    def __call__(self, **obj):
        self._fp.write(json.dumps(obj) + "\n")
        self._fp.flush()


def _clip(text):
    if len(text) > DETAIL_LIMIT:
        half = DETAIL_LIMIT // 2
        return text[:half] + "\n[...]\n" + text[-half:]
    return text


_RANK = {"pass": 0, "skip": 1, "xfail": 1, "xpass": 2, "fail": 3, "error": 4}


class StreamingResult(unittest.TestResult):
    """Reports each test as it starts and once with its final status."""

    def __init__(self, emit):
        super().__init__()
        self._emit = emit
        self._status = None
        self._detail = ""
        self._t0 = 0.0

    def _set(self, status, detail=""):
        if self._status is None or _RANK[status] > _RANK[self._status]:
            self._status = status
            self._detail = detail
        elif detail and status == self._status:
            self._detail = _clip(self._detail + "\n" + detail)

    def startTest(self, test):
        super().startTest(test)
        self._status = None
        self._detail = ""
        self._t0 = time.monotonic()
        self._emit(event="start", test=test._testMethodName)

    def stopTest(self, test):
        super().stopTest(test)
        self._emit(
            event="result",
            test=test._testMethodName,
            status=self._status or "pass",
            detail=self._detail,
            time=round(time.monotonic() - self._t0, 3),
        )

    def _fmt(self, err, test):
        return _clip(self._exc_info_to_string(err, test))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set("pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set("fail", self._fmt(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._set("error", self._fmt(err, test))
        else:  # setUpClass / tearDownClass / module fixtures
            self._emit(
                event="class_error",
                where=str(test),
                detail=_clip("".join(traceback.format_exception(*err))),
            )

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        if isinstance(test, unittest.TestCase):
            self._set("skip", reason)
        else:
            self._emit(event="class_error", where=str(test), detail="skipped: " + reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set("xfail", self._fmt(err, test))

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set("xpass", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._set("fail" if failure else "error", f"{subtest}:\n" + self._fmt(err, test))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", required=True, choices=loops.LOOP_NAMES)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--skip-file")
    ap.add_argument("--list", action="store_true", help="only emit the plan")
    args = ap.parse_args(argv)

    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    emit = _Emitter(args.events)

    reason = loops.availability(args.loop)
    if reason is not None:
        emit(event="unavailable", reason=reason)
        return 3

    import suites

    asyncio.set_event_loop_policy(loops.make_policy(args.loop))
    classes = suites.build(loops.loop_factory(args.loop))
    if args.suite not in classes:
        emit(event="unavailable", reason=f"suite {args.suite} does not exist here")
        return 3
    cls = classes[args.suite]

    skip = set()
    if args.skip_file:
        with open(args.skip_file, encoding="utf-8") as fp:
            skip = set(json.load(fp))
    names = list(unittest.TestLoader().getTestCaseNames(cls))
    run = [n for n in names if n not in skip]
    emit(event="plan", tests=names, run=run)
    if args.list or not run:
        emit(event="done")
        return 0

    suite = unittest.TestSuite(cls(n) for n in run)
    result = StreamingResult(emit)
    suite.run(result)
    # Module-level fixtures of the CPython test modules (tearDownModule resets
    # the policy) do not run for classes defined here; nothing else is left.
    emit(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
