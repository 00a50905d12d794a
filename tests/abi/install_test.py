#!/usr/bin/python3
"""Installs libkloop into a temporary directory and uses it from there only.

Usage: install_test.py --meson M --build-root B --source-root S
                       --pkg-config P --cc CC  consumer|c-echo|rust-echo

Every subcommand first runs `meson install --destdir` (tags runtime,devel)
into a fresh temporary directory and checks what landed there: the header
identical to include/kloop.h, libkloop.so -> libkloop.so.<major> -> the real
file, and kloop.pc. Programs are then built with nothing but
`pkg-config --cflags --libs kloop`, PKG_CONFIG_PATH pointing at the installed
.pc and PKG_CONFIG_SYSROOT_DIR at the temporary root (the way a staged or
cross install is used), and run with LD_LIBRARY_PATH at the installed libdir.

  consumer   a C program checks kloop_version() and makes a nop round trip,
             and reports that it loaded the installed library
  c-echo     examples/c: echo_server serves echo_client (several sizes) and a
             client that writes 16 MiB before reading anything (the server
             must stop reading until its write queue drains, and lose nothing)
  rust-echo  examples/rust built with cargo --offline (no crates): the Rust
             server serves the C client and the slow reader, and the Rust
             client checks its echoes from the C server

Exit status: 0 pass, 1 fail, 77 skipped (the reason is printed: io_uring
refused by the kernel, or no cargo on this machine).
"""
import argparse
import os
import pathlib
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

SKIP = 77


class Failure(Exception):
    pass


def run(cmd, **kw):
    print("$", shlex.join(str(c) for c in cmd), flush=True)
    kw.setdefault("check", True)
    try:
        return subprocess.run([str(c) for c in cmd], **kw)
    except subprocess.CalledProcessError as e:
        raise Failure(f"{cmd[0]} exited {e.returncode}") from None


def header_version(source_root):
    text = (source_root / "include" / "kloop.h").read_text()
    return [re.search(rf"#define\s+KLOOP_VERSION_{p}\s+(\d+)", text).group(1)
            for p in ("MAJOR", "MINOR", "PATCH")]


class Prefix:
    """libkloop installed under a temporary root."""

    def __init__(self, args, tmp):
        self.root = tmp / "root"
        run([args.meson, "install", "-C", args.build_root, "--no-rebuild", "--quiet",
             "--tags", "runtime,devel", "--destdir", self.root])
        pcs = sorted(self.root.rglob("kloop.pc"))
        if len(pcs) != 1:
            raise Failure(f"want one installed kloop.pc, found {pcs}")
        self.pc_dir = pcs[0].parent
        self.libdir = self.pc_dir.parent
        major, minor, patch = header_version(args.source_root)
        self.check_files(args.source_root, major, f"{major}.{minor}.{patch}")

        self.env = dict(os.environ)
        self.env.update(PKG_CONFIG_PATH=str(self.pc_dir), PKG_CONFIG_SYSROOT_DIR=str(self.root),
                        LD_LIBRARY_PATH=str(self.libdir))
        self.env.pop("PKG_CONFIG_LIBDIR", None)

        def pc(*a):
            return run([args.pkg_config, *a, "kloop"], env=self.env, capture_output=True,
                       text=True).stdout.split()

        modversion = pc("--modversion")
        if modversion != [f"{major}.{minor}.{patch}"]:
            raise Failure(f"pkg-config --modversion kloop says {modversion}, the header "
                          f"{major}.{minor}.{patch}")
        self.cflags = pc("--cflags")
        self.libs = pc("--libs")
        print("pkg-config --cflags --libs kloop:", " ".join(self.cflags + self.libs))
        include = [f[2:] for f in self.cflags if f.startswith("-I")]
        if not any(pathlib.Path(d, "kloop.h").is_file() and self.inside(d) for d in include):
            raise Failure(f"--cflags {self.cflags} names no installed directory with kloop.h")
        if f"-L{self.libdir}" not in self.libs or "-lkloop" not in self.libs:
            raise Failure(f"--libs {self.libs} lacks -L{self.libdir} -lkloop")

    def inside(self, path):
        return pathlib.Path(path).resolve().is_relative_to(self.root.resolve())

    def check_files(self, source_root, major, version):
        headers = sorted(self.root.rglob("kloop.h"))
        if len(headers) != 1:
            raise Failure(f"want one installed kloop.h, found {headers}")
        if headers[0].read_bytes() != (source_root / "include" / "kloop.h").read_bytes():
            raise Failure(f"{headers[0]} differs from include/kloop.h")
        dev = self.libdir / "libkloop.so"
        runtime = self.libdir / f"libkloop.so.{major}"
        real = self.libdir / f"libkloop.so.{version}"
        for path, target in ((dev, runtime.name), (runtime, real.name)):
            if not path.is_symlink() or os.readlink(path) != target:
                raise Failure(f"{path} should be a symlink to {target}")
        if not real.is_file() or real.is_symlink():
            raise Failure(f"{real} is missing")
        static = sorted(self.root.rglob("libkloop*.a"))
        if static:
            raise Failure(f"a static archive is installed: {static}")
        print(f"installed: {headers[0].relative_to(self.root)}, "
              f"{real.relative_to(self.root)} (+ .so.{major}, .so), "
              f"{(self.pc_dir / 'kloop.pc').relative_to(self.root)}")

    def compile_c(self, cc, source, out, strict=True):
        warn = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"] if strict else []
        run(shlex.split(cc) + ["-O2", "-g"] + warn + self.cflags + [source, "-o", out] + self.libs,
            env=self.env)
        return out


def test_consumer(args, prefix, tmp):
    exe = prefix.compile_c(args.cc, pathlib.Path(__file__).parent / "consumer.c",
                           tmp / "consumer")
    proc = run([exe], env=prefix.env, capture_output=True, text=True, check=False, timeout=60)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode == SKIP:
        return SKIP
    if proc.returncode != 0:
        raise Failure(f"consumer exited {proc.returncode}")
    loaded = re.findall(r"^loaded (\S+)$", proc.stdout, flags=re.M)
    if not loaded or not all(prefix.inside(p) for p in loaded):
        raise Failure(f"consumer loaded {loaded}, not the installed library")
    if "nop round trip ok" not in proc.stdout:
        raise Failure("no nop round trip")
    return 0


class Server:
    """An echo server process that prints 'listening on HOST:PORT'."""

    def __init__(self, cmd, env):
        print("$", shlex.join(str(c) for c in cmd), "&", flush=True)
        self.proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        m = re.match(r"listening on [\d.]+:(\d+)", line)
        if not m:
            self.proc.kill()
            out, err = self.proc.communicate()
            if "Operation not permitted" in err or "not implemented" in err.lower():
                print(f"SKIP: io_uring refused here: {err.strip()}")
                raise SystemExit(SKIP)
            raise Failure(f"server did not start: {line!r} {out!r} {err!r}")
        self.port = int(m.group(1))
        print(line.strip(), flush=True)

    def finish(self, want_connections, want_pauses):
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise Failure(f"server still running 30 s after its last client: {err!r}")
        sys.stdout.write(out)
        sys.stdout.write(err)
        if self.proc.returncode != 0:
            raise Failure(f"server exited {self.proc.returncode}")
        if not re.search(rf"\b{want_connections} connections served", err):
            raise Failure(f"server did not report {want_connections} connections served")
        pauses = re.search(r"asked to pause reading (\d+) times", err)
        if want_pauses and not (pauses and int(pauses.group(1)) > 0):
            raise Failure("the server never paused reading: flow control was not exercised")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def run_client(cmd, env):
    proc = run(cmd, env=env, capture_output=True, text=True, check=False, timeout=90)
    sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    if proc.returncode != 0 or "echoed intact" not in proc.stdout:
        raise Failure(f"client {cmd[0]} failed (exit {proc.returncode})")


def slow_reader(port, total=16 << 20, delay=0.5):
    """Writes `total` bytes before reading any, then reads them all back.

    The server's write queue grows past its high-water mark while this
    client is not reading; it must pause reading, resume on WRITE_LOW, and
    echo every byte in order.
    """
    print(f"slow reader: {total >> 20} MiB to port {port}, reading after {delay} s", flush=True)
    block = bytes(range(256)) * 256  # 64 KiB; byte k of the stream is k % 256
    reference = bytes(range(256)) * ((1 << 20) // 256 + 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # A small fixed receive buffer (no autotuning) keeps the echo in the
    # server's queue rather than in this socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    errors = []

    def send_all():
        try:
            for _ in range(total // len(block)):
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    sender = threading.Thread(target=send_all)
    sender.start()
    time.sleep(delay)
    received = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        start = received % 256
        if chunk != reference[start:start + len(chunk)]:
            raise Failure(f"slow reader: wrong bytes in the {len(chunk)} after offset {received}")
        received += len(chunk)
    sender.join()
    sock.close()
    if errors:
        raise Failure(f"slow reader: send failed: {errors[0]}")
    if received != total:
        raise Failure(f"slow reader: {received} bytes came back, want {total}")
    print(f"slow reader: {received} bytes echoed intact", flush=True)


def build_c_examples(args, prefix, tmp):
    src = args.source_root / "examples" / "c"
    return (prefix.compile_c(args.cc, src / "echo_server.c", tmp / "echo_server"),
            prefix.compile_c(args.cc, src / "echo_client.c", tmp / "echo_client"))


def serve(server_cmd, env, clients):
    """Runs a server for len(clients) phases; each client gets the port."""
    server = Server(server_cmd, env)
    try:
        connections = 0
        for client in clients:
            connections += client(server.port)
        server.finish(connections, want_pauses=slow_client in clients)
    finally:
        server.kill()


def c_client(exe, env, conns, messages, size):
    def client(port):
        run_client([exe, "127.0.0.1", port, conns, messages, size], env)
        return conns
    return client


def slow_client(port):
    slow_reader(port)
    return 1


def test_c_echo(args, prefix, tmp):
    server, client = build_c_examples(args, prefix, tmp)
    serve([server, 0, 4 + 2 + 1 + 1], prefix.env, [
        c_client(client, prefix.env, 4, 200, 1000),
        c_client(client, prefix.env, 2, 4, 1 << 20),
        c_client(client, prefix.env, 1, 0, 1),
        slow_client,
    ])
    return 0


def find_cargo():
    candidates = [os.environ.get("CARGO"), shutil.which("cargo"),
                  os.path.expanduser("~/.cargo/bin/cargo"), "/usr/bin/cargo"]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    return None


def test_rust_echo(args, prefix, tmp):
    cargo = find_cargo()
    if not cargo:
        print("SKIP: no cargo on this machine (scripts/setup.sh installs Debian's cargo)")
        return SKIP
    c_server, c_client_exe = build_c_examples(args, prefix, tmp)
    env = dict(prefix.env)
    # Cargo's own state stays in the build tree; --offline --locked: no
    # crates are fetched and Cargo.lock is not rewritten.
    env["CARGO_HOME"] = str(args.build_root / "cargo-home")
    env["CARGO_TARGET_DIR"] = str(args.build_root / "examples-rust-target")
    manifest = args.source_root / "examples" / "rust" / "Cargo.toml"
    run([cargo, "--version"], env=env)
    run([cargo, "build", "--offline", "--locked", "--manifest-path", manifest], env=env)
    exe = pathlib.Path(env["CARGO_TARGET_DIR"]) / "debug" / "kloop-echo"

    serve([exe, "server", 0, 3 + 1], env, [
        c_client(c_client_exe, env, 3, 100, 3000),
        slow_client,
    ])

    def rust_client(port):
        run_client([exe, "client", "127.0.0.1", port, 3, 100, 5000], env)
        return 3
    serve([c_server, 0, 3], env, [rust_client])
    return 0


TESTS = {"consumer": test_consumer, "c-echo": test_c_echo, "rust-echo": test_rust_echo}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meson", default="meson")
    parser.add_argument("--build-root", type=pathlib.Path, required=True)
    parser.add_argument("--source-root", type=pathlib.Path, required=True)
    parser.add_argument("--pkg-config", default="pkg-config")
    parser.add_argument("--cc", default="cc")
    parser.add_argument("test", choices=sorted(TESTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kloop-install-") as tmp:
        tmp = pathlib.Path(tmp)
        try:
            prefix = Prefix(args, tmp)
            rc = TESTS[args.test](args, prefix, tmp)
        except Failure as e:
            print("FAIL:", e, flush=True)
            return 1
        except subprocess.TimeoutExpired as e:
            print(f"FAIL: timed out: {e}", flush=True)
            return 1
    print(f"{args.test}: {'SKIP' if rc == SKIP else 'ok'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
