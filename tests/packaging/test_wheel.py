"""pip install: sdist -> wheel -> a fresh venv -> kloop from outside the tree.

One module-scoped build (about 15 s on two cores):
  1. the working tree (tracked and new, not ignored files) is copied into a
     temporary git repository, because meson-python's sdist is `meson dist`,
     which takes the files git knows;
  2. the sdist is built with meson-python's PEP 517 hook and unpacked: a
     wheel is built from the unpacked sdist alone (so the sdist has
     everything needed to build), with Debian's pip and
     `--no-build-isolation` (there is no PyPI here);
  3. a fresh venv (`--system-site-packages`, for CFFI) gets the wheel with
     `pip install --no-index --no-deps`;
  4. kloop is imported there from a directory outside any source tree, with
     no PYTHONPATH and no KLOOP_LIBRARY, and echoes over TCP with the library
     bundled inside the installed package.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from pkg_helpers import DEBIAN_PYTHON, ECHO_SCRIPT, ROOT, clean_env, run

pytestmark = pytest.mark.skipif(
    not os.path.exists(DEBIAN_PYTHON), reason=f"{DEBIAN_PYTHON} (Debian's Python) is missing")


def _header_version():
    with open(os.path.join(ROOT, "include", "kloop.h")) as f:
        text = f.read()
    return ".".join(re.search(rf"#define KLOOP_VERSION_{p}\s+(\d+)", text).group(1)
                    for p in ("MAJOR", "MINOR", "PATCH"))


def _tree_files():
    """Files of the working tree: tracked (still present) and new, not ignored."""
    # .git is a directory in a clone, a file in a linked worktree (git worktree add)
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.fail(f"{ROOT} is not a git checkout: cannot tell which files are the source")
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names
            if os.path.isfile(os.path.join(ROOT, n)) and not n.startswith((".mesonpy", "dist/"))]


class Built:
    """What the module fixture made."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    b = Built()
    env = clean_env()

    # 1. A git repository holding the working tree.
    b.src = base / "src"
    b.files = _tree_files()
    for name in b.files:
        dest = b.src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), dest)
    git = ["git", "-C", b.src, "-c", "user.name=kloop tests",
           "-c", "user.email=tests@kloop.invalid", "-c", "commit.gpgsign=false"]
    run(["git", "init", "-q", b.src], check=True, env=env)
    run(git + ["add", "-A"], check=True, env=env)
    run(git + ["commit", "-q", "-m", "snapshot"], check=True, env=env)

    # 2. sdist, then a wheel from the unpacked sdist alone.
    b.sdist_dir = base / "sdist"
    b.sdist_dir.mkdir()
    r = run([DEBIAN_PYTHON, "-c", "import mesonpy, sys; print(mesonpy.build_sdist(sys.argv[1]))",
             b.sdist_dir], cwd=b.src, env=env, check=True, timeout=300)
    b.sdist = b.sdist_dir / r.stdout.strip().splitlines()[-1]
    with tarfile.open(b.sdist) as tar:
        b.sdist_names = tar.getnames()
        tar.extractall(base / "unpacked")
    (b.unpacked,) = (base / "unpacked").iterdir()
    b.dist = base / "dist"
    run([DEBIAN_PYTHON, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
         "-w", b.dist, b.unpacked], cwd=base, env=env, check=True, timeout=600)
    (b.wheel,) = glob.glob(str(b.dist / "kloop-*.whl"))

    # 3. A fresh venv with the wheel installed.
    b.venv = base / "venv"
    run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", b.venv], env=env, check=True)
    b.python = b.venv / "bin" / "python"
    run([b.python, "-m", "pip", "install", "--no-index", "--no-deps", b.wheel], env=env,
        check=True)
    r = run([b.python, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
            env=env, check=True)
    b.platlib = r.stdout.strip()

    # 4. Somewhere outside any source tree to run from.
    b.outside = base / "elsewhere"
    b.outside.mkdir()
    return b


def test_sdist_has_every_source_file(built):
    """The sdist holds every file of the tree (and PKG-INFO), so a build from it works."""
    top = built.sdist_names[0].split("/")[0]
    assert top == f"kloop-{_header_version()}"
    inside = {n.split("/", 1)[1] for n in built.sdist_names if "/" in n}
    members = {n for n in inside if (built.unpacked / n).is_file()}
    assert "PKG-INFO" in members
    missing = set(built.files) - members
    assert not missing, f"files of the tree missing from the sdist: {sorted(missing)}"
    for needed in ("pyproject.toml", "meson.build", "meson_options.txt", "include/kloop.h",
                   "libkloop/meson.build", "libkloop/kloop.map", "scripts/version.py",
                   "python/kloop/__init__.py"):
        assert needed in members


def test_wheel_holds_package_and_library_only(built):
    version = _header_version()
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(f"kloop-{version}.dist-info/METADATA").decode()
    assert os.path.basename(built.wheel).startswith(f"kloop-{version}-")
    libs = [n for n in names if n.startswith("kloop/libkloop.so")]
    assert libs == [f"kloop/libkloop.so.{version}"], names
    modules = {n for n in names if n.startswith("kloop/") and n.endswith(".py")}
    sources = {"kloop/" + os.path.basename(p)
               for p in glob.glob(os.path.join(ROOT, "python", "kloop", "*.py"))}
    assert modules == sources, "the wheel's modules differ from python/kloop/*.py"
    # Not for pip: the C header, kloop.pc, bytecode, bundled-libs directories.
    unexpected = [n for n in names
                  if n.endswith((".h", ".pc", ".pyc")) or ".mesonpy.libs" in n or ".data/" in n]
    assert not unexpected, unexpected
    assert f"Version: {version}" in metadata
    assert "Requires-Dist: cffi" in metadata
    # The CFFI API-mode module, for this Python, next to the library.
    (module,) = [n for n in names if n.startswith("kloop/_cffi_api.")]
    assert module == "kloop/_cffi_api" + _ext_suffix(), names


def _ext_suffix():
    r = run([DEBIAN_PYTHON, "-c",
             "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"], check=True)
    return r.stdout.strip()


def _dynamic(path):
    """{'NEEDED': [...], 'RPATH': [...], 'RUNPATH': [...]} of an ELF file (readelf -d)."""
    out = {"NEEDED": [], "RPATH": [], "RUNPATH": []}
    r = run(["readelf", "-d", path], check=True)
    for tag, value in re.findall(r"\((NEEDED|RPATH|RUNPATH)\)\s+[^\[]*\[(.*)\]", r.stdout):
        out[tag] += [value] if tag == "NEEDED" else value.split(":")
    return out


def test_installed_api_module_links_only_the_bundled_library(built):
    """RPATH $ORIGIN (DT_RPATH: before LD_LIBRARY_PATH) and the library's full-version SONAME."""
    package_dir = os.path.join(built.platlib, "kloop")
    module = os.path.join(package_dir, "_cffi_api" + _ext_suffix())
    dyn = _dynamic(module)
    assert dyn["RPATH"] in (["$ORIGIN"], ["$ORIGIN/"]), dyn
    assert dyn["RUNPATH"] == [], dyn
    version = _header_version()
    assert f"libkloop.so.{version}" in dyn["NEEDED"], dyn
    assert os.path.isfile(os.path.join(package_dir, f"libkloop.so.{version}"))


def test_installed_kloop_echoes_with_its_bundled_library(built):
    r = run([built.python, "-c", ECHO_SCRIPT], cwd=built.outside, env=clean_env(), check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    package_dir = os.path.join(built.platlib, "kloop")
    assert out["kloop_file"] == os.path.join(package_dir, "__init__.py")
    assert os.path.dirname(out["library"]) == package_dir, out
    assert os.path.basename(out["library"]).startswith("libkloop.so")
    assert out["loop"] == "kloop.events.IouringProactorEventLoop"
    assert out["version"] == _header_version()
    # Through the compiled API-mode module of the package.
    assert out["binding"] == "api", out
    assert out["module"] == os.path.join(package_dir, "_cffi_api" + _ext_suffix())


def test_installed_kloop_ignores_other_libraries(built, tmp_path):
    """Another libkloop on LD_LIBRARY_PATH is not used; KLOOP_LIBRARY naming another
    file means ABI mode with that file; naming the bundled one keeps API mode."""
    package_dir = os.path.join(built.platlib, "kloop")
    version = _header_version()
    bundled = os.path.join(package_dir, f"libkloop.so.{version}")
    other = tmp_path / "other"
    other.mkdir()
    for name in (f"libkloop.so.{version}", f"libkloop.so.{version.split('.')[0]}"):
        shutil.copy2(bundled, other / name)

    def echo(**extra):
        r = run([built.python, "-c", ECHO_SCRIPT], cwd=built.outside, env=clean_env(**extra),
                check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    out = echo(LD_LIBRARY_PATH=str(other))
    assert (out["binding"], os.path.dirname(out["library"])) == ("api", package_dir), out
    out = echo(KLOOP_LIBRARY=str(other / f"libkloop.so.{version}"))
    assert (out["binding"], out["library"]) == ("abi", str(other / f"libkloop.so.{version}")), out
    assert out["module"] is None
    assert "no compiled module _cffi_api in " + str(other) in out["reason"], out
    out = echo(KLOOP_LIBRARY=bundled)
    assert (out["binding"], out["library"]) == ("api", bundled), out
    out = echo(KLOOP_FFI="abi")
    assert (out["binding"], os.path.dirname(out["library"])) == ("abi", package_dir), out


def test_installed_info_and_run(built, tmp_path):
    env = clean_env()
    r = run([built.python, "-m", "kloop", "info", "--json"], cwd=built.outside, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["ok"] is True
    assert info["library"]["path"].startswith(os.path.join(built.platlib, "kloop") + os.sep)
    assert info["kloop"]["package"] == os.path.join(built.platlib, "kloop")
    assert info["binding"]["mode"] == "api", info["binding"]
    assert os.path.dirname(info["binding"]["module"]) == os.path.join(built.platlib, "kloop")

    script = tmp_path / "prog.py"
    script.write_text("import asyncio, sys\n"
                      "async def main():\n"
                      "    return type(asyncio.get_running_loop()).__module__\n"
                      "print(asyncio.run(main()), sys.argv[1:])\n")
    r = run([built.python, "-m", "kloop", "run", script, "x"], cwd=built.outside, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kloop.events ['x']"


def test_c_install_is_unchanged_by_default(built, tmp_path):
    """Without -Dpython_package, meson installs the library, header and kloop.pc as before."""
    build = tmp_path / "build-c"
    run(["meson", "setup", build, built.src, "-Dtests=false", "-Dbenchmarks=false"],
        env=clean_env(), check=True, timeout=300)
    r = run(["meson", "introspect", build, "--install-plan"], env=clean_env(), check=True)
    plan = json.loads(r.stdout)
    destinations = sorted(d["destination"] for group in plan.values() for d in group.values())
    version = _header_version()
    assert destinations == sorted([f"{{libdir_shared}}/libkloop.so.{version}",
                                   "{includedir}/kloop.h", "{libdir}/pkgconfig/kloop.pc"])


def test_python_package_option_installs_into_platlib(built, tmp_path):
    """With -Dpython_package=true: the package and the library under Python's platlib only."""
    build = tmp_path / "build-py"
    run(["meson", "setup", build, built.src, "-Dtests=false", "-Dbenchmarks=false",
         "-Dpython_package=true"],
        env=clean_env(), check=True, timeout=300)
    r = run(["meson", "introspect", build, "--install-plan"], env=clean_env(), check=True)
    plan = json.loads(r.stdout)
    destinations = [d["destination"] for group in plan.values() for d in group.values()]
    assert destinations and all(d.startswith("{py_platlib}/kloop/") for d in destinations), \
        destinations
    assert f"{{py_platlib}}/kloop/libkloop.so.{_header_version()}" in destinations
    assert "{py_platlib}/kloop/_cffi_api" + _ext_suffix() in destinations
    assert "{py_platlib}/kloop/__init__.py" in destinations


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
