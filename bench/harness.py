"""What the benchmarks share: timing, forked readers, and the servers they start.

Every server started here (a secretfs daemon, the minimal pyfuse3 filesystem, a
moto server) and every throw-away user or tmpfs file is a context manager that
undoes itself in a `finally`, also when the benchmark using it fails. Nothing here
prints a secret value: values are compared, never shown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SECRETFS = [sys.executable, "-m", "secretfs.cli"]
REGION = "us-east-1"
START_TIMEOUT = 60.0
_FORK = multiprocessing.get_context("fork")


class BenchError(Exception):
    """A benchmark can't go on; str() is one line saying why."""


# --- numbers ------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """Percentiles of a sample, in microseconds."""

    n: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Stats:
        if not samples_ns:
            raise BenchError("no samples")
        ordered = sorted(samples_ns)

        def rank(q: float) -> float:  # nearest rank
            return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))] / 1000

        return cls(len(ordered), rank(0.50), rank(0.99), ordered[-1] / 1000)


def new_value(tag: str) -> bytes:
    """A JSON secret value of a typical size; random, so a stale read can't match."""
    return json.dumps({"username": f"app-{tag}", "password": secrets.token_urlsafe(18)},
                      separators=(",", ":")).encode()


# --- what a reader does ---------------------------------------------------------------

def read_file(path: str) -> bytes:
    """open + read + close, as a program reading a secret file does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def refused_read(path: str) -> bytes:
    """open() of a file this caller may not read: the errno's name."""
    try:
        read_file(path)
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno)).encode()
    raise BenchError(f"{path}: expected the open to be refused, but it was allowed")


@dataclass(frozen=True)
class Subject:
    """One thing to time: `factory` builds the operation in the process that times it
    (a boto3 client can't cross a fork), the operation returns what it read."""

    label: str
    factory: Callable[[], Callable[[], bytes]]
    samples: int
    expect: bytes
    warmup: int = 200
    block: int = 50  # samples per turn when subjects are interleaved
    seconds: float | None = None  # stop early once this much time was timed (50 samples min)


def file_subject(label: str, path: str, samples: int, expect: bytes, **kw) -> Subject:
    return Subject(label, lambda: (lambda: read_file(path)), samples, expect, **kw)


def refused_subject(label: str, path: str, samples: int, expect: bytes, **kw) -> Subject:
    """Times open() calls that are refused; `expect` is the errno's name."""
    return Subject(label, lambda: (lambda: refused_read(path)), samples, expect, **kw)


def _ready(subject: Subject) -> Callable[[], bytes]:
    operation = subject.factory()
    if operation() != subject.expect:
        raise BenchError(f"{subject.label}: read back something other than the expected value")
    until = time.monotonic() + 1.0  # a slow subject warms up for a second at most
    for done in range(subject.warmup):
        if done >= 10 and time.monotonic() > until:
            break
        operation()
    return operation


def time_interleaved(subjects: list[Subject]) -> dict[str, list[int]]:
    """Each subject's samples in ns, taken in turns of `block` so that a noisy
    moment of the machine falls on every subject alike."""
    operations = [(subject, _ready(subject)) for subject in subjects]
    samples: dict[str, list[int]] = {subject.label: [] for subject in subjects}
    spent = dict.fromkeys(samples, 0)
    clock = time.perf_counter_ns

    def wanted(subject: Subject) -> int:
        taken = len(samples[subject.label])
        if subject.seconds is not None and taken >= 50 \
                and spent[subject.label] >= subject.seconds * 1e9:
            return 0
        return subject.samples - taken

    while any(wanted(subject) > 0 for subject in subjects):
        for subject, operation in operations:
            taken = samples[subject.label]
            for _ in range(min(subject.block, wanted(subject))):
                start = clock()
                operation()
                taken.append(clock() - start)
            spent[subject.label] = sum(taken)
    return samples


# --- forked children -----------------------------------------------------------------

def _child(conn, target, args, user: pwd.struct_passwd | None) -> None:
    try:
        if user is not None:
            os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        conn.send(("ok", target(*args)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def in_children(count: int, target: Callable, *args, user: pwd.struct_passwd | None = None,
                timeout: float = 600.0) -> list:
    """Run target(*args) in `count` forked children (as `user` if given, dropped
    before target runs, so process start-up and setuid are not measured); their
    results in order. A failing child fails the call with its one-line reason."""
    children = []
    try:
        for _ in range(count):
            receiver, sender = _FORK.Pipe(duplex=False)
            process = _FORK.Process(target=_child, args=(sender, target, args, user),
                                    daemon=True)
            process.start()
            sender.close()
            children.append((process, receiver))
        results = []
        deadline = time.monotonic() + timeout
        for process, receiver in children:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"a reader process did not finish within {timeout:.0f} s")
            try:
                status, result = receiver.recv()
            except EOFError:
                raise BenchError(f"a reader process died (exit {process.exitcode})") from None
            if status != "ok":
                raise BenchError(result)
            results.append(result)
        return results
    finally:
        for process, receiver in children:
            receiver.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


def _timed_together(subject: Subject, barrier) -> list[int]:
    try:
        operation = _ready(subject)
    except BaseException:
        barrier.abort()  # the other readers stop waiting
        raise
    barrier.wait(timeout=120)
    clock, samples = time.perf_counter_ns, []
    for _ in range(subject.samples):
        start = clock()
        operation()
        samples.append(clock() - start)
    return samples


def time_concurrent(subject: Subject, readers: int) -> list[int]:
    """`readers` processes time `subject.samples` operations each, all at once."""
    barrier = _FORK.Barrier(readers)
    per_reader = in_children(readers, _timed_together, subject, barrier)
    return [sample for samples in per_reader for sample in samples]


def time_in_child(subjects: list[Subject], user: pwd.struct_passwd | None = None):
    """time_interleaved() in a forked child, as `user` if given."""
    return in_children(1, time_interleaved, subjects, user=user)[0]


# --- small resources -------------------------------------------------------------------

def bench_directory(prefix: str = "secretfs-bench-") -> Path:
    """A directory under /tmp that every uid may traverse (for the non-root reader)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o711)
    return base


def remove_directory(base: Path) -> None:
    """Remove a benchmark's directory unless something is still mounted below it."""
    for root, dirs, _ in os.walk(base):
        for name in dirs:
            if os.path.ismount(os.path.join(root, name)) or _is_stale(Path(root, name)):
                raise BenchError(f"{root}/{name} is still mounted; left {base} in place")
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def tmpfs_file(value: bytes) -> Iterator[Path]:
    path = Path("/dev/shm", f"secretfs-bench-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value)
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    name = f"sfsbench{secrets.token_hex(3)}"
    result = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                             name], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"useradd failed: {_last_line(result.stderr)}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _is_stale(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError as error:
        return error.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _force_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint) or _is_stale(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                       timeout=30)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


# --- a secretfs daemon -----------------------------------------------------------------

class SecretfsMount:
    """A secretfs state directory and its mount, driven through the `secretfs` command."""

    def __init__(self, base: Path, label: str, *options: str):
        self.state = base / f"{label}-state"
        self.mountpoint = base / f"{label}-mnt"
        self.options = options
        self.pid: int | None = None

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, SECRETFS_STATE_DIR=str(self.state))
        try:
            result = subprocess.run([*SECRETFS, *args], capture_output=True, text=True,
                                    env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"secretfs {args[0]} did not finish in {timeout:.0f} s") from None
        if result.returncode != 0:
            # The CLI's errors are one line and never hold a value; its output might.
            raise BenchError(f"secretfs {args[0]} failed: {_last_line(result.stderr)}")
        return result

    def init(self, *args: str) -> None:
        self.cli("init", "--state-dir", str(self.state), *args)

    def start(self) -> float:
        """Mount; seconds from running `secretfs mount` to its return (mount and
        socket ready)."""
        self.mountpoint.mkdir(exist_ok=True)
        began = time.perf_counter()
        self.cli("mount", str(self.mountpoint), "--state-dir", str(self.state), *self.options)
        elapsed = time.perf_counter() - began
        self.pid = self._find_pid()
        if not os.path.ismount(self.mountpoint):
            raise BenchError(f"secretfs mount returned but {self.mountpoint} is not mounted")
        return elapsed

    def _find_pid(self) -> int | None:
        wanted = f"\0--mountpoint\0{self.mountpoint}\0".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if b"secretfs.daemon" in cmdline and wanted in cmdline:
                    return int(entry)
        return None

    def stop(self) -> None:
        """Unmount and make sure the daemon is gone: `secretfs umount`, else a lazy
        unmount and SIGKILL of the daemon this object started."""
        if os.path.ismount(self.mountpoint) or _is_stale(self.mountpoint):
            with contextlib.suppress(BenchError):
                self.cli("umount", str(self.mountpoint), timeout=60)
        _force_unmount(self.mountpoint)
        if self.pid is not None:
            deadline = time.monotonic() + 10
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None

    @contextlib.contextmanager
    def running(self) -> Iterator[SecretfsMount]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    def client(self):
        from secretfs.api.client import Client
        return Client(self.state / "control.sock")

    def call(self, action: str, params: dict, *, extension: bool = False) -> dict:
        """One API call over the control socket (the `secretfs` CLI's own client)."""
        return self.client().call(action, params, extension=extension)

    def path(self, *parts: str) -> str:
        return str(self.mountpoint.joinpath(*parts))

    @property
    def ca_bundle(self) -> str:
        return str(self.state / "tls" / "ca.pem")


# --- the other servers -----------------------------------------------------------------

def stop_process(process: subprocess.Popen, before_kill: Callable[[], None] | None = None):
    """SIGTERM, ten seconds to exit, then SIGKILL (after `before_kill`)."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
        return
    if before_kill is not None:
        before_kill()
    process.kill()
    process.wait()


def _read_line(stream, timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().strip() if ready else b""


@contextlib.contextmanager
def minimal_fs(base: Path, name: str, version_id: str, value: bytes) -> Iterator[Path]:
    """bench/minimal_fs.py mounted below `base`, serving `name` with `value`."""
    mountpoint = base / "minimal-mnt"
    mountpoint.mkdir()
    value_file = base / "minimal-value"
    value_file.touch(mode=0o600)
    value_file.write_bytes(value)
    with open(base / "minimal.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "minimal_fs.py"), str(mountpoint), name,
             version_id, str(value_file)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        line = _read_line(process.stdout, START_TIMEOUT)
        if line != b"READY":
            raise BenchError("the minimal pyfuse3 filesystem did not start: "
                             f"{_last_line((base / 'minimal.log').read_text(errors='replace'))}")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline:
                raise BenchError("the minimal pyfuse3 filesystem never appeared as a mount")
            time.sleep(0.01)
        yield mountpoint
    finally:
        stop_process(process, before_kill=lambda: _force_unmount(mountpoint))
        process.stdout.close()
        _force_unmount(mountpoint)


@contextlib.contextmanager
def moto_server(base: Path) -> Iterator[Callable[[], str]]:
    """moto's standalone server on a free loopback port. Yields at once (it takes
    seconds to start, which other set-up may overlap) a function that waits until it
    listens and returns its URL."""
    port = free_port()
    with open(base / "moto.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def ready() -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise BenchError(f"moto server exited ({process.returncode}): "
                                 f"{_last_line((base / 'moto.log').read_text(errors='replace'))}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            if time.monotonic() > deadline:
                raise BenchError(f"moto server did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    try:
        yield ready
    finally:
        stop_process(process)


@contextlib.contextmanager
def postgres_server(base: Path) -> Iterator[str]:
    """A throw-away PostgreSQL server (initdb and pg_ctl as the postgres user) on a free
    loopback port, trusting local connections; yields a URL of an empty database."""
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parts[-3]))
    if not found:
        raise BenchError("PostgreSQL's server binaries are missing (scripts/setup.sh)")
    bindir = Path(found[-1]).parent
    root = base / "postgresql"
    root.mkdir()
    shutil.chown(root, "postgres", "postgres")
    data, log, port = root / "data", root / "server.log", free_port()

    def as_postgres(*command: str) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *command],
                                capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise BenchError(f"{Path(command[0]).name} failed: {_last_line(result.stderr)}")

    as_postgres(str(bindir / "initdb"), "--pgdata", str(data), "--username", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions")
    try:
        as_postgres(str(bindir / "pg_ctl"), "--pgdata", str(data), "--log", str(log), "--wait",
                    "--options", f"-c listen_addresses=127.0.0.1 -c port={port}"
                    f" -c unix_socket_directories={root} -c fsync=off", "start")
        as_postgres(str(bindir / "createdb"), "--host", "127.0.0.1", "--port", str(port),
                    "--username", "postgres", "secretfs")
        yield f"postgresql://postgres@127.0.0.1:{port}/secretfs"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "--pgdata",
                        str(data), "--mode", "immediate", "stop"], capture_output=True)


def secretsmanager_client(endpoint: str, key_id: str, secret_key: str,
                          verify: str | bool = True):
    """A boto3 Secrets Manager client for a local endpoint: no retries (a failure
    should show), one connection kept alive."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret_key,
                                    region_name=REGION)
    return session.client("secretsmanager", endpoint_url=endpoint, verify=verify,
                          config=Config(retries={"total_max_attempts": 1},
                                        max_pool_connections=1))


def get_secret_value(client, name: str) -> Callable[[], bytes]:
    return lambda: client.get_secret_value(SecretId=name)["SecretString"].encode()


def connections_opened(client, endpoint: str) -> int | None:
    """How many connections the client's pool has opened to `endpoint` (1 means every
    request reused one kept-alive connection); None if botocore hides it."""
    try:
        manager = client._endpoint.http_session._manager
        return manager.connection_from_url(endpoint).num_connections
    except Exception:  # noqa: BLE001 - private botocore/urllib3 attributes
        return None
