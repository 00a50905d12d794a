"""``python -m kloop``: operate kloop from the command line.

    python -m kloop [info] [--json]         can kloop run here, and if not, why not
    python -m kloop run script.py [args]    run a program with kloop as the loop
    python -m kloop run -m module [args]
    python -m kloop bench ...               the benchmark demo (kloop._bench)
"""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else ("info", [])
    if command == "bench":
        from kloop import _bench
        return _bench.main(rest)
    if command == "run":
        from kloop import _run
        return _run.main(rest)
    if command == "info":
        from kloop import _info
        return _info.main(rest)
    if command.startswith("-") and command not in ("-h", "--help"):
        from kloop import _info   # `python -m kloop --json`
        return _info.main(argv)
    if command in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    print(f"unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
