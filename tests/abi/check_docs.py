#!/usr/bin/python3
"""Checks that docs/abi.md documents exactly the functions of kloop.h.

Usage: check_docs.py HEADER DOC

For every KLOOP_API function of the header the document has one
"#### name" section whose C synopsis is the header's prototype (spacing
aside, without KLOOP_API) and whose "**Since**:" matches the `Since:` of the
header's comment, and which says what it returns, its errors, its parameters
and its thread safety. No section documents a function the header lacks, and
every KLOOP_ macro of the header is mentioned.
"""
import re
import sys

import check_symbols


def normalize(text):
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s*([(),*;])\s*", r"\1", text)
    return text


def header_info(text):
    """{name: (prototype, since)} and the set of macro names."""
    decls = check_symbols.declarations(text)
    comments = [(m.start(), m.group(1)) for m in
                re.finditer(r"(?ms)^[ \t]*/\*(.*?)\*/", text)]
    functions = {}
    for m in re.finditer(r"\bKLOOP_API\s+([^;]*;)", decls):
        name = re.search(r"(\w+)\s*\(", m.group(1)).group(1)
        before = [c for start, c in comments if start < m.start()]
        since = re.search(r"Since:\s*([\d.]+)", before[-1] if before else "")
        functions[name] = (normalize(m.group(1)), since.group(1) if since else None)
    macros = set(re.findall(r"(?m)^\s*#\s*define\s+(KLOOP_\w+)",
                            check_symbols.strip_comments(text)))
    return functions, macros - {"KLOOP_H", "KLOOP_API"}


def doc_sections(text):
    sections = {}
    for m in re.finditer(r"(?ms)^#### (\w+)\n(.*?)(?=^#{1,4} |\Z)", text):
        sections.setdefault(m.group(1), []).append(m.group(2))
    return sections


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    functions, macros = header_info(open(sys.argv[1]).read())
    doc = open(sys.argv[2]).read()
    sections = doc_sections(doc)
    problems = []
    for name in sorted(set(sections) - set(functions)):
        problems.append(f"{name}: documented, but not in the header")
    for name, (prototype, since) in sorted(functions.items()):
        if name not in sections:
            problems.append(f"{name}: no '#### {name}' section")
            continue
        if len(sections[name]) > 1:
            problems.append(f"{name}: {len(sections[name])} sections")
        body = sections[name][0]
        synopsis = re.search(r"```c\n(.*?)```", body, flags=re.S)
        if not synopsis or normalize(synopsis.group(1)) != prototype:
            got = normalize(synopsis.group(1)) if synopsis else None
            problems.append(f"{name}: synopsis {got!r} differs from the header's {prototype!r}")
        doc_since = re.search(r"\*\*Since\*\*:\s*([\d.]+)", body)
        if not since:
            problems.append(f"{name}: the header gives no Since:")
        elif not doc_since or doc_since.group(1) != since:
            problems.append(f"{name}: Since {doc_since and doc_since.group(1)} in the doc, "
                            f"{since} in the header")
        for part in ("Parameters", "Returns", "Errors", "Thread safety"):
            if f"**{part}**" not in body:
                problems.append(f"{name}: no **{part}**")
    for macro in sorted(macros):
        if not re.search(rf"\b{macro}\b", doc):
            problems.append(f"{macro}: defined in the header, never mentioned in the doc")
    for p in problems:
        print("FAIL:", p)
    print(f"{len(functions)} functions and {len(macros)} macros in the header, "
          f"{len(sections)} function sections in the doc: {'FAIL' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
