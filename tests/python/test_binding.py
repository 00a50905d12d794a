"""The CFFI binding (python/kloop/_ffi.py) matches include/kloop.h.

* every prototype of the header is declared in the cdef with the same return
  and parameter types, and nothing else is;
* every struct has the same fields, and the C compiler's sizeof/offsetof of
  the header agree with CFFI's for the cdef;
* every KLOOP_* constant of the header has the same value in _ffi;
* the library exports every declared function, its version has the header's
  major, and a library of another major version is refused with ImportError.
"""

import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON_DIR, ROOT, require_loop

HEADER = os.path.join(ROOT, "include", "kloop.h")


# -- a small parser for the subset of C both files use ------------------------
def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _tokens(s):
    return re.findall(r"\w+|\*|\[|\]", s)


def _norm_type(param):
    """'const void *addr' -> 'const void *'; 'uint32_t' -> 'uint32_t'."""
    toks = _tokens(param)
    if (len(toks) > 1 and re.fullmatch(r"\w+", toks[-1])
            and toks[-1] not in ("int", "char", "void", "long", "short", "unsigned", "signed")
            and not toks[-1].endswith("_t")):
        toks = toks[:-1]
    return " ".join(toks)


def _split_proto(decl):
    decl = " ".join(decl.split())
    m = re.fullmatch(r"(.*?)\b(\w+)\s*\((.*)\)", decl)
    assert m, f"cannot parse prototype {decl!r}"
    ret, name, params = m.groups()
    ps = [p.strip() for p in params.split(",")] if params.strip() else []
    types = tuple(_norm_type(p) for p in ps)
    if types == ("void",):
        types = ()
    return name, (" ".join(_tokens(ret)), types)


def _structs(text):
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        fields = []
        for f in body.split(";"):
            f = " ".join(f.split())
            if f:
                fields.append(" ".join(_tokens(f)))
        out[name] = fields
    return out


def parse_header(text):
    text = _strip_comments(text)
    # Drop preprocessor lines (with continuations).
    text = re.sub(r"^\s*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)
    funcs = dict(_split_proto(d) for d in re.findall(r"KLOOP_API\s+(.*?);", text, flags=re.S))
    return funcs, _structs(text)


def parse_cdef(text):
    text = _strip_comments(text)
    structs = _structs(text)
    body = re.sub(r"struct\s+\w+\s*\{.*?\}\s*;", " ", text, flags=re.S)
    funcs = {}
    for stmt in body.split(";"):
        stmt = " ".join(stmt.split())
        if not stmt or stmt.startswith("typedef") or "(" not in stmt:
            continue
        name, sig = _split_proto(stmt)
        funcs[name] = sig
    return funcs, structs


def header_defines(text):
    """{'KLOOP_CAP_SPLICE': 'expression', ...} of the header's object-like macros."""
    text = _strip_comments(text).replace("\\\n", " ")
    out = {}
    for name, value in re.findall(r"^\s*#define\s+(KLOOP_\w+)(?!\()\s+(.+?)\s*$", text, flags=re.M):
        out[name] = value
    return out


# -- fixtures -----------------------------------------------------------------
@pytest.fixture(scope="module")
def header_text():
    with open(HEADER, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def ffi_mod():
    if PYTHON_DIR not in sys.path:
        sys.path.insert(0, PYTHON_DIR)
    if not os.path.exists(os.path.join(PYTHON_DIR, "kloop", "_ffi.py")):
        pytest.skip("python/kloop/_ffi.py not written yet")
    from kloop import _ffi

    return _ffi


def _compile_and_run(tmp_path, name, code):
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(code)
    r = subprocess.run(
        ["cc", "-std=c11", "-Wall", "-Werror", "-I", os.path.join(ROOT, "include"),
         str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return out


# -- tests --------------------------------------------------------------------
def test_parser_sees_the_whole_header(header_text):
    funcs, structs = parse_header(header_text)
    assert len(funcs) == header_text.count("KLOOP_API ") - 1  # minus the #define
    assert "kloop_poll" in funcs and "kloop_stream_write" in funcs
    assert funcs["kloop_poll"] == (
        "int", ("kloop_t *", "struct kloop_completion *", "uint32_t", "int64_t"))
    assert set(structs) >= {"kloop_caps", "kloop_config", "kloop_completion", "kloop_stats"}


def test_cdef_prototypes_match_header(header_text, ffi_mod):
    h_funcs, _ = parse_header(header_text)
    c_funcs, _ = parse_cdef(ffi_mod.CDEF)
    missing = sorted(set(h_funcs) - set(c_funcs))
    extra = sorted(set(c_funcs) - set(h_funcs))
    assert not missing, f"declared in kloop.h, missing from the cdef: {missing}"
    assert not extra, f"in the cdef but not in kloop.h: {extra}"
    diffs = [f"{n}: header {h_funcs[n]} != cdef {c_funcs[n]}"
             for n in sorted(h_funcs) if h_funcs[n] != c_funcs[n]]
    assert not diffs, "\n".join(diffs)


def test_cdef_struct_fields_match_header(header_text, ffi_mod):
    _, h_structs = parse_header(header_text)
    _, c_structs = parse_cdef(ffi_mod.CDEF)
    assert set(h_structs) == set(c_structs)
    for name in h_structs:
        assert h_structs[name] == c_structs[name], name


def test_struct_layout_matches_c_compiler(header_text, ffi_mod, tmp_path):
    """sizeof/offsetof as gcc lays out kloop.h == as CFFI lays out the cdef."""
    ffi = ffi_mod.ffi
    _, h_structs = parse_header(header_text)
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "kloop.h"',
             "int main(void) {"]
    for s, fields in h_structs.items():
        lines.append(f'  printf("{s} sizeof %zu\\n", sizeof(struct {s}));')
        lines.append(f'  printf("{s} alignof %zu\\n", _Alignof(struct {s}));')
        for f in fields:
            fname = re.findall(r"\w+", f.split("[")[0])[-1]
            lines.append(f'  printf("{s} {fname} %zu %zu\\n", offsetof(struct {s}, {fname}), '
                         f'sizeof(((struct {s} *)0)->{fname}));')
    lines.append("  return 0;\n}")
    out = _compile_and_run(tmp_path, "layout", "\n".join(lines) + "\n")
    checked = 0
    for line in out.splitlines():
        parts = line.split()
        s = parts[0]
        ct = ffi.typeof(f"struct {s}")
        if parts[1] == "sizeof":
            assert ffi.sizeof(ct) == int(parts[2]), f"sizeof(struct {s})"
        elif parts[1] == "alignof":
            assert ffi.alignof(ct) == int(parts[2]), f"alignof(struct {s})"
        else:
            fname, off, size = parts[1], int(parts[2]), int(parts[3])
            assert ffi.offsetof(ct, fname) == off, f"offsetof(struct {s}, {fname})"
            assert ffi.sizeof(dict(ct.fields)[fname].type) == size, f"sizeof {s}.{fname}"
        checked += 1
    assert checked > 40


def test_completion_record_format_matches_struct(ffi_mod):
    """The bulk decoder's struct format describes struct kloop_completion."""
    ffi = ffi_mod.ffi
    fmt = ffi_mod.COMPLETION_FORMAT
    assert struct.calcsize(fmt) == ffi.sizeof("struct kloop_completion") == ffi_mod.COMPLETION_SIZE
    # Each unpacked value lands in the field of the same order.
    rec = ffi.new("struct kloop_completion *")
    rec.token, rec.result, rec.flags, rec.data, rec.event, rec.aux = (
        0x1122334455667788, -104, 1, 0xDEADBEEF00, 5, 7)
    assert struct.unpack(fmt, ffi.buffer(rec)) == (
        0x1122334455667788, -104, 1, 0xDEADBEEF00, 5, 7)


def test_constants_match_header(header_text, ffi_mod, tmp_path):
    defines = header_defines(header_text)
    skip = {"KLOOP_H", "KLOOP_API", "KLOOP_VERSION"}
    names = [n for n in defines if n not in skip]
    rename = {"KLOOP_VERSION_MAJOR": "ABI_MAJOR", "KLOOP_VERSION_MINOR": "ABI_MINOR",
              "KLOOP_VERSION_PATCH": "ABI_PATCH"}
    lines = ['#include <stdio.h>', '#include "kloop.h"', "int main(void) {"]
    for n in names:
        lines.append(f'  printf("{n} %llu\\n", (unsigned long long)({n}));')
    lines.append('  printf("KLOOP_VERSION %llu\\n", (unsigned long long)KLOOP_VERSION);')
    lines.append("  return 0;\n}")
    out = _compile_and_run(tmp_path, "consts", "\n".join(lines) + "\n")
    missing, wrong = [], []
    for line in out.splitlines():
        n, v = line.split()
        py = "ABI_VERSION" if n == "KLOOP_VERSION" else rename.get(n, n[len("KLOOP_"):])
        if not hasattr(ffi_mod, py):
            missing.append(f"{n} (as _ffi.{py})")
        elif getattr(ffi_mod, py) != int(v):
            wrong.append(f"{n} = {v} but _ffi.{py} = {getattr(ffi_mod, py)}")
    assert not wrong, wrong
    assert not missing, f"header constants without a Python twin: {missing}"


def test_library_exports_every_declared_function(ffi_mod):
    require_loop("kloop")
    lib, path = ffi_mod.load()
    funcs, _ = parse_cdef(ffi_mod.CDEF)
    absent = []
    for name in funcs:
        try:
            getattr(lib, name)
        except AttributeError:
            absent.append(name)
    assert not absent, f"{path} lacks {absent}"
    v = lib.kloop_version()
    assert v >> 16 == ffi_mod.ABI_MAJOR
    assert v >= ffi_mod.ABI_VERSION, "library older than the header the binding was written for"


FAKE_LIB = textwrap.dedent("""
    #include <stdint.h>
    uint32_t kloop_version(void) { return (uint32_t)MAJOR << 16 | 1u << 8; }
    int kloop_probe(void *caps) { (void)caps; return 0; }
""")


@pytest.mark.parametrize("major", [1, 255])
def test_wrong_major_version_refused(ffi_mod, tmp_path, major):
    src = tmp_path / "fake.c"
    src.write_text(FAKE_LIB)
    so = tmp_path / f"libkloop.so.{major}"
    subprocess.run(["cc", "-shared", "-fPIC", f"-DMAJOR={major}", str(src), "-o", str(so)],
                   check=True)
    probe = textwrap.dedent("""
        import json, sys
        out = {}
        import kloop
        try:
            kloop._ffi.load()
            out["load"] = "ok"
        except BaseException as e:
            out["load"] = [type(e).__name__, str(e)]
        try:
            kloop.new_event_loop().close()
            out["new_event_loop"] = "ok"
        except BaseException as e:
            out["new_event_loop"] = [type(e).__name__, str(e)]
        out["is_supported"] = kloop.is_supported()
        print(json.dumps(out))
    """)
    env = dict(os.environ, KLOOP_LIBRARY=str(so), PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["load"][0] == "ImportError", out
    assert f"major {major}" in out["load"][1] or f"{major}." in out["load"][1], out
    assert out["new_event_loop"][0] == "ImportError", out
    assert out["is_supported"] is False


def test_missing_library_is_importerror(ffi_mod, tmp_path):
    probe = textwrap.dedent("""
        import kloop
        try:
            kloop.new_event_loop()
        except ImportError as e:
            print("ImportError", "KLOOP_LIBRARY" in str(e))
        print("supported", kloop.is_supported())
    """)
    env = dict(os.environ, KLOOP_LIBRARY=str(tmp_path / "nonexistent.so"), PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ImportError", "True", "supported", "False"]
