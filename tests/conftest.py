"""Fixtures for tests that run the real daemon on a real FUSE mount.

The daemon runs in its own process (pyfuse3 keeps one session per process),
started through the real `secretfs` command; the mount is always undone in
teardown, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SECRETFS = [sys.executable, "-m", "secretfs.cli"]

# The reliability tests' shared helpers (tests/_reliability.py) assert too.
pytest.register_assert_rewrite("_reliability")


def _cli(state_dir: Path, *args: str, input: bytes | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, SECRETFS_STATE_DIR=str(state_dir))
    result = subprocess.run([*SECRETFS, *args], input=input, capture_output=True, env=env,
                            timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(
            f"secretfs {' '.join(args[:1])} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace')}")
    return result


@dataclass
class Daemon:
    """A running secretfs daemon: its state dir, its mountpoint, and a CLI bound to it."""

    state_dir: Path
    mountpoint: Path
    started: bool = False
    extra_args: list[str] = field(default_factory=list)

    def cli(self, *args: str, input: bytes | None = None, check: bool = True):
        return _cli(self.state_dir, *args, input=input, check=check)

    def call(self, *args: str, input: bytes | None = None) -> dict:
        """A client verb whose JSON output is returned parsed."""
        return json.loads(self.cli(*args, input=input).stdout or b"{}")

    def audit_records(self, *flags: str) -> list[dict]:
        """The audit log's records as `secretfs audit search` shows them (the log is
        written every second: see wait_for)."""
        result = self.cli("audit", "search", "--state-dir", str(self.state_dir), *flags)
        return [json.loads(line) for line in result.stdout.decode().splitlines()]

    def start(self) -> None:
        self.cli("mount", str(self.mountpoint), "--state-dir", str(self.state_dir),
                 *self.extra_args)
        assert os.path.ismount(self.mountpoint)
        self.started = True

    def stop(self) -> None:
        if os.path.ismount(self.mountpoint) or _is_stale(self.mountpoint):
            self.cli("umount", str(self.mountpoint), check=False)
        force_unmount(self.mountpoint)
        self.started = False

    def pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"secretfs.daemon --mountpoint {self.mountpoint}"],
                             capture_output=True, text=True).stdout.split()
        assert out, "daemon process not found"
        return int(out[0])

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)


def wait_for(predicate, seconds: float = 15.0, interval: float = 0.05) -> bool:
    """Whether `predicate()` holds within `seconds`, asked every `interval`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` just now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _is_stale(path: Path) -> bool:
    # statfs always reaches the daemon; stat may come from the kernel's cache.
    try:
        os.statvfs(path)
    except OSError:
        return True
    return False


def force_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint) or _is_stale(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    subprocess.run(["pkill", "-KILL", "-f", f"secretfs.daemon --mountpoint {mountpoint}"],
                   capture_output=True)


def _require_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("mount tests need root and /dev/fuse (run through the README's test command)")


def reachable_directory(prefix: str) -> Path:
    """A directory every uid can traverse, outside pytest's basetemp: each pytest
    session that starts chmods /tmp/pytest-of-<user> back to 0700, which would lock
    throw-away users out of a mountpoint below it."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o711)
    return base


@contextlib.contextmanager
def serving_daemon(*extra_args: str, prefix: str = "secretfs-test-") -> Iterator[Daemon]:
    """A daemon on a fresh state directory, for tests that share one (module-scoped
    fixtures); always unmounted, and its directory removed, afterwards."""
    _require_fuse()
    base = reachable_directory(prefix)
    running = Daemon(state_dir=base / "state", mountpoint=base / "secrets",
                     extra_args=list(extra_args))
    running.mountpoint.mkdir()
    try:
        running.cli("init", "--state-dir", str(running.state_dir))
        running.start()
        yield running
    finally:
        running.stop()
        if not os.path.ismount(running.mountpoint):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    _cli(state, "init", "--state-dir", str(state))
    return state


@pytest.fixture
def daemon(state_dir: Path):
    _require_fuse()
    holder = reachable_directory("secretfs-mnt-")
    mountpoint = holder / "secrets"
    mountpoint.mkdir()
    running = Daemon(state_dir=state_dir, mountpoint=mountpoint)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(holder, ignore_errors=True)


@pytest.fixture
def make_user():
    """Create throw-away Unix users (and groups); removed after the test."""
    created: list[str] = []
    groups: list[str] = []

    def make(*, groups_: tuple[str, ...] = ()) -> pwd.struct_passwd:
        name = f"sfs{uuid.uuid4().hex[:8]}"
        for group in groups_:
            if subprocess.run(["getent", "group", group], capture_output=True).returncode:
                subprocess.run(["groupadd", group], check=True)
                groups.append(group)
        args = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        if groups_:
            args += ["-G", ",".join(groups_)]
        subprocess.run([*args, name], check=True)
        created.append(name)
        return pwd.getpwnam(name)

    yield make
    for name in created:
        subprocess.run(["userdel", name], capture_output=True)
    for group in groups:
        subprocess.run(["groupdel", group], capture_output=True)


def run_as(user: pwd.struct_passwd, *command: str) -> subprocess.CompletedProcess:
    """Run a command as another uid (setpriv drops to the user's uid, gid and groups)."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    return subprocess.run(
        [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--",
         *command], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def plaintext_watch():
    """The values the reliability tests stored and the state directories they used
    (see tests/_reliability.py): when the session ends, no file below any of those
    directories may hold any of those values, in any encoding."""
    from _reliability import PlaintextWatch

    watch = PlaintextWatch()
    yield watch
    found = watch.findings()
    if found:
        pytest.fail(f"plaintext on disk after the session: {found[:20]}", pytrace=False)
