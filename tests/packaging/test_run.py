"""`python -m kloop run`: a program runs as `python prog.py` would run it,
with kloop's policy installed."""

import json
import sys
import textwrap

import pytest

from pkg_helpers import kloop_cmd, run, source_env

# Prints what a program can see of how it was started.
PROBE = textwrap.dedent("""
    import asyncio, json, os, sys
    import sibling

    async def main():
        return type(asyncio.get_running_loop()).__module__

    loop_module = asyncio.run(main())
    loop = asyncio.new_event_loop()
    new_loop_module = type(loop).__module__
    loop.close()
    import __main__
    print(json.dumps({
        "name": __name__, "argv": sys.argv, "file": __file__, "path0": sys.path[0],
        "sibling": sibling.VALUE, "main_is_me": __main__.__dict__ is globals(),
        "loop": loop_module, "new_loop": new_loop_module,
        "policy": type(asyncio.get_event_loop_policy()).__name__,
    }))
""")


@pytest.fixture
def prog(tmp_path):
    d = tmp_path / "app"
    d.mkdir()
    (d / "sibling.py").write_text("VALUE = 'from the script directory'\n")
    (d / "prog.py").write_text(PROBE)
    return d / "prog.py"


def test_run_script_as_python_would(prog, tmp_path):
    r = run(kloop_cmd("run", "app/prog.py", "a", "b c"), cwd=tmp_path, env=source_env())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "__main__"
    assert out["argv"] == ["app/prog.py", "a", "b c"]
    assert out["file"] == str(prog)
    assert out["path0"] == str(prog.parent)
    assert out["sibling"] == "from the script directory"
    assert out["main_is_me"] is True
    assert out["loop"].startswith("kloop")
    assert out["new_loop"].startswith("kloop")
    assert out["policy"] == "IouringProactorEventLoopPolicy"

    # The same program under plain python sees the same, except the loop.
    plain = run([sys.executable, "app/prog.py", "a", "b c"], cwd=tmp_path, env=source_env())
    assert plain.returncode == 0, plain.stderr
    ref = json.loads(plain.stdout)
    for key in ("name", "argv", "file", "path0", "sibling", "main_is_me"):
        assert out[key] == ref[key], key
    assert ref["loop"] == "asyncio.unix_events"


def test_run_exception_exits_1_with_the_programs_traceback(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        async def main():
            raise ValueError("boom from the program")
        asyncio.run(main())
    """))
    r = run(kloop_cmd("run", script), env=source_env())
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith(f'  File "{script}", line 5, in <module>'), r.stderr
    assert lines[-1] == "ValueError: boom from the program"
    assert "runpy" not in r.stderr and "_run.py" not in r.stderr
    plain = run([sys.executable, script], env=source_env())
    assert plain.returncode == 1
    assert plain.stderr.splitlines()[:2] == lines[:2]


@pytest.mark.parametrize("code,status,stderr", [
    ("sys.exit(3)", 3, ""),
    ("sys.exit('bye')", 1, "bye\n"),
    ("sys.exit(0)", 0, ""),
])
def test_run_exit_status_as_python(tmp_path, code, status, stderr):
    script = tmp_path / "ex.py"
    script.write_text(f"import sys\n{code}\n")
    r = run(kloop_cmd("run", script), env=source_env())
    assert (r.returncode, r.stderr) == (status, stderr)
    plain = run([sys.executable, script], env=source_env())
    assert (plain.returncode, plain.stderr) == (status, stderr)


def test_run_missing_script_and_usage(tmp_path):
    r = run(kloop_cmd("run", "nope.py"), cwd=tmp_path, env=source_env())
    assert r.returncode == 2
    assert "can't open file" in r.stderr and "nope.py" in r.stderr
    r = run(kloop_cmd("run"), env=source_env())
    assert r.returncode == 2
    assert r.stderr.startswith("usage: python -m kloop run")


def test_run_module(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent("""
        import asyncio, json, sys
        async def main():
            return type(asyncio.get_running_loop()).__module__
        print(json.dumps([__name__, sys.argv, asyncio.run(main())]))
    """))
    r = run(kloop_cmd("run", "-m", "mypkg", "z"), cwd=tmp_path, env=source_env())
    assert r.returncode == 0, r.stderr
    name, argv, loop = json.loads(r.stdout)
    assert name == "__main__"
    assert argv == [str(pkg / "__main__.py"), "z"]
    assert loop.startswith("kloop")
    r = run(kloop_cmd("run", "-m", "no_such_module_here"), cwd=tmp_path, env=source_env())
    assert r.returncode == 1
    assert "No module named no_such_module_here" in r.stderr


def test_unknown_command():
    r = run(kloop_cmd("frobnicate"), env=source_env())
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr
