"""In-process benchmarks of one event loop, for the benchmark driver.

usage: micro.py --loop {asyncio,uvloop,kloop} --suite {micro,spawn}
                [--scale F] [--only NAME,...]

Runs every benchmark of the suite once on a fresh loop of the chosen kind
and prints one JSON object on stdout: per benchmark the operations done,
the wall time and the process's CPU time (user+sys, this process only:
for spawn the children's time is reported apart). The driver (run.py
micro / spawn) starts one such process per loop and round, pinned to one
CPU, and takes medians over rounds.

Suite micro (scheduling, nanoseconds per operation):
  call_soon        a callback that re-schedules itself with call_soon:
                   one operation = one callback run
  call_later       call_later(3600, cb) then cancel(), 1000 per loop
                   iteration: one operation = one schedule + cancel
  sleep0           `await asyncio.sleep(0)` in a task: one operation =
                   one suspension and resumption of the task
  future_pingpong  two tasks hand a fresh future back and forth: one
                   operation = one round trip (two futures, two wake-ups)
  create_task      `await loop.create_task(trivial())`: one operation =
                   a task created, run to its end and awaited

Suite spawn (subprocesses per second):
  sequential       `await (await create_subprocess_exec('/bin/true')).wait()`
                   N times in a row
  concurrent8      the same, 8 at a time (asyncio.gather of 8), N in all

Every benchmark first runs a tenth of its operations as a warm-up on the
same loop; only the second run is measured. Runs with Debian's
/usr/bin/python3; kloop needs PYTHONPATH pointing at the checkout's python/
directory (run.py sets it).
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time

from echo_server import new_loop

TRUE = "/bin/true"


async def bench_call_soon(loop, n):
    done = loop.create_future()
    left = n

    def step():
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            done.set_result(None)
    loop.call_soon(step)
    await done
    return n


async def bench_call_later(loop, n):
    def never():
        raise AssertionError("a cancelled timer ran")
    batch = 1000
    done = 0
    while done < n:
        k = min(batch, n - done)
        for _ in range(k):
            loop.call_later(3600.0, never).cancel()
        done += k
        # Let the loop run an iteration: loops drop cancelled timers there.
        await asyncio.sleep(0)
    return n


async def bench_sleep0(loop, n):
    async def sleeper():
        for _ in range(n):
            await asyncio.sleep(0)
    await loop.create_task(sleeper())
    return n


async def bench_future_pingpong(loop, n):
    # box[0]: the future the pinger waits on; box[1]: the ponger's.
    box = [None, loop.create_future()]

    async def ponger():
        for _ in range(n):
            await box[1]
            box[1] = loop.create_future()
            box[0].set_result(None)

    async def pinger():
        for _ in range(n):
            box[0] = loop.create_future()
            box[1].set_result(None)
            await box[0]

    p = loop.create_task(ponger())
    await pinger()
    await p
    return n


async def bench_create_task(loop, n):
    async def trivial():
        return 1
    total = 0
    for _ in range(n):
        total += await loop.create_task(trivial())
    assert total == n
    return n


async def _spawn_one():
    proc = await asyncio.create_subprocess_exec(TRUE)
    rc = await proc.wait()
    if rc != 0:
        raise RuntimeError(f"{TRUE} exited with {rc}")


async def bench_sequential(loop, n):
    for _ in range(n):
        await _spawn_one()
    return n


async def bench_concurrent8(loop, n):
    width = 8
    done = 0
    while done < n:
        k = min(width, n - done)
        await asyncio.gather(*(_spawn_one() for _ in range(k)))
        done += k
    return n


# name: (function, operations at --scale 1). Sized so that stock asyncio
# needs roughly 0.2-0.5 s per benchmark on the 2-CPU machine of the docs.
SUITES = {
    "micro": {
        "call_soon": (bench_call_soon, 400_000),
        "call_later": (bench_call_later, 200_000),
        "sleep0": (bench_sleep0, 100_000),
        "future_pingpong": (bench_future_pingpong, 50_000),
        "create_task": (bench_create_task, 50_000),
    },
    "spawn": {
        "sequential": (bench_sequential, 300),
        "concurrent8": (bench_concurrent8, 400),
    },
}


def _cpu(who=resource.RUSAGE_SELF):
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


async def run_suite(suite, scale, only):
    loop = asyncio.get_running_loop()
    out = {}
    for name, (fn, ops) in SUITES[suite].items():
        if only and name not in only:
            continue
        n = max(1, int(ops * scale))
        await fn(loop, max(1, n // 10))  # warm-up
        c0, k0 = _cpu(), _cpu(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter_ns()
        done = await fn(loop, n)
        wall = time.perf_counter_ns() - t0
        c1, k1 = _cpu(), _cpu(resource.RUSAGE_CHILDREN)
        out[name] = {"ops": done, "wall_ns": wall, "ns_per_op": wall / done,
                     "ops_per_s": done * 1e9 / wall,
                     "cpu_ns_per_op": (c1 - c0) * 1e9 / done,
                     "children_cpu_ns_per_op": (k1 - k0) * 1e9 / done}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "kloop"])
    p.add_argument("--suite", default="micro", choices=sorted(SUITES))
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every benchmark's operation count")
    p.add_argument("--only", default="", help="comma list of benchmark names")
    p.add_argument("--cpu", type=int, default=-1, help="pin to this CPU")
    args = p.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    only = {x for x in args.only.split(",") if x}
    unknown = only - set(SUITES[args.suite])
    if unknown:
        p.error(f"unknown benchmarks for {args.suite}: {', '.join(sorted(unknown))}")
    try:
        loop = new_loop(args.loop)
    except Exception as exc:  # reported to the driver, which shows "n/a"
        print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 3
    asyncio.set_event_loop(loop)
    try:
        res = loop.run_until_complete(run_suite(args.suite, args.scale, only))
    finally:
        loop.close()
    print(json.dumps({"loop": args.loop, "suite": args.suite, "scale": args.scale,
                      "results": res}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
