#!/usr/bin/env python3
"""Print the version that include/kloop.h declares (the single source of truth)."""
import pathlib
import re

header = (pathlib.Path(__file__).resolve().parent.parent / "include" / "kloop.h").read_text()
parts = [re.search(rf"#define KLOOP_VERSION_{p}\s+(\d+)", header).group(1)
         for p in ("MAJOR", "MINOR", "PATCH")]
print(".".join(parts))
