"""Two hosts of a fleet on one machine: two daemons, each with its own state directory
and mountpoint, sharing one PostgreSQL database (a fresh one per test, in the session's
throw-away server). Host A runs `secretfs init --store URL`; host B joins with
`secretfs init --join --store URL --keys-from A/keys.json`, as an operator would.

Test modules load this with `pytest_plugins = ["_fleet"]` and use `fleet`; nothing is
mounted until a test calls `start()` on a host, and everything is unmounted and removed
afterwards, even when the test failed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, reachable_directory

pytest_plugins = ["_postgres_store"]


@dataclass
class Fleet:
    a: Daemon
    b: Daemon
    dbname: str
    url: str  # with the password: for the tests' own connections only

    @property
    def hosts(self) -> tuple[Daemon, Daemon]:
        return self.a, self.b

    def start(self, *extra_args: str) -> None:
        for host in self.hosts:
            host.extra_args = list(extra_args)
            host.start()


def _host(base: Path, name: str) -> Daemon:
    host = Daemon(state_dir=base / name / "state", mountpoint=base / name / "secrets")
    host.mountpoint.mkdir(parents=True)
    return host


@pytest.fixture
def fleet(postgres_cluster) -> Iterator[Fleet]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("mount tests need root and /dev/fuse (run through the README's test command)")
    base = reachable_directory("secretfs-fleet-")
    dbname = postgres_cluster.create_database()
    url = postgres_cluster.url(dbname)
    a, b = _host(base, "a"), _host(base, "b")
    try:
        a.cli("init", "--state-dir", str(a.state_dir), "--store", url)
        b.cli("init", "--state-dir", str(b.state_dir), "--join", "--store", url,
              "--keys-from", str(a.state_dir / "keys.json"))
        yield Fleet(a, b, dbname, url)
    finally:
        for host in (a, b):
            host.stop()
        shutil.rmtree(base, ignore_errors=True)
