"""The linters run by the test command: scripts/lint.sh must find nothing.

Each linter is its own case, so a failure says which one (and its output
lists the files and findings). How to fix: CONTRIBUTING.md, scripts/lint.sh.
"""

import os
import shutil

import pytest

from pkg_helpers import ROOT, clean_env, run

LINT = os.path.join(ROOT, "scripts", "lint.sh")


@pytest.mark.parametrize("linter,tool", [
    ("format", "clang-format"),
    ("tidy", "clang-tidy"),
    ("python", None),
])
def test_lint(linter, tool):
    if tool and not shutil.which(tool):
        pytest.fail(f"{tool} is not installed (Debian package {tool}; scripts/setup.sh)")
    env = clean_env(KLOOP_LINT=linter)
    r = run(["bash", LINT], cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, f"scripts/lint.sh ({linter}) found problems:\n{r.stdout[-6000:]}"
    assert "lint: all clean" in r.stdout
