"""The test harness enforces what it promises: a leaked socket (ResourceWarning)
or an unexpected call to the loop's exception handler fails a test, and the
`loop` fixture really gives each kind of loop."""

import os
import shutil
import textwrap

import pytest

from conftest import ROOT

pytest_plugins = ["pytester"]


@pytest.fixture
def inner(pytester):
    """A pytester with this repository's pytest.ini and conftest."""
    shutil.copy(os.path.join(ROOT, "pytest.ini"), pytester.path / "pytest.ini")
    (pytester.path / "tests").mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), pytester.path / "tests" / "conftest.py")
    (pytester.path / "tests" / "python").mkdir()
    # conftest.py finds tests/conformance/loops.py and python/ relative to itself.
    shutil.copytree(os.path.join(ROOT, "tests", "conformance"),
                    pytester.path / "tests" / "conformance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(os.path.join(ROOT, "python"), pytester.path / "python")
    return pytester


def _write(inner, body):
    p = inner.path / "tests" / "python" / "test_inner.py"
    p.write_text(textwrap.dedent(body))
    return p


def test_resource_warning_fails_the_test(inner):
    _write(inner, """
        import gc, socket

        def test_leaks_a_socket():
            socket.socket()
            gc.collect()
    """)
    res = inner.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*ResourceWarning*unclosed*socket*"])


def test_unexpected_exception_handler_call_fails_the_test(inner):
    _write(inner, """
        import asyncio

        def test_callback_raises(loop):
            def bad():
                raise ValueError("unseen")

            async def main():
                loop.loop.call_soon(bad)
                await asyncio.sleep(0.01)

            loop.run(main())
    """)
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "asyncio")
    # The fixture reports it when it tears down: the run fails with an error.
    res.assert_outcomes(passed=1, errors=1)
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*1 unexpected call(s) to the exception handler on asyncio*",
                              "*ValueError('unseen')*"])


def test_expected_errors_do_not_fail(inner):
    _write(inner, """
        import asyncio

        def test_callback_raises(loop):
            errors = loop.expect_errors()

            def bad():
                raise ValueError("seen")

            async def main():
                loop.loop.call_soon(bad)
                await asyncio.sleep(0.01)

            loop.run(main())
            assert str(errors[0]["exception"]) == "seen"
    """)
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "asyncio")
    res.assert_outcomes(passed=1)


def test_loop_fixture_gives_each_kind(loop):
    mod = type(loop.loop).__module__
    expected = {"asyncio": "asyncio", "kloop": "kloop", "uvloop": "uvloop"}[loop.name]
    assert mod.split(".")[0] == expected
