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
"""

import ast
import hashlib
import sys

import cffi

MODULE = "kloop._cffi_api"


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


if __name__ == "__main__":
    main(sys.argv)
