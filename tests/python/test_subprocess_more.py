"""Subprocesses (issue 4, point 3), on the stock loop and on kloop.

create_subprocess_exec/_shell with stdin/stdout/stderr as PIPE, DEVNULL,
STDOUT and plain fds; pass_fds, cwd, env, start_new_session,
process_group, preexec_fn; wait / communicate / send_signal / terminate /
kill / returncode; 200 concurrent children with no fd left open and no
zombie; a child that exits before its pipes close, and the reverse.
"""

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import open_fds

PY = sys.executable


@pytest.fixture(params=("asyncio", "kloop"))
def loop_name(request):
    from conftest import require_loop
    require_loop(request.param)
    return request.param


def _zombie_children():
    """pids of this process's children that are zombies."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        if rest[0] == "Z" and int(rest[1]) == me:
            out.append(int(name))
    return out


def test_std_streams_pipe_devnull_stdout_and_fds(loop):
    async def main():
        # PIPE everywhere, stderr separate.
        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys; d = sys.stdin.read(); print(d.upper()); "
            "print('err', file=sys.stderr)",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await p.communicate(b"hello")
        assert (out, err, p.returncode) == (b"HELLO\n", b"err\n", 0)

        # stderr=STDOUT merges into the stdout pipe.
        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys; sys.stdout.write('a'); sys.stdout.flush(); "
            "sys.stderr.write('b')",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, err = await p.communicate()
        assert (out, err) == (b"ab", None)

        # DEVNULL: stdin reads EOF, output goes nowhere.
        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys; assert sys.stdin.read() == ''; print('lost')",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert await p.wait() == 0
        assert p.stdin is None and p.stdout is None

        # Plain fds: stdin from a file, stdout into a pipe we read ourselves.
        with tempfile.TemporaryFile() as inp:
            inp.write(b"from a file")
            inp.seek(0)
            r, w = os.pipe()
            try:
                p = await asyncio.create_subprocess_exec(
                    PY, "-c", "import sys; sys.stdout.write(sys.stdin.read()[::-1])",
                    stdin=inp.fileno(), stdout=w)
                os.close(w)
                w = None
                assert await p.wait() == 0
                assert os.read(r, 100) == b"elif a morf"
            finally:
                os.close(r)
                if w is not None:
                    os.close(w)

        # The shell.
        p = await asyncio.create_subprocess_shell(
            "echo $((6 * 7)); exit 3", stdout=subprocess.PIPE)
        out, _ = await p.communicate()
        assert (out, p.returncode) == (b"42\n", 3)

    loop.run(main())


def test_popen_options(loop):
    async def main():
        r, w = os.pipe()
        try:
            # pass_fds keeps w open in the child under the same number.
            p = await asyncio.create_subprocess_exec(
                PY, "-c", f"import os; os.write({w}, b'passed')", pass_fds=(w,))
            assert await p.wait() == 0
            assert os.read(r, 100) == b"passed"
            # Without pass_fds, the child does not have it (close_fds).
            p = await asyncio.create_subprocess_exec(
                PY, "-c", f"import os; os.write({w}, b'x')", stderr=subprocess.DEVNULL)
            assert await p.wait() == 1
        finally:
            os.close(r)
            os.close(w)

        with tempfile.TemporaryDirectory() as d:
            p = await asyncio.create_subprocess_exec(
                PY, "-c", "import os; print(os.getcwd(), os.environ.get('KLOOP_T'), "
                "'PATH' in os.environ)",
                cwd=d, env={"KLOOP_T": "yes"}, stdout=subprocess.PIPE)
            out, _ = await p.communicate()
            assert out.split() == [os.path.realpath(d).encode(), b"yes", b"False"]

        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import os; print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())",
            start_new_session=True, stdout=subprocess.PIPE)
        out, _ = await p.communicate()
        assert out == b"True True\n"

        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import os; print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid())",
            process_group=0, stdout=subprocess.PIPE)
        out, _ = await p.communicate()
        assert out == b"True False\n"

        p = await asyncio.create_subprocess_exec(
            PY, "-c", "import os; print(os.environ['KLOOP_PRE'])",
            preexec_fn=lambda: os.environ.__setitem__("KLOOP_PRE", "ran"),
            stdout=subprocess.PIPE)
        out, _ = await p.communicate()
        assert out == b"ran\n"

    loop.run(main())


def test_signals_and_returncode(loop):
    async def main():
        prog = ("import signal, sys, time\n"
                "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(11))\n"
                "print('ready', flush=True)\n"
                "time.sleep(30)\n")
        p = await asyncio.create_subprocess_exec(PY, "-c", prog, stdout=subprocess.PIPE)
        assert await p.stdout.readline() == b"ready\n"
        assert p.returncode is None
        p.send_signal(signal.SIGUSR1)
        assert await asyncio.wait_for(p.wait(), 10) == 11
        assert p.returncode == 11
        await p.stdout.read()

        for method, expect in (("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)):
            p = await asyncio.create_subprocess_exec(PY, "-c", "import time; time.sleep(30)")
            getattr(p, method)()
            assert await asyncio.wait_for(p.wait(), 10) == expect
            assert p.returncode == expect
            # Signalling a reaped child raises, as on the stock 3.11 loop.
            with pytest.raises(ProcessLookupError):
                p.send_signal(signal.SIGTERM)

        # wait() again, and from several tasks, gives the same code.
        p = await asyncio.create_subprocess_exec(PY, "-c", "raise SystemExit(5)")
        assert await asyncio.gather(p.wait(), p.wait(), p.wait()) == [5, 5, 5]
        assert await p.wait() == 5

    loop.run(main())


def test_exit_before_pipes_close_and_reverse(loop):
    async def main():
        # The child exits while a grandchild keeps its stdout open: the exit
        # is seen at once (returncode is set by process_exited), the output
        # ends only when the grandchild exits, and wait() -- which asyncio
        # resolves when the process has exited *and* its pipes are closed --
        # returns after that.
        prog = ("import subprocess, sys\n"
                "subprocess.Popen(['/bin/sh', '-c', 'sleep 1; printf late'])\n"
                "sys.stdout.write('early'); sys.stdout.flush()\n")
        p = await asyncio.create_subprocess_exec(PY, "-c", prog, stdout=subprocess.PIPE)
        t0 = time.monotonic()
        while p.returncode is None:
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.01)
        exited = time.monotonic() - t0
        assert p.returncode == 0
        out = await asyncio.wait_for(p.stdout.read(), 10)
        assert await asyncio.wait_for(p.wait(), 10) == 0
        assert out == b"earlylate"
        assert exited < 1.0 <= time.monotonic() - t0

        # The reverse: the child closes its pipes, then lives on.
        prog = ("import os, sys, time\n"
                "sys.stdout.write('bye'); sys.stdout.flush()\n"
                "os.close(1); os.close(2)\n"
                "time.sleep(0.3)\n"
                "sys.exit(4)\n")
        p = await asyncio.create_subprocess_exec(PY, "-c", prog, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        t0 = time.monotonic()
        assert await asyncio.wait_for(p.stdout.read(), 10) == b"bye"
        assert p.returncode is None
        assert await asyncio.wait_for(p.wait(), 10) == 4
        assert time.monotonic() - t0 >= 0.25
        assert await p.stderr.read() == b""

    loop.run(main())


def test_200_concurrent_children_no_leak_no_zombie(loop):
    """200 children at once, each with stdin/stdout pipes: all codes right,
    and afterwards this process has the same fds as before and no zombie."""
    n = 200

    async def one(i):
        p = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", 'read x; echo "$x"; exit $((x % 7))',
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await p.communicate(b"%d\n" % i)
        return int(out), p.returncode

    async def main():
        await asyncio.sleep(0)
        before = open_fds()
        res = await asyncio.gather(*(one(i) for i in range(n)))
        assert res == [(i, i % 7) for i in range(n)]
        # Transports close their pipes in callbacks: let them run.
        for _ in range(5):
            await asyncio.sleep(0)
        after = open_fds()
        leaked = {fd: t for fd, t in after.items() if before.get(fd) != t}
        assert not leaked, leaked
        assert _zombie_children() == []

    loop.run(main(), timeout=60)


def test_loop_subprocess_exec_and_shell_protocol(loop):
    """loop.subprocess_exec/_shell with a SubprocessProtocol: data per fd,
    pipe_connection_lost per fd, process_exited, then connection_lost."""

    class Proto(asyncio.SubprocessProtocol):
        def __init__(self, lp):
            self.events = []
            self.data = {1: b"", 2: b""}
            self.done = lp.create_future()

        def connection_made(self, transport):
            self.events.append("made")

        def pipe_data_received(self, fd, data):
            self.data[fd] += data

        def pipe_connection_lost(self, fd, exc):
            self.events.append(("pipe_lost", fd, exc))

        def process_exited(self):
            self.events.append("exited")

        def connection_lost(self, exc):
            self.events.append(("lost", exc))
            self.done.set_result(None)

    async def main():
        lp = loop.loop
        for shell in (False, True):
            if shell:
                tr, pr = await lp.subprocess_shell(
                    lambda: Proto(lp), "read x; echo out$x; echo err$x >&2; exit 2")
            else:
                tr, pr = await lp.subprocess_exec(
                    lambda: Proto(lp), "/bin/sh", "-c",
                    "read x; echo out$x; echo err$x >&2; exit 2")
            try:
                assert tr.get_pid() > 0
                tr.get_pipe_transport(0).write(b"1\n")
                tr.get_pipe_transport(0).close()
                await asyncio.wait_for(pr.done, 10)
                assert tr.get_returncode() == 2
                assert pr.data == {1: b"out1\n", 2: b"err1\n"}
                assert pr.events[0] == "made"
                assert pr.events[-1] == ("lost", None)
                assert "exited" in pr.events
                lost = sorted(e[1] for e in pr.events
                              if isinstance(e, tuple) and e[0] == "pipe_lost")
                assert lost == [0, 1, 2]
            finally:
                tr.close()

    loop.run(main())


def test_kloop_child_exit_without_watcher_thread(loop):
    """kloop observes child exit on the ring: no thread is started for the
    children (asyncio 3.11's default ThreadedChildWatcher starts one per
    child) and each child is reaped by the time its returncode is set."""
    if not loop.is_("kloop"):
        pytest.skip("asyncio 3.11 waits for children in a thread per child by design")

    def threads():
        return set(os.listdir("/proc/self/task"))

    async def main():
        before = threads()
        procs = [await asyncio.create_subprocess_exec(
            PY, "-c", f"import time; time.sleep(0.2); raise SystemExit({i})")
            for i in range(5)]
        during = threads()
        codes = await asyncio.gather(*(p.wait() for p in procs))
        assert codes == list(range(5))
        assert during == before, (before, during)
        for p in procs:
            # Reaped: the pid is no longer our child.
            with pytest.raises(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)

    loop.run(main())


@pytest.mark.parametrize("disable", ["none", "waitid"])
def test_kloop_child_exit_paths(kloop_module, disable):
    """Both ways the engine observes a child's exit: IORING_OP_WAITID where
    the kernel has it, and a pidfd poll + waitid(P_PIDFD) where it does not
    (forced here with the loop's `disable` mask). Exit codes, signals, many
    children at once, every child reaped, no fd left open."""
    from kloop import _ffi
    mask = _ffi.CAP_WAITID if disable == "waitid" else 0
    before = open_fds()
    lp = kloop_module.IouringProactorEventLoop(
        kloop_module.IouringProactor(config={"disable": mask}))
    try:
        enabled = lp._proactor.caps()["enabled"]
        kernel = lp._proactor.caps()["kernel"]
        if disable == "waitid":
            assert "waitid" not in enabled and "pidfd" in enabled
        elif "waitid" not in kernel:
            pytest.skip("this kernel has no IORING_OP_WAITID (6.7+): the pidfd case covers it")
        else:
            assert "waitid" in enabled

        async def main():
            procs = [await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", f"exit {i}") for i in range(30)]
            assert await asyncio.gather(*(p.wait() for p in procs)) == list(range(30))
            p = await asyncio.create_subprocess_exec("/bin/sleep", "30")
            p.terminate()
            assert await asyncio.wait_for(p.wait(), 10) == -signal.SIGTERM
            p = await asyncio.create_subprocess_exec(
                PY, "-c", "import sys; sys.stdout.write(sys.stdin.read())",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert await p.communicate(b"echo") == (b"echo", None)
            assert _zombie_children() == []

        lp.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.close()
    leaked = {fd: t for fd, t in open_fds().items() if before.get(fd) != t}
    assert not leaked, leaked
