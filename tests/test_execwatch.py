"""Executables learnt from the kernel's process events: exact across exec and exit,
everything forgotten when events are lost, and refused where the connector can't vouch
for the pids this process sees. Real processes, the real connector (tests run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from secretfs.execwatch import Executables


@pytest.fixture
def executables():
    watched = Executables()
    assert watched.watch(), "the process events connector is available to root here"
    yield watched
    watched.close()


class Stepper:
    """A shell that, each time it is told to, execs the other of two shells, which
    does the same: one pid running one program after another."""

    SCRIPT = 'read step; exec "$0" -c "$STEPPER" "$1" "$0"'

    def __init__(self, first: str, second: str):
        self.process = subprocess.Popen([first, "-c", self.SCRIPT, second, first],
                                        stdin=subprocess.PIPE,
                                        env={**os.environ, "STEPPER": self.SCRIPT})
        self.pid = self.process.pid

    def step(self) -> None:
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def wait_exe(pid: int, path: str) -> None:
    """Until /proc says the process runs `path` (the exec has happened)."""
    deadline = time.monotonic() + 5
    while os.path.realpath(f"/proc/{pid}/exe") != path:
        assert time.monotonic() < deadline, f"pid {pid} never ran {path}"
        time.sleep(0.005)


def test_an_exec_is_seen_by_the_very_next_lookup(executables):
    shells = [os.path.realpath(shutil.which(name)) for name in ("sh", "bash")]
    programs = [shells[i % 2] for i in range(12)]
    stepper = Stepper(*shells)
    try:
        wait_exe(stepper.pid, programs[0])
        for index, program in enumerate(programs):
            if index:
                stepper.step()
                wait_exe(stepper.pid, program)
            # Asked twice: the second answer is the remembered one.
            assert executables.exe(stepper.pid) == program
            assert executables.exe(stepper.pid) == program
    finally:
        stepper.close()


def test_an_exit_is_forgotten(executables):
    process = subprocess.Popen(["sleep", "30"])
    try:
        wait_exe(process.pid, os.path.realpath(shutil.which("sleep")))
        assert executables.exe(process.pid) == os.path.realpath(shutil.which("sleep"))
    finally:
        process.kill()
        process.wait()
    assert executables.exe(process.pid) is None


def test_lost_events_make_it_forget_everything(executables):
    """A receive buffer overrun (ENOBUFS) means an exec may have gone unseen."""
    shells = [os.path.realpath(shutil.which(name)) for name in ("sh", "bash")]
    stepper = Stepper(*shells)
    try:
        wait_exe(stepper.pid, shells[0])
        assert executables.exe(stepper.pid) == shells[0]
        executables._connector.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        for _ in range(200):  # far more exec and exit events than the buffer holds
            subprocess.run(["true"], check=True)
        stepper.step()
        wait_exe(stepper.pid, shells[1])
        # Its exec event may well be among those lost: the answer is still right.
        assert executables.exe(stepper.pid) == shells[1]
    finally:
        stepper.close()


def test_without_the_connector_every_lookup_reads_proc():
    plain = Executables()
    assert not plain.watching
    assert plain.exe(os.getpid()) == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert plain.exe(0x3FFFFFFF) is None


def test_in_another_pid_namespace_the_connector_is_not_trusted():
    """There the kernel's events name pids this process doesn't see: refused."""
    probe = textwrap.dedent("""
        from secretfs.execwatch import Executables
        print("watching" if Executables().watch(timeout=1.0) else "reading /proc")
    """)
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reading /proc"


def test_without_cap_net_admin_it_says_so_at_once():
    """Under systemd/secretfs.service's bounding set: no waiting out the proof."""
    probe = textwrap.dedent("""
        import time
        from secretfs.execwatch import Executables
        started = time.monotonic()
        watching = Executables().watch(timeout=5.0)
        print(watching, time.monotonic() - started < 1.0)
    """)
    result = subprocess.run(["setpriv", "--bounding-set=-net_admin", "--inh-caps=-all", "--",
                             sys.executable, "-c", probe],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
