"""Fixtures for tier-1 tests: a real SqliteStore and LocalKeyProvider in tmp_path, a
SecretsManagerService driven through `call()` as the API drives it, and a clock the
test moves by hand.

Test modules load this with `pytest_plugins = ["_service_fixtures"]`, so it stays
apart from conftest.py (which the mount tier owns). They take everything from fixtures
and never import this module themselves: an import before pytest registers the plugin
would skip its assertion rewriting (PytestAssertRewriteWarning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from secretfs.crypto import LocalKeyProvider
from secretfs.identity import SYSTEM, UNIX_SOCKET, Caller
from secretfs.service import SecretsManagerService
from secretfs.store.sqlite import SqliteStore

REGION, ACCOUNT = "us-east-1", "123456789012"
START = datetime(2024, 5, 6, 15, 30, 12, 250000, tzinfo=UTC)
USER = Caller(uid=1000, gid=1000, pid=4242, source=UNIX_SOCKET)


class Clock:
    """The service's wall clock; it only moves when a test moves it."""

    def __init__(self, start: datetime = START):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Env:
    root: Path
    clock: Clock
    service: SecretsManagerService
    opened: list = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        return self.root / "secrets.db"

    @property
    def key_path(self) -> Path:
        return self.root / "keys.json"

    def call(self, action: str, caller: Caller = SYSTEM, **params) -> dict:
        return self.service.call(action, params, caller)

    def reopen(self) -> SecretsManagerService:
        """A second service over the same files, as after a daemon restart."""
        store = SqliteStore(self.db_path)
        keys = LocalKeyProvider.load(self.key_path, region=REGION, account_id=ACCOUNT)
        service = SecretsManagerService(store, keys, region=REGION, account_id=ACCOUNT,
                                        clock=self.clock)
        self.opened.append(store)
        return service

    def snapshot(self, *names: str) -> dict:
        """What a client can observe about some secrets and the secret list."""
        state = {"list": sorted(
            entry["ARN"] for entry in self.call(
                "ListSecrets", IncludePlannedDeletion=True)["SecretList"])}
        for name in names:
            try:
                described = self.call("DescribeSecret", SecretId=name)
                versions = self.call("ListSecretVersionIds", SecretId=name,
                                     IncludeDeprecated=True)["Versions"]
            except Exception as error:  # a secret that doesn't exist is also a state
                state[name] = type(error).__name__
                continue
            values = {}
            if described.get("DeletedDate") is None:
                for version in versions:
                    got = self.call("GetSecretValue", SecretId=name,
                                    VersionId=version["VersionId"])
                    values[version["VersionId"]] = got.get("SecretString", got.get("SecretBinary"))
            state[name] = {"describe": described, "versions": versions, "values": values}
        # Reading above noted accesses; they must not leak into a later comparison.
        self.service._pending_access.clear()
        return state


def make_service(root: Path, clock: Clock) -> tuple[SqliteStore, SecretsManagerService]:
    store = SqliteStore.create(root / "secrets.db")
    keys = LocalKeyProvider.create(root / "keys.json", region=REGION, account_id=ACCOUNT)
    return store, SecretsManagerService(store, keys, region=REGION, account_id=ACCOUNT,
                                        clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def env(tmp_path, clock):
    store, service = make_service(tmp_path, clock)
    environment = Env(tmp_path, clock, service)
    yield environment
    for other in environment.opened:
        other.close()
    store.close()


@pytest.fixture
def svc(env) -> SecretsManagerService:
    return env.service


@pytest.fixture
def call(env):
    return env.call


@pytest.fixture
def user() -> Caller:
    """An ordinary local user: not root, so denied everything until policies exist."""
    return USER
