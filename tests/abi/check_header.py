#!/usr/bin/python3
"""Compiles a translation unit that includes kloop.h first, with strict flags.

Usage: check_header.py c11|cxx20 SOURCE INCLUDE_DIR COMPILER [COMPILER...]

Each COMPILER is a command line (e.g. "ccache cc"); every one must accept the
unit with every warning an error. Both GCC and Clang are worth passing: they
warn about different things.
"""
import os
import shlex
import subprocess
import sys
import tempfile

FLAGS = {
    "c11": ["-x", "c", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic",
            "-Wstrict-prototypes", "-Wmissing-prototypes", "-Wundef", "-Wshadow"],
    "cxx20": ["-x", "c++", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-pedantic",
              "-Wundef", "-Wshadow", "-Wold-style-cast", "-fno-exceptions"],
}


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in FLAGS:
        print(__doc__)
        return 2
    std, source, include_dir = sys.argv[1:4]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for compiler in sys.argv[4:]:
            cmd = shlex.split(compiler) + FLAGS[std] + ["-I", include_dir, "-c", source,
                                                        "-o", os.path.join(tmp, "unit.o")]
            print("$", shlex.join(cmd), flush=True)
            rc = subprocess.run(cmd).returncode
            print(f"{compiler}: {'ok' if rc == 0 else f'FAIL (exit {rc})'}", flush=True)
            failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
