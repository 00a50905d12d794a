"""``python -m kloop run``: run a program with kloop as asyncio's event loop.

    python -m kloop run script.py [args...]
    python -m kloop run -m module [args...]

The program runs as ``python script.py args...`` (or ``python -m module``)
would run it: ``__name__`` is ``"__main__"``, ``sys.argv`` is
``[script, args...]``, ``sys.path[0]`` is the script's directory, and an
uncaught exception prints its traceback and exits with status 1. Before it
starts, ``kloop.install()`` makes kloop's policy asyncio's, so
``asyncio.run()``, ``asyncio.new_event_loop()`` and ``asyncio.Runner()``
give kloop loops.
"""

import builtins
import importlib.machinery
import os
import runpy
import sys
import types
import zipfile

USAGE = "usage: python -m kloop run script.py [args...] | -m module [args...]"


def _print_exception(exc, first_file):
    """The traceback of `exc` from the program's first frame on (as python prints it)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != first_file:
        tb = tb.tb_next
    if tb is not None:
        exc.with_traceback(tb)   # what is printed is the exception's own traceback
    sys.excepthook(type(exc), exc, exc.__traceback__)


def _run_script(path):
    """Run the file at `path` as the __main__ module, as `python path` does."""
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update({
        "__file__": path,           # absolute, as python 3.9+ sets it
        "__cached__": None,
        "__package__": None,
        "__spec__": None,
        "__loader__": importlib.machinery.SourceFileLoader("__main__", path),
        "__builtins__": builtins,
    })
    # The program is the main module from now on (pickle, multiprocessing and
    # `import __main__` see it), as with `python path`.
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "-m":
        if len(argv) < 2:
            print(f"{USAGE}\n-m needs a module name", file=sys.stderr)
            return 2
        module, args = argv[1], argv[2:]
        spec_origin = None
    else:
        script, args = argv[0], argv[1:]
        if not os.path.exists(script):
            # The words python itself uses, and its status.
            print(f"{sys.executable}: can't open file {os.path.abspath(script)!r}: "
                  f"[Errno 2] No such file or directory", file=sys.stderr)
            return 2
        module = None

    import kloop
    kloop.install()

    if module is not None:
        # As `python -m`: the current directory first on sys.path.
        sys.argv = [module, *args]   # runpy puts the module's file in argv[0]
        sys.path[0] = os.getcwd()
        try:
            import importlib.util
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            spec = None
            error = exc
        else:
            error = None
        if spec is None:
            print(f"{sys.executable}: No module named {module}"
                  + (f" ({error})" if error else ""), file=sys.stderr)
            return 1
        spec_origin = spec.origin
        if spec.submodule_search_locations is not None:  # a package: its __main__
            main_spec = importlib.util.find_spec(module + ".__main__")
            spec_origin = main_spec.origin if main_spec else spec_origin
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
        first_file = spec_origin
    else:
        sys.argv = [script, *args]
        path = os.path.abspath(script)
        sys.path[0] = os.path.dirname(path)
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            run = lambda: _run_script(path)  # noqa: E731
        else:  # a directory or zip file with a __main__.py
            run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
        first_file = path

    try:
        run()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _print_exception(exc, first_file)
        return 1
    return 0
