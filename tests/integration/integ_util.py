"""Helpers for kloop's integration tests: real servers on loopback.

Every server here is started in a fresh temporary directory, on a free
loopback port (and a Unix socket where the server has one), waited for
with a bounded wait, and stopped (SIGTERM, then SIGKILL) by its ``stop()``.
Nothing here is a test; the fixtures in conftest.py use these classes.
"""

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON_DIR = os.path.join(ROOT, "python")

#: Seconds a server may take to accept connections after it was started.
START_TIMEOUT = float(os.environ.get("KLOOP_INTEGRATION_START_TIMEOUT", "30"))


class ServerError(RuntimeError):
    """A server did not start; the message carries the end of its log."""


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, n=40):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(lines[-n:])


def can_connect(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
    return True


def wait_listening(proc, addresses, log, what, timeout=START_TIMEOUT):
    """Wait until every address in `addresses` accepts a connection.

    Raises ServerError (with the log's tail) if `proc` exits first or the
    time runs out.
    """
    deadline = time.monotonic() + timeout
    pending = list(addresses)
    while pending:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode} before "
                              f"listening on {pending[0]!r}; log:\n{log_tail(log)}")
        if can_connect(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not listening on {pending[0]!r} after "
                              f"{timeout:.0f} s; log:\n{log_tail(log)}")
        time.sleep(0.05)


def stop_process(proc, sig=signal.SIGTERM, timeout=15.0):
    """Send `sig`, wait up to `timeout` s, then SIGKILL. Returns the status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def which(name, *extra_dirs):
    path = os.pathsep.join(list(extra_dirs) + [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def pattern(n, seed=0):
    """n deterministic pseudo-random bytes (cheap to make, easy to compare)."""
    out = bytearray()
    block = hashlib.sha256(b"kloop-integ-%d" % seed).digest()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(block + i.to_bytes(8, "little")).digest() * 64
        i += 1
    return bytes(out[:n])


# -- TLS material -----------------------------------------------------------

class CertAuthority:
    """A throwaway CA and a server certificate for localhost/127.0.0.1.

    Made with the openssl command at test time (EC P-256 keys: fast).
    Attributes: ``ca`` (CA certificate, PEM path), ``cert``/``key`` (server
    certificate and key), ``dir``.
    """

    def __init__(self, directory):
        self.dir = directory
        self.ca = os.path.join(directory, "ca.pem")
        self.ca_key = os.path.join(directory, "ca.key")
        self.cert = os.path.join(directory, "server.pem")
        self.key = os.path.join(directory, "server.key")
        openssl = which("openssl")
        if openssl is None:
            raise ServerError("the openssl command is not installed (Debian: openssl)")
        ext = os.path.join(directory, "server.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                    "basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run = lambda *args: subprocess.run(  # noqa: E731
            [openssl, *args], check=True, capture_output=True, timeout=60)
        run("req", "-x509", *ec, "-keyout", self.ca_key, "-out", self.ca, "-days", "2",
            "-subj", "/CN=kloop integration test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        csr = os.path.join(directory, "server.csr")
        run("req", "-new", *ec, "-keyout", self.key, "-out", csr, "-subj", "/CN=localhost")
        run("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
            "-CAcreateserial", "-out", self.cert, "-days", "2", "-extfile", ext)

    def client_context(self):
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca)
        return ctx

    def server_context(self):
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


# -- redis ------------------------------------------------------------------

class RedisServer:
    """redis-server on 127.0.0.1:<port> and on a Unix socket, no persistence."""

    def __init__(self):
        exe = which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (Debian: redis-server)")
        self.dir = tempfile.mkdtemp(prefix="kloop-redis-")
        self.unix_path = os.path.join(self.dir, "redis.sock")
        self.log = os.path.join(self.dir, "redis.log")
        self.host = "127.0.0.1"
        for attempt in range(3):
            self.port = free_port()
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen(
                    [exe, "--bind", self.host, "--port", str(self.port),
                     "--unixsocket", self.unix_path, "--unixsocketperm", "700",
                     "--dir", self.dir, "--save", "", "--appendonly", "no",
                     "--daemonize", "no", "--protected-mode", "no", "--logfile", ""],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            try:
                wait_listening(self.proc, [(self.host, self.port), self.unix_path],
                               self.log, "redis-server")
                return
            except ServerError:
                stop_process(self.proc)
                if attempt == 2:
                    self.stop()
                    raise

    def stop(self):
        if getattr(self, "proc", None) is not None:
            stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- PostgreSQL -------------------------------------------------------------

PG_BINDIRS = sorted((os.path.join("/usr/lib/postgresql", v, "bin")
                     for v in (os.listdir("/usr/lib/postgresql")
                               if os.path.isdir("/usr/lib/postgresql") else ())),
                    reverse=True)


class PostgresServer:
    """A PostgreSQL cluster made with initdb in a temporary directory.

    Listens on 127.0.0.1:<port> (TLS offered, with a certificate from
    `ca`) and on a Unix socket in ``socket_dir``; trust authentication, no
    fsync. initdb and postgres refuse to run as root: as root, both run as
    the ``postgres`` user (Debian's package creates it).
    """

    def __init__(self, ca):
        initdb = which("initdb", *PG_BINDIRS)
        postgres = which("postgres", *PG_BINDIRS)
        if initdb is None or postgres is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, postgres) are not "
                                    "installed (Debian: postgresql)")
        self.dir = tempfile.mkdtemp(prefix="kloop-pg-")
        os.chmod(self.dir, 0o755)
        self.data = os.path.join(self.dir, "data")
        self.socket_dir = os.path.join(self.dir, "sock")
        self.log = os.path.join(self.dir, "postgres.log")
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.database = "postgres"
        os.mkdir(self.socket_dir)
        as_user = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError("running as root and there is no postgres user "
                                  "to run initdb as") from None
            # Popen drops the privileges itself: postgres is then our direct
            # child and gets our signals (runuser would stand in between).
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            for p in (self.dir, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        # The server's key must belong to the server's user, mode 0600.
        self.ssl_cert = os.path.join(self.dir, "server.pem")
        self.ssl_key = os.path.join(self.dir, "server.key")
        shutil.copy(ca.cert, self.ssl_cert)
        shutil.copy(ca.key, self.ssl_key)
        os.chmod(self.ssl_key, 0o600)
        if as_user:
            for p in (self.ssl_cert, self.ssl_key):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        with open(self.log, "ab") as logf:
            r = subprocess.run(
                [initdb, "-D", self.data, "-U", self.user, "-A", "trust",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.dir, timeout=120, **as_user)
        if r.returncode != 0:
            log = log_tail(self.log)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise ServerError(f"initdb failed ({r.returncode}):\n{log}")
        for attempt in range(3):
            self.port = free_port()
            self.unix_path = os.path.join(self.socket_dir, f".s.PGSQL.{self.port}")
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen(
                    [postgres, "-D", self.data, "-p", str(self.port),
                     "-c", f"listen_addresses={self.host}",
                     "-c", f"unix_socket_directories={self.socket_dir}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=120",
                     "-c", "ssl=on", "-c", f"ssl_cert_file={self.ssl_cert}",
                     "-c", f"ssl_key_file={self.ssl_key}"],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    cwd=self.dir, **as_user)
            try:
                wait_listening(self.proc, [(self.host, self.port), self.unix_path],
                               self.log, "postgres")
                return
            except ServerError:
                stop_process(self.proc, signal.SIGINT)
                if attempt == 2:
                    self.stop()
                    raise

    def stop(self):
        if getattr(self, "proc", None) is not None:
            # SIGINT: PostgreSQL's "fast" shutdown.
            stop_process(self.proc, signal.SIGINT)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Python servers in a child process ---------------------------------------

def child_env():
    """Environment for a child Python that must import kloop from the tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PYTHON_DIR, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class PythonServer:
    """`python <script> <args>` in a child process, waited for on `addresses`."""

    def __init__(self, args, addresses, what, log_dir=None):
        self.dir = log_dir or tempfile.mkdtemp(prefix="kloop-pysrv-")
        self._own_dir = log_dir is None
        self.log = os.path.join(self.dir, "server.log")
        self.what = what
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, *args], env=child_env(), cwd=HERE,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.proc, addresses, self.log, what)
        except BaseException:
            self.stop()
            raise

    def output(self):
        return log_tail(self.log, 200)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        status = stop_process(self.proc, sig, timeout)
        return status

    def cleanup(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
