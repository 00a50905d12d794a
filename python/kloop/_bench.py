"""`python -m kloop bench`: a short side-by-side echo benchmark.

Runs the four cells of the project's target table (Protocol and streams
echo, 1 KiB and 100 KiB, 10 and 100 connections) once each on the stock
asyncio loop, uvloop and kloop, with the server pinned to CPU 0 and the
native load generator to CPU 1, and prints requests per second, the server's
CPU time per request and the ratios. It takes about 40 seconds.

It is a demonstration, not the measurement: one short round per server.
For figures worth quoting use benchmarks/run.py (interleaved rounds,
medians, min-max, interference check) as docs/performance.md describes.

Needs a source checkout built by scripts/setup.sh (the load generator lives
in build/benchmarks/loadgen and the driver in benchmarks/run.py).
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent.parent
_RUN_PY = _ROOT / "benchmarks" / "run.py"


def _load_driver():
    spec = importlib.util.spec_from_file_location("_kloop_bench_driver", _RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.width = 0

    def __call__(self, done, total, msg):
        if msg.startswith("  "):
            if not self.tty:
                print(f"    {msg.strip()}", file=self.stream, flush=True)
            return
        bar_len = 20
        filled = bar_len * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (bar_len - filled)}] {done + 1}/{total} {msg}"
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self.width = len(line)
        else:
            print(line, file=self.stream, flush=True)

    def finish(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def _table(drv, rows, loops):
    def ratio(row, a, b):
        rt = row["ratios"].get(f"{a}/{b}")
        return f"{rt['rps']:.2f}x" if rt else "n/a"

    head = ["cell"] + [f"{lp} req/s" for lp in loops] + \
        [f"{lp} CPU us/req" for lp in loops]
    pairs = [(a, b) for a, b in (("kloop", "uvloop"), ("kloop", "asyncio"))
             if a in loops and b in loops]
    head += [f"{a}/{b}" for a, b in pairs]
    lines = []
    for row in rows:
        cells = [drv.cell_label(row["kind"], row["size"], row["conns"])]
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append(f"{d['rps']:,.0f}" if d.get("n") else "n/a")
        for lp in loops:
            d = row["loops"].get(lp, {})
            cells.append(f"{d['cpu_us']:.2f}" if d.get("n") and d.get("cpu_us") else "n/a")
        cells += [ratio(row, a, b) for a, b in pairs]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(out)


def _chart(drv, rows, loops, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kloop bench: no chart: matplotlib is not installed "
              "(Debian: apt-get install python3-matplotlib)", file=sys.stderr)
        return False
    labels = [drv.cell_label(r["kind"], r["size"], r["conns"]) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(loops), 1)
    for i, lp in enumerate(loops):
        vals = [r["loops"].get(lp, {}).get("rps") or 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=lp)
    ax.set_xticks([x + width * (len(loops) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("requests/s (server on one core)")
    ax.set_title("closed-loop echo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m kloop bench",
        description="Short side-by-side echo benchmark: asyncio, uvloop, kloop.",
        epilog="For real measurements use benchmarks/run.py (see docs/performance.md).")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per server")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per server")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    p.add_argument("--build", help="meson build directory (default: build/)")
    p.add_argument("--loops", default="asyncio,uvloop,kloop", help="comma list")
    p.add_argument("--chart", metavar="PNG", help="also draw a bar chart (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write every run's record here")
    args = p.parse_args(argv)

    if not _RUN_PY.exists():
        print("kloop bench: this needs a kloop source checkout (benchmarks/run.py and the "
              "native load generator); it is not part of an installed package.", file=sys.stderr)
        return 2
    if len(os.sched_getaffinity(0)) < 2:
        print("kloop bench: needs 2 CPUs (server on one, load generator on the other).",
              file=sys.stderr)
        return 2
    drv = _load_driver()
    try:
        env = drv.Env(args.build, python=sys.executable)
    except drv.BenchError as e:
        print(f"kloop bench: {e}", file=sys.stderr)
        return 2

    stale = env.stale()
    if stale:
        print(f"kloop bench: warning: {env.build} is older than {', '.join(stale[:3])}; "
              f"run `ninja -C {env.build}` to measure the current code", file=sys.stderr)

    loops = [lp for lp in args.loops.split(",") if lp]
    for lp in list(loops):
        why = env.availability(lp)
        if why is None:
            continue
        if lp == "uvloop":
            print("kloop bench: uvloop is not installed (Debian: apt-get install python3-uvloop); "
                  f"comparing without it ({why})", file=sys.stderr)
        elif lp == "kloop":
            print(f"kloop bench: kloop cannot run here: {why}", file=sys.stderr)
        else:
            print(f"kloop bench: {lp} unavailable: {why}", file=sys.stderr)
        loops.remove(lp)
    if not loops:
        return 1
    busy = drv.busy_processes()
    if busy:
        print("kloop bench: note: other processes are busy ("
              + ", ".join(f"{c} {s:.0%}" for s, _, c in busy[:3])
              + "); figures will be noisy", file=sys.stderr)

    cells = drv.QUICK_CELLS
    total_s = args.rounds * len(cells) * len(loops) * (args.duration + args.warmup + 0.6)
    print(f"kloop bench: {len(cells)} cells x {len(loops)} loops, about {total_s:.0f} s "
          f"(server on CPU {drv.SERVER_CPU}, load generator on CPU {drv.CLIENT_CPU})",
          file=sys.stderr)
    progress = _Progress()
    try:
        records = drv.run_matrix(env, cells, loops, args.rounds, args.duration, args.warmup,
                                 progress=progress)
    except KeyboardInterrupt:
        progress.finish()
        print("kloop bench: interrupted", file=sys.stderr)
        return 130
    progress.finish()
    pairs = [(a, b) for a, b in (("kloop", "uvloop"), ("kloop", "asyncio"))
             if a in loops and b in loops]
    rows = drv.summarize(records, cells, loops, pairs)
    print(_table(drv, rows, loops))
    failures = [r for r in records if "error" in r]
    for r in failures:
        print(f"failed: {r['loop']} {drv.cell_label(r['kind'], r['size'], r['conns'])}: "
              f"{r['error']}", file=sys.stderr)
    note = drv.interference_note(records)
    if note:
        print(note)
    print("Closed-loop echo; CPU us/req is the server's user+sys time per request. "
          "One short round each: a demonstration, see docs/performance.md for measurements.")
    if args.json:
        import json
        Path(args.json).write_text(json.dumps({"runs": records, "summary": rows}, indent=1))
    if args.chart and _chart(drv, rows, loops, args.chart):
        print(f"chart: {args.chart}")
    return 1 if failures and len(failures) == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
