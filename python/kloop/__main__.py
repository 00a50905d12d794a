"""``python -m kloop``: information about kloop on this machine.

    python -m kloop            library, version, kernel capabilities
    python -m kloop bench ...  the benchmark suite (kloop._bench)
"""

import json
import sys


def _info():
    import kloop
    from kloop import _ffi
    out = {"kloop": kloop.__version__, "python": sys.version.split()[0]}
    try:
        lib, path = _ffi.load()
    except ImportError as exc:
        out["library"] = None
        out["error"] = str(exc)
        print(json.dumps(out, indent=2))
        return 1
    v = lib.kloop_version()
    out["library"] = path
    out["library_version"] = f"{v >> 16}.{(v >> 8) & 0xff}.{v & 0xff}"
    out["supported"] = kloop.is_supported()
    try:
        loop = kloop.new_event_loop()
    except OSError as exc:
        out["error"] = str(exc)
    else:
        try:
            out["caps"] = loop._proactor.caps()
        finally:
            loop.close()
    print(json.dumps(out, indent=2))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from kloop import _bench
        return _bench.main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv and argv[0] not in ("info",):
        print(f"unknown command {argv[0]!r}\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    return _info()


if __name__ == "__main__":
    sys.exit(main())
