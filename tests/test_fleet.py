"""Hosts sharing a PostgreSQL store hear each other's commits (secretfs/fleet.py and
store/postgres.py's change notifications), and a host cut off from the store serves
what it knew for at most --max-staleness, then refuses until it has caught up.

First without a mount: the notifications themselves (one per commit, naming what
changed and whose commit it was) and the feed driven on two services of one database.
Then two real daemons (`fleet`, tests/_fleet.py): a promotion through A shows through
B's mount within a bound measured here; creation, tags, policies and deletion reach B;
B catches up after its listening session is killed, and after a network cut (a TCP
proxy between B and the database, tests/_tcp_proxy.py), during which it served what it
knew, refused its mutations, and then refused opens with EIO past the bound.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pyfuse3
import pytest
import trio
from _tcp_proxy import TcpProxy
from conftest import Daemon, run_as, wait_for

from secretfs.api.client import Client
from secretfs.crypto import LocalKeyProvider
from secretfs.fleet import ChangeFeed
from secretfs.fs.ops import SecretsOperations
from secretfs.identity import SYSTEM
from secretfs.model import InternalServiceError, ServiceUnavailable
from secretfs.mount_helper import parse_options
from secretfs.options import MountOptions, OptionsError
from secretfs.service import SecretsManagerService
from secretfs.state import StateDir
from secretfs.store import StoreError
from secretfs.store.postgres import Change, PostgresStore, parse_change

pytest_plugins = ["_fleet"]

REGION, ACCOUNT = "us-east-1", "123456789012"


# --- the notifications ---------------------------------------------------------------


class Services:
    """Two processes' views of one database: each its own store (own origin) and service."""

    def __init__(self, url: str, key_file: Path):
        self.url, self.key_file = url, key_file
        LocalKeyProvider.create(key_file, region=REGION, account_id=ACCOUNT)
        PostgresStore.create(url).close()
        self.stores: list[PostgresStore] = []
        self.a, self.b = self.service(), self.service()

    def service(self, wrap=lambda store: store) -> SecretsManagerService:
        """Another process's service; `wrap` may stand between it and its store."""
        store = PostgresStore(self.url)
        self.stores.append(store)
        keys = LocalKeyProvider.load(self.key_file, region=REGION, account_id=ACCOUNT)
        return SecretsManagerService(wrap(store), keys, region=REGION, account_id=ACCOUNT)

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def services(postgres_cluster, tmp_path):
    opened = Services(postgres_cluster.url(postgres_cluster.create_database()),
                      tmp_path / "keys.json")
    yield opened
    opened.close()


def heard(listener) -> list[Change]:
    """The next burst of notifications, and proof that no more follow it."""
    found = listener.changes(5.0)
    return found + listener.changes(0.3)


def call(service: SecretsManagerService, action: str, **params) -> dict:
    return service.call(action, params, SYSTEM)


def test_each_commit_is_one_notification_naming_what_changed_and_whose_it_was(
        services, postgres_cluster):
    a, b = services.a, services.b
    origin = a.store.origin
    listener = b.store.listen()
    try:
        arn = call(a, "CreateSecret", Name="app/db", SecretString="v1")["ARN"]
        secret_id = a.catalog.id_by_arn(arn)
        # A secret's row, its version and its label: one notification, A's.
        assert heard(listener) == [Change("secret", secret_id, origin)]
        call(a, "PutSecretValue", SecretId="app/db", SecretString="v2")
        assert heard(listener) == [Change("secret", secret_id, origin)]
        call(a, "TagResource", SecretId="app/db", Tags=[{"Key": "team", "Value": "ops"}])
        assert heard(listener) == [Change("secret", secret_id, origin)]
        call(a, "PutResourcePolicy", SecretId="app/db", ResourcePolicy=json.dumps({
            "Statement": [{"Effect": "Deny", "Principal": {"Unix": ["uid:4321"]},
                           "Action": "*", "Resource": "*"}]}))
        assert set(heard(listener)) == {Change("secret", secret_id, origin),
                                        Change("policies", None, origin)}
        call(a, "PutIdentityPolicy", Principal="uid:4321", PolicyName="Read",
             PolicyDocument=json.dumps({"Statement": [{
                 "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                 "Resource": "*"}]}))
        assert heard(listener) == [Change("policies", None, origin)]
        call(a, "CreateAccessKey", Principal="uid:4321")
        assert heard(listener) == [Change("access-keys", None, origin)]
        # A write that rolls back is never heard.
        with pytest.raises(RuntimeError), a.store.write() as writer:
            writer.update_secret(secret_id, description="never")
            raise RuntimeError("rolled back")
        assert listener.changes(0.5) == []
        # The listener's own process is named as such; a tool's write has no origin.
        b.reload()  # B has no feed here: it learns of A's secret by asking
        call(b, "UpdateSecret", SecretId="app/db", Description="from b")
        assert heard(listener) == [Change("secret", secret_id, b.store.origin)]
        with psycopg.connect(postgres_cluster.url(_dbname(a)), autocommit=True) as tool:
            tool.execute("UPDATE secrets SET description = 'by hand' WHERE id = %s",
                         (secret_id,))
        assert heard(listener) == [Change("secret", secret_id, "")]
        # pg_stat_activity tells the listening session apart from the pool's.
        with postgres_cluster.admin() as admin:
            named = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                  "application_name = %s", (listener.application_name,))
            assert named.fetchone()[0] == 1
        assert listener.application_name == f"secretfs-feed-{b.store.origin}"
    finally:
        listener.close()


def _dbname(service: SecretsManagerService) -> str:
    return service.store.where.rpartition("/")[2]


@pytest.mark.parametrize("payload, change", [
    ("secret:42@00ff", Change("secret", 42, "00ff")),
    ("secret:7@", Change("secret", 7, "")),
    ("policies@ab", Change("policies", None, "ab")),
    ("access-keys@", Change("access-keys", None, "")),
    ("secret:x@ab", None), ("secret:@ab", None), ("policies:1@ab", None),
    ("rotations@ab", None), ("secret:42", None), ("", None),
])
def test_a_payload_names_its_change_and_one_this_secretfs_does_not_know_is_none(payload, change):
    assert parse_change(payload) == change


def test_notifications_are_installed_once_per_store(services):
    def triggers() -> list[tuple]:
        with services.a.store.read() as reader:
            assert reader.meta("change_notifications") == "1"
            # A trigger made again is a new row, with another xmin.
            return reader.db.execute(
                "SELECT tgrelid::regclass::text, xmin::text FROM pg_trigger "
                "WHERE tgname = 'secretfs_notify' ORDER BY 1").fetchall()

    installed = triggers()
    assert [table for table, _ in installed] == sorted(
        ["access_keys", "identity_policies", "labels", "secrets", "tags", "versions"])
    PostgresStore(services.a.store.url).close()  # another host starts
    assert triggers() == installed


def test_max_staleness_comes_from_the_flag_config_json_or_fstab_and_is_checked():
    parser = argparse.ArgumentParser()
    MountOptions.add_arguments(parser)
    given = MountOptions(max_staleness="2.5")
    assert MountOptions.from_args(parser.parse_args(given.argv())) == given
    assert given.staleness_bound() == 2.5
    assert MountOptions().staleness_bound() == 60.0  # see secretfs/fleet.py for why
    assert MountOptions().with_config({"MaxStaleness": 30}).staleness_bound() == 30.0
    assert given.with_config({"MaxStaleness": 30}).staleness_bound() == 2.5  # flags win
    assert parse_options("max_staleness=10,strict_names")[0] == MountOptions(
        max_staleness="10", strict_names=True)
    assert parse_options("max-staleness=10")[0].staleness_bound() == 10.0
    for bad in ("0", "0.5", "-3", "soon", "inf", "nan", ""):
        with pytest.raises(OptionsError, match=r"^--max-staleness '.*': give a number of "
                                               r"seconds, at least 1$"):
            MountOptions(max_staleness=bad).staleness_bound()


@pytest.mark.mount
def test_a_bad_max_staleness_is_refused_in_one_line_before_mounting(state_dir, tmp_path):
    mountpoint = tmp_path / "secrets"
    mountpoint.mkdir()
    daemon = Daemon(state_dir=state_dir, mountpoint=mountpoint)
    refused = daemon.cli("mount", str(mountpoint), "--state-dir", str(state_dir),
                         "--max-staleness", "soon", check=False)
    message = refused.stderr.decode()
    assert refused.returncode != 0 and message.count("\n") == 1, message
    assert "--max-staleness 'soon': give a number of seconds" in message
    assert not os.path.ismount(mountpoint)
    helper = subprocess.run(
        [sys.executable, "-m", "secretfs.mount_helper", str(state_dir), str(mountpoint),
         "-o", "max_staleness=-1"], capture_output=True, timeout=60)
    assert helper.returncode == 1 and b"--max-staleness '-1'" in helper.stderr
    assert not os.path.ismount(mountpoint)


# --- the feed, on two services ---------------------------------------------------------


class Clock:
    """time.monotonic, which a test may push forward."""

    def __init__(self):
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


async def until(predicate, seconds: float = 5.0) -> bool:
    with trio.move_on_after(seconds):
        while not predicate():
            await trio.sleep(0.01)
        return True
    return False


async def test_the_feed_applies_other_processes_commits_and_bounds_staleness(services):
    a, b = services.a, services.b
    clock = Clock()
    feed = ChangeFeed(b, max_staleness=3.0, clock=clock)
    b.feed = feed

    def a_calls(action: str, **params):
        return trio.to_thread.run_sync(lambda: call(a, action, **params))

    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        assert feed.connected and feed.describe()["State"] == "connected"
        await a_calls("CreateSecret", Name="feed/db", SecretString="one")
        assert await until(lambda: b.catalog.id_by_name("feed/db") is not None)
        secret_id = b.catalog.id_by_name("feed/db")
        put = await a_calls("PutSecretValue", SecretId="feed/db", SecretString="two")
        assert await until(
            lambda: b.catalog.get(secret_id).labels["AWSCURRENT"] == put["VersionId"])
        # B's own commit is refreshed by B, never heard back.
        await trio.to_thread.run_sync(lambda: call(b, "TagResource", SecretId="feed/db",
                                                   Tags=[{"Key": "k", "Value": "v"}]))
        generation = b.policy_generation
        await a_calls("PutIdentityPolicy", Principal="uid:4321", PolicyName="Read",
                      PolicyDocument=json.dumps({"Statement": [{
                          "Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        assert await until(lambda: b.policy_generation > generation)
        assert feed.changes_heard == 3  # A's create, put and policy; not B's tag

        # Past the bound, reads are refused; mutations still go to the store.
        clock.ahead = 3.5
        assert feed.stale() and b.is_stale()
        for action, params in (("GetSecretValue", {"SecretId": "feed/db"}),
                               ("DescribeSecret", {"SecretId": "feed/db"}),
                               ("ListSecrets", {})):
            with pytest.raises(ServiceUnavailable, match="heard nothing from the shared"):
                b.call(action, params, SYSTEM)
        call(b, "UpdateSecret", SecretId="feed/db", Description="still writable")
        # The next heartbeat's ping (at most a third of the bound) makes B current again.
        assert await until(lambda: not feed.stale(), 3.0)
        assert call(b, "GetSecretValue", SecretId="feed/db")["SecretString"] == "two"
        nursery.cancel_scope.cancel()


# --- no store round trip on the FUSE loop ---------------------------------------------


class ReadsWatched:
    """A store whose reads note the thread they run on (everything else is the store's)."""

    def __init__(self, store: PostgresStore):
        self.store = store
        self.threads: list[threading.Thread] = []

    def read(self):
        self.threads.append(threading.current_thread())
        return self.store.read()

    def __getattr__(self, name: str):
        return getattr(self.store, name)


async def test_fuse_handlers_read_the_store_in_worker_threads_and_only_on_a_miss(services):
    value = json.dumps({"user": "admin", "password": "pw-7d2"}).encode()
    call(services.a, "CreateSecret", Name="app/db", SecretBinary=value)
    watched = None

    def watch(store):
        nonlocal watched
        watched = ReadsWatched(store)
        return watched

    ops = SecretsOperations(services.service(watch))
    watched.threads.clear()  # the catalog's index, read at start
    root = SimpleNamespace(uid=0, gid=0, pid=os.getpid())
    loop = threading.current_thread()

    async def lookup(inode: int, *names: bytes) -> int:
        for name in names:
            inode = (await ops.lookup(inode, name, root)).st_ino
        return inode

    async def content(inode: int) -> bytes:
        handle = (await ops.open(inode, os.O_RDONLY, root)).fh
        try:
            return await ops.read(handle, 0, 4096)
        finally:
            await ops.release(handle)

    async def walk() -> tuple[bytes, bytes]:
        directory = await lookup(pyfuse3.ROOT_INODE, b"app", b"db")
        version = os.path.basename(await ops.readlink(await lookup(directory, b"AWSCURRENT"),
                                                      root))
        whole = await content(await lookup(directory, b"versions", version))
        key = await lookup(directory, b"keys", b".by-version", version, b"password")
        await ops.getattr(key, root)
        return whole, await content(key)

    assert await walk() == (value, b"pw-7d2")
    # A first walk loads the snapshot, the value and its key files: never on the loop.
    assert len(watched.threads) >= 3 and loop not in watched.threads
    watched.threads.clear()
    assert await walk() == (value, b"pw-7d2")
    # Then only the version file's read goes to the store (the kernel's page cache
    # spares even that on a mount); every lookup, readlink and open answers from memory.
    assert len(watched.threads) == 1 and loop not in watched.threads


# --- two daemons -----------------------------------------------------------------------


def client(host: Daemon) -> Client:
    return Client(StateDir(host.state_dir).socket, timeout=30.0)


def feed_status(host: Daemon) -> dict:
    return client(host).call("GetStatus", {}, extension=True)["ChangeFeed"]


def read(path: Path) -> bytes | int:
    """A file's content, or the errno reading it failed with."""
    try:
        return path.read_bytes()
    except OSError as error:
        return error.errno


@pytest.mark.mount
def test_a_promotion_through_a_shows_through_b_within_the_bound(fleet):
    fleet.start()
    a = client(fleet.a)
    a.call("CreateSecret", {"Name": "fleet/db", "SecretString": "value-0"})
    current = fleet.b.path("fleet", "db", "AWSCURRENT")
    assert wait_for(lambda: read(current) == b"value-0", 5)
    values = {}
    delays = []
    for n in range(1, 21):
        if n % 2:  # a new version, which becomes AWSCURRENT
            put = a.call("PutSecretValue", {"SecretId": "fleet/db",
                                            "SecretString": f"value-{n}"})
            values[put["VersionId"]] = f"value-{n}".encode()
            expected = values[put["VersionId"]]
        else:  # AWSCURRENT moved back to the version before
            stages = a.call("DescribeSecret", {"SecretId": "fleet/db"})["VersionIdsToStages"]
            current_id = next(v for v, s in stages.items() if "AWSCURRENT" in s)
            previous_id = next(v for v, s in stages.items() if "AWSPREVIOUS" in s)
            a.call("UpdateSecretVersionStage", {
                "SecretId": "fleet/db", "VersionStage": "AWSCURRENT",
                "MoveToVersionId": previous_id, "RemoveFromVersionId": current_id})
            expected = values.get(previous_id, b"value-0")
        started = time.perf_counter()
        assert wait_for(lambda expected=expected: read(current) == expected, 5, 0.0005)
        delays.append(time.perf_counter() - started)
    p50, worst = statistics.median(delays) * 1000, max(delays) * 1000
    print(f"\npropagation A -> B over {len(delays)} promotions: p50 {p50:.1f} ms, "
          f"max {worst:.1f} ms")
    assert worst < 2000
    assert feed_status(fleet.b)["ChangesHeard"] >= 21
    assert feed_status(fleet.b)["State"] == "connected"


@pytest.mark.mount
def test_creation_policies_tags_and_deletion_through_a_reach_b(fleet, make_user):
    user = make_user()
    fleet.start()
    a, b = client(fleet.a), client(fleet.b)
    a.call("CreateSecret", {"Name": "team/api", "SecretString": "api-key"})
    on_b = fleet.b.path("team", "api", "AWSCURRENT")
    assert wait_for(lambda: read(on_b) == b"api-key", 5)
    assert run_as(user, "cat", str(on_b)).returncode != 0  # no policy yet

    # An identity policy through A lets the user read through B's mount...
    a.call("PutIdentityPolicy", {
        "Principal": f"user:{user.pw_name}", "PolicyName": "ReadTeam",
        "PolicyDocument": json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
            "Resource": "arn:aws:secretsmanager:*:*:secret:team/*"}]})}, extension=True)
    assert wait_for(lambda: run_as(user, "cat", str(on_b)).stdout == b"api-key", 5)
    # ... and a resource policy's Deny through A shuts them out there again.
    a.call("PutResourcePolicy", {"SecretId": "team/api", "ResourcePolicy": json.dumps({
        "Statement": [{"Effect": "Deny", "Principal": {"Unix": [f"user:{user.pw_name}"]},
                       "Action": "secretsmanager:GetSecretValue", "Resource": "*"}]})})
    assert wait_for(lambda: run_as(user, "cat", str(on_b)).returncode != 0, 5)
    assert b"Permission denied" in run_as(user, "cat", str(on_b)).stderr

    a.call("TagResource", {"SecretId": "team/api",
                           "Tags": [{"Key": "owner", "Value": "platform"}]})
    assert wait_for(lambda: b.call("DescribeSecret", {"SecretId": "team/api"}).get("Tags")
                    == [{"Key": "owner", "Value": "platform"}], 5)

    a.call("DeleteSecret", {"SecretId": "team/api", "ForceDeleteWithoutRecovery": True})
    assert wait_for(lambda: not fleet.b.path("team", "api").exists(), 5)
    assert not fleet.b.path("team").exists()
    listed = b.call("ListSecrets", {"IncludePlannedDeletion": True})["SecretList"]
    assert [entry["Name"] for entry in listed] == []


@pytest.mark.mount
def test_b_reads_everything_again_after_its_listening_session_is_killed(fleet):
    fleet.start()
    a = client(fleet.a)
    first = a.call("CreateSecret", {"Name": "kill/db", "SecretString": "kill-first-7c1"})
    a.call("PutSecretValue", {"SecretId": "kill/db", "SecretString": "kill-second-7c1"})
    on_b = fleet.b.path("kill", "db", "AWSCURRENT")
    assert wait_for(lambda: read(on_b) == b"kill-second-7c1", 5)
    assert read(fleet.b.path("kill", "db", "AWSPREVIOUS")) == b"kill-first-7c1"
    name = feed_status(fleet.b)["ApplicationName"]
    with psycopg.connect(fleet.url, autocommit=True) as store:
        killed = store.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s", (name,)).fetchall()
        # At once, while B has no session (it waits 0.1 s before it connects again): a
        # change no notification will tell B of. By hand, as an operator would undo a
        # promotion: AWSCURRENT back on the first version.
        store.execute(
            "UPDATE labels SET version_id = CASE label WHEN 'AWSCURRENT' THEN %s"
            " ELSE (SELECT version_id FROM labels l WHERE l.secret_id = labels.secret_id"
            " AND l.label = 'AWSCURRENT') END"
            " WHERE secret_id = (SELECT id FROM secrets WHERE name = 'kill/db')"
            " AND label IN ('AWSCURRENT', 'AWSPREVIOUS')", (first["VersionId"],))
    assert killed == [(True,)]
    assert wait_for(lambda: read(on_b) == b"kill-first-7c1", 10)
    assert read(fleet.b.path("kill", "db", "AWSPREVIOUS")) == b"kill-second-7c1"
    status = feed_status(fleet.b)
    assert status["State"] == "connected" and status["Reconnects"] == 1
    log = StateDir(fleet.b.state_dir).log.read_text()
    assert "read the store again, 1 secrets changed" in log, log  # the resync caught it
    # The new session hears the next commit as the first one did.
    a.call("PutSecretValue", {"SecretId": "kill/db", "SecretString": "kill-third-7c1"})
    assert wait_for(lambda: read(on_b) == b"kill-third-7c1", 5)
    assert "kill-" not in StateDir(fleet.b.state_dir).log.read_text()


def _through(host: Daemon, proxy: TcpProxy, port: int) -> None:
    """Point a host's store URL at the proxy (its pgpass serves any port)."""
    state = StateDir(host.state_dir)
    config = state.read_config()
    assert f":{port}/" in config["StoreUrl"]
    config["StoreUrl"] = config["StoreUrl"].replace(f":{port}/", f":{proxy.port}/")
    state.write_config(config)


@pytest.mark.mount
@pytest.mark.slow
def test_a_host_cut_off_serves_what_it_knew_then_refuses_then_catches_up(
        fleet, postgres_cluster):
    proxy = TcpProxy(postgres_cluster.port)
    try:
        _through(fleet.b, proxy, postgres_cluster.port)
        fleet.start("--max-staleness", "3")
        a, b = client(fleet.a), client(fleet.b)
        a.call("CreateSecret", {"Name": "cut/db", "SecretString": "cut-known-3e9"})
        on_b = fleet.b.path("cut", "db", "AWSCURRENT")
        assert wait_for(lambda: read(on_b) == b"cut-known-3e9", 5)
        assert proxy.connections >= 2  # B's pool and its listening session

        proxy.cut()
        cut = time.monotonic()
        # Within the bound B serves what it knew ...
        assert read(on_b) == b"cut-known-3e9"
        # ... its mutations fail, clearly, and change nothing ...
        refused = fleet.b.cli("put-secret-value", "--secret-id", "cut/db",
                              "--secret-string", "cut-from-b-3e9", check=False)
        message = refused.stderr.decode()
        assert refused.returncode != 0 and message.count("\n") == 1, message
        assert "InternalServiceError" in message and "store" in message, message
        # ... while A, which still reaches the store, moves on.
        a.call("PutSecretValue", {"SecretId": "cut/db", "SecretString": "cut-newer-3e9"})
        assert read(on_b) == b"cut-known-3e9"  # B can't know yet
        # Past the bound (3 s since B last proved itself current) opens fail with EIO.
        assert wait_for(lambda: read(on_b) == errno.EIO, 10, 0.05)
        refused_after = time.monotonic() - cut
        assert refused_after <= 3.0 + 1.5, refused_after
        status = feed_status(fleet.b)
        assert status["State"] == "reconnecting" and status["Stale"] is True
        assert status["StaleSinceDate"] is not None and status["LastError"]
        text = fleet.b.cli("status").stdout.decode()  # what the operator sees meanwhile
        assert "change feed   reconnecting  last resync " in text, text
        assert "STALE since " in text and "rotations     unknown: " in text, text
        # On the API: ServiceUnavailable, whose code is InternalServiceError.
        with pytest.raises(InternalServiceError, match="heard nothing from the shared"):
            b.call("GetSecretValue", {"SecretId": "cut/db"})

        proxy.restore()
        # B reconnects, reads everything again, and serves A's latest.
        assert wait_for(lambda: read(on_b) == b"cut-newer-3e9", 15)
        status = feed_status(fleet.b)
        assert status["State"] == "connected" and status["Stale"] is False
        assert status["Reconnects"] == 1
        assert b.call("GetSecretValue", {"SecretId": "cut/db"})["SecretString"] == "cut-newer-3e9"
        log = StateDir(fleet.b.state_dir).log.read_text()
        assert "serving what this host knows for at most 3 s" in log
        assert "secret files answer EIO" in log and "current again" in log
        assert "-3e9" not in log, log
    finally:
        proxy.close()


def test_an_unreachable_store_is_a_store_error_for_the_listener(postgres_cluster):
    proxy = TcpProxy(postgres_cluster.port)
    url = postgres_cluster.url(postgres_cluster.create_database())
    port = f":{postgres_cluster.port}/"
    PostgresStore.create(url).close()
    store = PostgresStore(url.replace(port, f":{proxy.port}/"))
    try:
        listener = store.listen()
        proxy.cut()
        with pytest.raises(StoreError, match="change notifications stopped"):
            listener.changes(5.0)
        listener.close()
        with pytest.raises(StoreError, match="can't connect to the store"):
            store.listen()
    finally:
        store.close()
        proxy.close()
