#!/usr/bin/env python3
"""Writes the C source of kloop's CFFI API-mode module (meson runs it).

    scripts/cffi_api.py python/kloop/_ffi.py OUT.c

The declarations are ``CDEF`` of python/kloop/_ffi.py, the one copy the ABI
mode uses too; it is read from the file's syntax tree, not imported, so that
generating the source runs none of the package's code. Two constants are
added for the package to check the module it finds (_ffi._check_api_module):

* KLOOP_CFFI_CDEF_HASH: a hash of that CDEF text (a module generated from
  another version of _ffi.py is stale and not used);
* KLOOP_CFFI_HEADER_VERSION: KLOOP_VERSION of the kloop.h it was compiled
  with (the library it loads must report the same version).

CDEF is checked against kloop.h once more: the generated code calls each
function with the declared parameter types (the compiler warns on a
mismatch), and CFFI compares the struct layouts the compiler gave with the
cdef's when the module loads.

The GIL: CFFI's wrappers release it around every C call. Only the calls in
RELEASE_GIL can wait (kloop_poll) or take long (creating, probing and
tearing down a ring, ...); every other kloop_* function returns at once,
and releasing and taking back the GIL costs more than most of them (~340
instructions against the ~470 of a 1 KiB kloop_stream_write(), counted by
callgrind), so their wrappers keep it. A write is the exception when it is
large: copying or encrypting it takes long enough for other threads to want
the GIL, so kloop_stream_write() lets go of it from RELEASE_GIL_FROM bytes
on, as Python's socket and ssl modules do for every call. hold_gil()
rewrites the generated source and fails the build if CFFI's output no
longer has the expected shape.
"""

import ast
import hashlib
import re
import sys

import cffi

MODULE = "kloop._cffi_api"

# The functions called with the GIL released: they wait, or may take long.
RELEASE_GIL = frozenset({
    "kloop_poll",               # waits for completions
    "kloop_wake",               # called from other threads
    "kloop_create",             # sets up a ring (syscalls, memory)
    "kloop_destroy",            # cancels and reaps what is in flight
    "kloop_probe",              # creates and destroys a ring
    "kloop_cancel_now",         # enters the kernel at once
    "kloop_stream_start_tls",   # builds an SSL object
})

# kloop_stream_write(loop, token, buf, len) releases the GIL from this
# many bytes on (its fourth argument, x3 in CFFI's wrapper).
RELEASE_GIL_FROM = 65536
CONDITIONAL = {"kloop_stream_write": f"x3 >= {RELEASE_GIL_FROM}"}


def read_cdef(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "CDEF" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}: no top-level CDEF = '...' assignment")


def cdef_hash(text):
    # The same formula as _ffi.cdef_hash: were they to differ, no module would
    # ever be used (tests/python/test_ffi_modes.py would fail).
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def hold_gil(source, names, conditional=None):
    """`source` with the wrappers of `names` calling C with the GIL held.

    CFFI writes each CPython wrapper as _cffi_f_NAME(PyObject *self, ...)
    with the call between a Py_BEGIN_ALLOW_THREADS and a
    Py_END_ALLOW_THREADS line; both lines of each named wrapper go, or, for
    a name in `conditional`, release the GIL only when its C condition on
    the converted arguments holds.
    """
    conditional = conditional or {}
    for name in sorted(names):
        m = re.search(r"\n_cffi_f_%s\(PyObject \*self, PyObject \*\w+\)\n\{\n(.*?)\n\}\n"
                      % re.escape(name), source, re.S)
        if m is None:
            raise SystemExit(f"cffi_api.py: no wrapper _cffi_f_{name} in CFFI's output")
        body = m.group(1)
        lines = body.split("\n")
        gil_lines = ("Py_BEGIN_ALLOW_THREADS", "Py_END_ALLOW_THREADS")
        kept = [x for x in lines if x.strip() not in gil_lines]
        if len(lines) - len(kept) != 2:
            raise SystemExit(f"cffi_api.py: _cffi_f_{name} does not release the GIL the "
                             "way this script expects; update hold_gil()")
        if name in conditional:
            cond = conditional[name]
            kept = [
                f"  {{ PyThreadState *_save = ({cond}) ? PyEval_SaveThread() : NULL;"
                if x.strip() == "Py_BEGIN_ALLOW_THREADS" else
                "  if (_save) PyEval_RestoreThread(_save); }"
                if x.strip() == "Py_END_ALLOW_THREADS" else x
                for x in lines]
        source = source[:m.start(1)] + "\n".join(kept) + source[m.end(1):]
    return source


def declared_functions(cdef):
    return set(re.findall(r"\b(kloop_\w+)\s*\(", cdef))


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    cdef = read_cdef(argv[1])
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.cdef("#define KLOOP_CFFI_CDEF_HASH ...\n#define KLOOP_CFFI_HEADER_VERSION ...")
    ffi.set_source(MODULE, "\n".join([
        '#include "kloop.h"',
        f"#define KLOOP_CFFI_CDEF_HASH 0x{cdef_hash(cdef):x}ULL",
        "#define KLOOP_CFFI_HEADER_VERSION KLOOP_VERSION",
    ]))
    ffi.emit_c_code(argv[2])
    with open(argv[2], encoding="utf-8") as f:
        source = f.read()
    hold = declared_functions(cdef) - RELEASE_GIL
    with open(argv[2], "w", encoding="utf-8") as f:
        f.write(hold_gil(source, hold, CONDITIONAL))


if __name__ == "__main__":
    main(sys.argv)
