#!/usr/bin/python3
"""Checks that libkloop.so exports exactly its C ABI and nothing of C++.

Usage: check_symbols.py CHECK --lib libkloop.so --map kloop.map --header kloop.h
                        [--nm nm] [--readelf readelf]

CHECK is one of:
  exports      the defined dynamic symbols of the library, the global names
               of the version script and the KLOOP_API prototypes of the
               header are the same three sets, all in a version node of the map
  soname       the soname is libkloop.so.<KLOOP_VERSION_MAJOR of the header>
  no-cxx       no C++ (mangled `_Z`) symbol is exported
  no-eh        the library was built without exceptions: it imports none of
               the C++ exception runtime and carries no exception tables
  no-throw     the library calls no libstdc++ function that throws (throwing
               operator new, std::__throw_*): built with -fno-exceptions, such
               a throw cannot be caught and ends the process in std::terminate
               (abort) instead of returning -ENOMEM or another -errno
  header-lint  the header has nothing an FFI cannot call (no `static`, no
               `inline`), every prototype is KLOOP_API, every name carries
               the kloop prefix, and every function has a comment that names
               it and says `Since:`

Each check prints what it compared and exits 0 (pass) or 1 (fail).
"""
import argparse
import re
import subprocess
import sys

# The C++ exception runtime. A library compiled with -fno-exceptions calls none
# of these: it neither throws, catches, nor unwinds through C++ frames.
EH_IMPORTS = {
    "__cxa_allocate_exception",
    "__cxa_begin_catch",
    "__cxa_end_catch",
    "__cxa_free_exception",
    "__cxa_rethrow",
    "__cxa_throw",
    "__gxx_personality_v0",
    "_Unwind_Resume",
}


def blank(match):
    """The matched text with every character but newlines turned into a space."""
    return re.sub(r"[^\n]", " ", match.group(0))


# libstdc++ entry points that throw. Allocation through the nothrow forms
# (_ZnwmRKSt9nothrow_t, ...) returns NULL instead and is fine.
THROWING_NEW = {"_Znwm", "_Znam", "_ZnwmSt11align_val_t", "_ZnamSt11align_val_t"}
THROW_HELPER = re.compile(r"^_ZSt\d+__throw_\w+")


def strip_comments(text):
    """The header without comments; offsets and line numbers are kept."""
    text = re.sub(r"/\*.*?\*/", blank, text, flags=re.S)
    return re.sub(r"//[^\n]*", blank, text)


def declarations(text):
    """The header without comments and preprocessor directives (offsets kept)."""
    return re.sub(r"(?m)^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", blank, strip_comments(text))


PROTOTYPE = re.compile(r"\bKLOOP_API\b[^;(]*?\b(\w+)\s*\(")


def header_functions(header_text):
    return PROTOTYPE.findall(declarations(header_text))


def map_symbols(map_text):
    """(node names, global names) of a GNU version script."""
    code = re.sub(r"#[^\n]*", "", map_text)
    nodes = re.findall(r"(\w+)\s*\{", code)
    names = []
    for body in re.findall(r"global\s*:(.*?)(?:local\s*:|\})", code, flags=re.S):
        names += [n.strip() for n in body.split(";") if n.strip()]
    return nodes, names


def dynamic_symbols(nm, lib, *flags):
    """[(type, name, version)] of `nm -D` with the given flags."""
    out = subprocess.run([nm, "-D", *flags, lib], check=True, capture_output=True,
                         text=True).stdout
    result = []
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        kind, sym = fields[-2], fields[-1]
        name, _, version = sym.partition("@")
        result.append((kind, name, version.lstrip("@")))
    return result


def check_exports(args):
    header = open(args.header).read()
    nodes, in_map = map_symbols(open(args.map).read())
    in_header = header_functions(header)
    exported = []
    problems = []
    for kind, name, version in dynamic_symbols(args.nm, args.lib, "--defined-only"):
        if kind == "A" and name in nodes:
            continue  # the version node itself
        exported.append(name)
        if version not in nodes:
            problems.append(f"{name} is exported in version {version!r}, not in a node of "
                            f"the map ({', '.join(nodes)})")
    for label, names in (("map", in_map), ("header", in_header), ("library", exported)):
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            problems.append(f"{label} lists twice: {', '.join(dups)}")
    sets = {"library exports": set(exported), "kloop.map": set(in_map),
            "kloop.h KLOOP_API": set(in_header)}
    labels = list(sets)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            only_a = sorted(sets[a] - sets[b])
            only_b = sorted(sets[b] - sets[a])
            if only_a:
                problems.append(f"in {a} but not in {b}: {', '.join(only_a)}")
            if only_b:
                problems.append(f"in {b} but not in {a}: {', '.join(only_b)}")
    print(f"{len(set(exported))} exported, {len(set(in_map))} in the map, "
          f"{len(set(in_header))} in the header; version nodes: {', '.join(nodes)}")
    return problems


def check_soname(args):
    header = open(args.header).read()
    major = re.search(r"#define\s+KLOOP_VERSION_MAJOR\s+(\d+)", header).group(1)
    out = subprocess.run([args.readelf, "-d", args.lib], check=True, capture_output=True,
                         text=True).stdout
    found = re.findall(r"\(SONAME\)\s+Library soname: \[(.*?)\]", out)
    want = f"libkloop.so.{major}"
    print(f"soname {found} (want {want})")
    return [] if found == [want] else [f"soname is {found}, want [{want!r}]"]


def check_no_cxx(args):
    leaked = [f"{name} ({kind})" for kind, name, _ in
              dynamic_symbols(args.nm, args.lib, "--defined-only") if name.startswith("_Z")]
    print(f"{len(leaked)} C++ symbols exported")
    return [f"C++ symbol exported: {s}" for s in leaked]


def check_no_eh(args):
    problems = []
    imports = {name for _, name, _ in dynamic_symbols(args.nm, args.lib, "--undefined-only")}
    for name in sorted(imports & EH_IMPORTS):
        problems.append(f"imports {name}: built with C++ exceptions")
    out = subprocess.run([args.readelf, "-SW", args.lib], check=True, capture_output=True,
                         text=True).stdout
    if ".gcc_except_table" in out:
        problems.append("has a .gcc_except_table section: some code was built with exceptions")
    print(f"{len(imports)} imports, {len(imports & EH_IMPORTS)} of the C++ exception runtime")
    return problems


def check_no_throw(args):
    imports = sorted({name for _, name, _ in
                      dynamic_symbols(args.nm, args.lib, "--undefined-only")})
    throwing = [n for n in imports if n in THROWING_NEW or THROW_HELPER.match(n)]
    if throwing:
        demangled = subprocess.run(["c++filt", *throwing], capture_output=True, text=True,
                                   check=False).stdout.split("\n")
        print("Imported functions that throw; with -fno-exceptions their throw ends the")
        print("process in std::terminate, against kloop.h's 'nothing aborts' (e.g. a")
        print("std:: container growing on memory exhaustion aborts instead of -ENOMEM):")
        for name, pretty in zip(throwing, demangled):
            print(f"  {name}  ({pretty.strip()})")
    print(f"{len(imports)} imports, {len(throwing)} of them throw")
    return [f"imports {n}" for n in throwing]


def check_header_lint(args):
    header = open(args.header).read()
    code = strip_comments(header)
    problems = []
    for lineno, line in enumerate(code.splitlines(), 1):
        for word in ("static", "inline", "__inline", "__inline__", "template", "namespace"):
            if re.search(rf"\b{word}\b", line):
                problems.append(
                    f"{args.header}:{lineno}: `{word}` in the public header: {line.strip()}")
    # Every declaration that looks like a function prototype is KLOOP_API.
    decls = declarations(header)
    for m in re.finditer(r"\b(\w+)\s*\([^;{}]*\)\s*;", decls):
        start = max(decls.rfind(c, 0, m.start()) for c in ";{}") + 1
        if not re.search(r"\bKLOOP_API\b", decls[start:m.end()]):
            problems.append(f"prototype of {m.group(1)} without KLOOP_API")
    # Prefixes: functions, types, tags and macros.
    for name in header_functions(header):
        if not name.startswith("kloop_"):
            problems.append(f"function {name} lacks the kloop_ prefix")
    for name in re.findall(r"(?m)^\s*#\s*define\s+(\w+)", code):
        if not name.startswith("KLOOP_"):
            problems.append(f"macro {name} lacks the KLOOP_ prefix")
    for name in re.findall(r"\bstruct\s+(\w+)", code):
        if not name.startswith("kloop"):
            problems.append(f"struct {name} lacks the kloop prefix")
    for name in re.findall(r"\btypedef\b[^;]*?\b(\w+)\s*;", code):
        if not name.startswith("kloop_"):
            problems.append(f"typedef {name} lacks the kloop_ prefix")
    # Documentation: the last block comment (one that starts a line) before a
    # prototype names the function and says since when it exists.
    comments = [(m.start(), m.group(1)) for m in re.finditer(r"(?ms)^[ \t]*/\*(.*?)\*/", header)]
    documented = 0
    for m in PROTOTYPE.finditer(declarations(header)):
        name = m.group(1)
        before = [text for start, text in comments if start < m.start()]
        last_comment = before[-1] if before else ""
        if not re.search(rf"\b{name}\b", last_comment):
            problems.append(f"{name}: the comment above it does not name it")
        elif "Since:" not in last_comment:
            problems.append(f"{name}: the comment above it has no `Since:`")
        else:
            documented += 1
    print(f"{documented} of {len(header_functions(header))} functions documented with Since:")
    return problems


CHECKS = {
    "exports": check_exports,
    "soname": check_soname,
    "no-cxx": check_no_cxx,
    "no-eh": check_no_eh,
    "no-throw": check_no_throw,
    "header-lint": check_header_lint,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--lib")
    parser.add_argument("--map")
    parser.add_argument("--header", required=True)
    parser.add_argument("--nm", default="nm")
    parser.add_argument("--readelf", default="readelf")
    args = parser.parse_args()
    problems = CHECKS[args.check](args)
    for p in problems:
        print("FAIL:", p)
    print(f"{args.check}: {'FAIL' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
