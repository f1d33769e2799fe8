"""Tier 1: the store contract, written once and run on both backends (the `backend`
fixture: SQLite in tmp_path, and an empty PostgreSQL database in the session's
throw-away server) — schema and migrations, the rotation index, tamper detection
end to end, transactions that fail leaving nothing behind, writers racing from two
daemons, and the lease that elects one host per secret. Then what each backend owes on
its own: SQLite's files (WAL, modes, no
plaintext, wiped deletions), and what reaches the PostgreSQL server."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from conftest import wait_for

from secretfs.crypto import LocalKeyProvider
from secretfs.identity import SYSTEM
from secretfs.model import (
    AWSCURRENT,
    AWSPREVIOUS,
    DecryptionFailure,
    InvalidParameterException,
    ResourceExistsException,
    SecretsManagerError,
    ServiceUnavailable,
)
from secretfs.service import SecretsManagerService
from secretfs.store import StoreError
from secretfs.store import postgres as postgres_store
from secretfs.store import sqlite as sqlite_store
from secretfs.store.postgres import PostgresStore
from secretfs.store.sqlite import SCHEMA_VERSION, SqliteStore

pytest_plugins = ["_service_fixtures", "_postgres_store"]


# --- the two backends ---------------------------------------------------------------------


class SqliteBackend:
    """A store file, and connections of the test's own beside the service's."""

    name = "sqlite"
    module = sqlite_store
    writer = sqlite_store.Writer
    exists_error = FileExistsError

    def __init__(self, path: Path):
        self.path = path

    def elsewhere(self) -> SqliteBackend:
        return SqliteBackend(self.path.with_name(f"other-{secrets.token_hex(4)}.db"))

    def create(self) -> SqliteStore:
        return SqliteStore.create(self.path)

    def open(self) -> SqliteStore:
        """Another store on the same data, as another daemon opens it."""
        return SqliteStore(self.path)

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 5000")
        return connection

    def execute(self, query: str, params: tuple = ()) -> list[tuple]:
        with closing(self.connect()) as connection:
            return connection.execute(query, params).fetchall()

    def change(self, query: str, params: tuple = ()) -> int:
        """Run a statement; the number of rows it changed."""
        with closing(self.connect()) as connection:
            return connection.execute(query, params).rowcount

    def install(self, script: str) -> None:
        with closing(self.connect()) as connection:
            connection.executescript(script)

    def bulk_insert(self, query: str, rows) -> None:
        with closing(self.connect()) as connection:
            connection.execute("BEGIN")
            connection.executemany(query, rows)
            connection.execute("COMMIT")

    def tables(self) -> list[str]:
        return [name for (name,) in self.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name")]

    def indexes(self) -> set[str]:
        return {name for (name,) in self.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}

    def rotation_plans(self) -> list[str]:
        """The query plans of the runner's two questions, as the store asks them."""
        rotating, due = sqlite_store._ROTATING, sqlite_store._ROTATION_DUE
        return [" ".join(row[3] for row in self.execute("EXPLAIN QUERY PLAN " + query))
                for query in (
                    f"SELECT id FROM secrets WHERE {rotating} AND {due} <= 1 ORDER BY {due}",
                    f"SELECT {due} AS due FROM secrets WHERE {rotating} AND due >= 0"
                    " ORDER BY due LIMIT 1")]

    @staticmethod
    def uses_rotation_index(plan: str) -> bool:
        return plan.startswith("SEARCH secrets USING INDEX secrets_by_rotation_due")

    @staticmethod
    def shorten_write_wait(store: SqliteStore) -> None:
        with store.read() as reader:
            reader.db.execute("PRAGMA busy_timeout = 50")

    @staticmethod
    def driver_error(message: str) -> Exception:
        return sqlite3.OperationalError(message)

    def close(self) -> None:
        pass


class PostgresBackend:
    """An empty database, and a connection of the test's own (autocommit)."""

    name = "postgres"
    module = postgres_store
    writer = postgres_store.Writer
    exists_error = StoreError

    def __init__(self, cluster):
        self.cluster = cluster
        self.dbname = cluster.create_database()
        self.url = cluster.url(self.dbname)
        self._connection: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def elsewhere(self) -> PostgresBackend:
        return PostgresBackend(self.cluster)

    def create(self) -> PostgresStore:
        return PostgresStore.create(self.url)

    def open(self) -> PostgresStore:
        return PostgresStore(self.url)

    def connect(self) -> psycopg.Connection:
        if self._connection is None:
            self._connection = psycopg.connect(self.url, autocommit=True)
        return self._connection

    def _execute(self, query: str, params: tuple | None) -> psycopg.Cursor:
        return self.connect().execute(query.replace("?", "%s"), params)

    def execute(self, query: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            cursor = self._execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def change(self, query: str, params: tuple = ()) -> int:
        with self._lock:
            return self._execute(query, params).rowcount

    def install(self, script: str) -> None:
        with self._lock:
            self._execute(script, None)

    def bulk_insert(self, query: str, rows) -> None:
        table, _, columns = query.removeprefix("INSERT INTO ").partition(" VALUES")[0] \
            .partition(" ")
        with self._lock, self.connect().cursor() as cursor, \
                cursor.copy(f"COPY {table} {columns} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        self.execute("ANALYZE secrets")  # as autovacuum would, soon after

    def tables(self) -> list[str]:
        return [name for (name,) in self.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " ORDER BY tablename")]

    def indexes(self) -> set[str]:
        return {name for (name,) in self.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}

    def rotation_plans(self) -> list[str]:
        return [" ".join(row[0] for row in self.execute("EXPLAIN " + query.replace("?", "1")))
                for query in (postgres_store.DUE_QUERY, postgres_store.NEXT_DUE_QUERY)]

    @staticmethod
    def uses_rotation_index(plan: str) -> bool:
        # An index scan, or a bitmap scan of the index (and a sort of what it found).
        return any(f"{scan} secrets_by_rotation_due" in plan for scan in (
            "Index Scan using", "Bitmap Index Scan on")) and "Seq Scan" not in plan

    @staticmethod
    def shorten_write_wait(store: PostgresStore) -> None:
        store.write_wait = 0.05

    @staticmethod
    def driver_error(message: str) -> Exception:
        return psycopg.OperationalError(message)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        chosen = SqliteBackend(tmp_path / "secrets.db")
    else:
        chosen = PostgresBackend(request.getfixturevalue("postgres_cluster"))
    yield chosen
    chosen.close()


only_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
only_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


@pytest.fixture
def env(env, backend):
    """_service_fixtures' env, its service on the backend's store."""
    if backend.name == "sqlite":  # env's own store is that file
        yield env
        return
    store, sqlite_service = backend.create(), env.service
    env.service = SecretsManagerService(
        store, sqlite_service.keys, region=sqlite_service.region,
        account_id=sqlite_service.account_id, clock=env.clock)
    yield env
    store.close()


@pytest.fixture
def store(env):
    """The store under test: the parametrized backend's, as the service uses it."""
    return env.service.store


def another_daemon(env, backend) -> SecretsManagerService:
    """A second service on the same store, as a second host runs it: its own
    connections, its own catalog, its own mutation lock."""
    store = backend.open()
    env.opened.append(store)
    service = env.service
    keys = LocalKeyProvider.load(env.key_path, region=service.region,
                                 account_id=service.account_id)
    return SecretsManagerService(store, keys, region=service.region,
                                 account_id=service.account_id, clock=env.clock)


def dump(backend) -> list[tuple]:
    """Every row of every table, for before/after comparisons."""
    rows = []
    for table in backend.tables():
        rows += [(table, *row) for row in backend.execute(f"SELECT * FROM {table} ORDER BY 1, 2")]
    return rows


def version_row(backend, name: str, version_id: str) -> tuple:
    (row,) = backend.execute(
        "SELECT v.ciphertext, v.wrapped_key, v.key_id FROM versions v"
        " JOIN secrets s ON s.id = v.secret_id WHERE s.name = ? AND v.version_id = ?",
        (name, version_id))
    return row


def set_version_row(backend, name: str, version_id: str, row: tuple) -> None:
    assert backend.change(
        "UPDATE versions SET ciphertext = ?, wrapped_key = ?, key_id = ? WHERE version_id = ?"
        " AND secret_id = (SELECT id FROM secrets WHERE name = ?)",
        (*row, version_id, name)) == 1


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- schema, migrations, the rotation index ----------------------------------------------


def test_schema_version_is_recorded(env, backend):
    (version,), = backend.execute("SELECT value FROM meta WHERE key = 'schema_version'")
    tables = set(backend.tables())
    assert int(version) == SCHEMA_VERSION == 4
    assert {"meta", "secrets", "tags", "versions", "labels", "identity_policies",
            "access_keys"} <= tables


def test_both_backends_walk_the_same_migrations():
    assert set(postgres_store._MIGRATIONS) == set(sqlite_store._MIGRATIONS) \
        == set(range(2, SCHEMA_VERSION + 1))


def test_a_version_1_store_is_upgraded_in_place(backend):
    """A store written by the first schema opens, keeps its rows, and gains policies."""
    old = backend.elsewhere()
    old.install(old.module._SCHEMA + "INSERT INTO meta VALUES ('schema_version', '1');")
    old.change(
        "INSERT INTO secrets (name, path, arn, created, changed) VALUES ('a', 'a', 'arn:x', 0, 0)")
    store = old.open()
    with store.read() as reader:
        assert [row.name for row in reader.rows()] == ["a"]
        assert reader.identity_policies() == {}
        assert reader.resource_policies() == {}
    store.close()
    assert old.execute("SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    assert "secrets_by_rotation_due" in old.indexes()
    old.close()


def _rotation(**fields) -> str:
    return json.dumps({"RotationLambdaARN": "secretfs:random-password", **fields})


def test_due_rotations_come_from_the_index_among_100k_secrets(backend):
    """100,000 secrets, most never rotating: the runner's two questions are answered
    by a search of the rotation index (the plan says so) and answered right."""
    big = backend.elsewhere()
    big.create().close()
    rotation = {7: _rotation(Enabled=True, NextRotationDate=500.0),
                70_000: _rotation(Enabled=True, NextRotationDate=100.0),
                99_999: _rotation(Enabled=True, NextRotationDate=50.0, Pending={
                    "Token": "t", "Step": None, "RetryAt": 300.0}),
                12: _rotation(Enabled=False),
                13: _rotation(Enabled=True, NextRotationDate=10.0)}
    # Ids are drawn in insertion order from 1 on both backends (checked below).
    big.bulk_insert(
        "INSERT INTO secrets (name, path, arn, created, changed, rotation, deleted)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((f"s{n}", f"s{n}", f"arn:{n}", 0.0, 0.0, rotation.get(n), 1.0 if n == 13 else None)
         for n in range(1, 100_001)))
    assert big.execute("SELECT id FROM secrets WHERE name IN ('s1', 's70000') ORDER BY id") \
        == [(1,), (70_000,)]
    for plan in big.rotation_plans():
        assert big.uses_rotation_index(plan), plan
    store = big.open()
    with store.read() as reader:
        # The deleted secret (13) and the disabled one (12) are never due.
        assert reader.next_rotation_due() == 100.0
        assert reader.rotations_due(99.0) == []
        assert reader.rotations_due(300.0) == [70_000, 99_999]  # earliest first
        assert reader.rotations_due(1e9) == [70_000, 99_999, 7]
    store.close()
    big.close()


def test_a_newer_schema_is_refused(env, backend):
    env.service.store.close()
    backend.change("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                   (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        backend.open()


def test_a_location_without_the_schema_is_refused(backend):
    empty = backend.elsewhere()
    if empty.name == "sqlite":
        sqlite3.connect(empty.path).close()
    with pytest.raises(StoreError, match="no secretfs schema"):
        empty.open()
    empty.close()


def test_a_file_that_is_not_sqlite_is_refused_with_store_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, " * 256)
    with pytest.raises(StoreError):
        SqliteStore(junk)


def test_create_refuses_an_existing_store(env, backend):
    with pytest.raises(backend.exists_error):
        backend.create()


def test_stored_size_is_the_plaintext_size(env, call):
    for name, value in (("ascii", {"SecretString": "x" * 37}),
                        ("utf8", {"SecretString": "\u00e9\u2603"}),
                        ("bin", {"SecretBinary": b"\x00" * 1000})):
        call("CreateSecret", Name=name, **value)
    with env.service.store.read() as reader:
        sizes = {}
        for row in reader.rows():
            (version,) = reader.load(row.secret_id).versions.values()
            sizes[row.name] = (version.size, version.is_binary)
        assert reader.sealed_value(row.secret_id, "no-such-version") is None
    assert sizes == {"ascii": (37, False), "utf8": (5, False), "bin": (1000, True)}


def test_force_delete_leaves_no_rows(env, call, backend):
    call("CreateSecret", Name="s", SecretString="v", Tags=[{"Key": "k", "Value": "v"}])
    call("PutSecretValue", SecretId="s", SecretString="w", VersionStages=["blue"])
    ((secret_id,),) = backend.execute("SELECT id FROM secrets WHERE name = 's'")
    call("DeleteSecret", SecretId="s", ForceDeleteWithoutRecovery=True)
    for table in ("versions", "labels", "tags"):
        assert backend.execute(f"SELECT count(*) FROM {table} WHERE secret_id = ?",
                               (secret_id,)) == [(0,)], table
    assert backend.execute("SELECT count(*) FROM secrets") == [(0,)]
    # ids are never reused: an inode keyed by id can't alias a recreated secret
    call("CreateSecret", Name="s", SecretString="again")
    ((new_id,),) = backend.execute("SELECT id FROM secrets WHERE name = 's'")
    assert new_id > secret_id


def test_names_sort_and_nest_bytewise(env, call):
    """Names order by their bytes on both backends, whatever PostgreSQL's locale: the
    directory tree's range query (paths_below) and ListSecrets' order rely on it."""
    names = ["a/b", "a-b", "a.b", "a_b", "aB", "Ab", "a0", "a/b/c", "a/b0", "a/b-c/d"]
    for name in names:
        call("CreateSecret", Name=name, SecretString="v")
    listed = call("ListSecrets", SortBy="name", SortOrder="asc")["SecretList"]
    assert [entry["Name"] for entry in listed] == sorted(names, key=str.encode)
    with env.service.store.read() as reader:
        assert sorted(reader.paths_below("a/b")) == ["a/b/c"]
        assert sorted(reader.paths_below("a")) == ["a/b", "a/b-c/d", "a/b/c", "a/b0"]


# --- tampering: a row moved or altered fails to open ------------------------------------


@pytest.fixture
def two_secrets(env, call):
    a1 = call("CreateSecret", Name="a", SecretString="a-one")["VersionId"]
    a2 = call("PutSecretValue", SecretId="a", SecretString="a-two")["VersionId"]
    b1 = call("CreateSecret", Name="b", SecretString="b-one")["VersionId"]
    call("CreateSecret", Name="bystander", SecretBinary=b"\x01\x02")
    return a1, a2, b1


def assert_bystanders_read(call) -> None:
    assert call("GetSecretValue", SecretId="bystander")["SecretBinary"] == b"\x01\x02"


def test_ciphertext_swapped_between_versions_fails(backend, call, two_secrets):
    a1, a2, _ = two_secrets
    row1, row2 = version_row(backend, "a", a1), version_row(backend, "a", a2)
    set_version_row(backend, "a", a1, row2)
    set_version_row(backend, "a", a2, row1)
    for version_id in (a1, a2):
        with pytest.raises(DecryptionFailure) as failure:
            call("GetSecretValue", SecretId="a", VersionId=version_id)
        assert "a-one" not in str(failure.value) and "a-two" not in str(failure.value)
    assert call("GetSecretValue", SecretId="b")["SecretString"] == "b-one"
    assert_bystanders_read(call)
    set_version_row(backend, "a", a1, row1)
    set_version_row(backend, "a", a2, row2)
    assert call("GetSecretValue", SecretId="a", VersionId=a1)["SecretString"] == "a-one"


def test_ciphertext_moved_to_another_secret_fails(backend, call, two_secrets):
    _, a2, b1 = two_secrets
    set_version_row(backend, "b", b1, version_row(backend, "a", a2))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="b")
    got = call("BatchGetSecretValue", SecretIdList=["a", "b", "bystander"])
    assert [v["Name"] for v in got["SecretValues"]] == ["a", "bystander"]
    assert [(e["SecretId"], e["ErrorCode"]) for e in got["Errors"]] == [("b", "DecryptionFailure")]


def test_ciphertext_alone_swapped_fails(backend, call, two_secrets):
    a1, a2, _ = two_secrets
    ciphertext2 = version_row(backend, "a", a2)[0]
    _, wrapped1, key1 = version_row(backend, "a", a1)
    set_version_row(backend, "a", a1, (ciphertext2, wrapped1, key1))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    assert call("GetSecretValue", SecretId="a")["SecretString"] == "a-two"


@pytest.mark.parametrize("column", ["ciphertext", "wrapped_key"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_fails(backend, call, two_secrets, column, where):
    a1, _, _ = two_secrets
    original = version_row(backend, "a", a1)
    data = original[0 if column == "ciphertext" else 1]
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    tampered = list(original)
    tampered[0 if column == "ciphertext" else 1] = flipped(data, index)
    set_version_row(backend, "a", a1, tuple(tampered))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    assert call("GetSecretValue", SecretId="a")["SecretString"] == "a-two"
    assert_bystanders_read(call)
    set_version_row(backend, "a", a1, original)  # the flip alone was the fault
    assert call("GetSecretValue", SecretId="a", VersionId=a1)["SecretString"] == "a-one"


def test_truncated_ciphertext_and_other_key_fail(backend, call, two_secrets):
    a1, _, _ = two_secrets
    ciphertext, wrapped, key_id = version_row(backend, "a", a1)
    set_version_row(backend, "a", a1, (ciphertext[:20], wrapped, key_id))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    other = call("CreateKey", Alias="alias/other")["KeyId"]
    set_version_row(backend, "a", a1, (ciphertext, wrapped, other))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)


def test_is_binary_flag_flipped_fails_cleanly(backend, call):
    created = call("CreateSecret", Name="bin", SecretBinary=b"\xff\xfe\x00binary")
    backend.change("UPDATE versions SET is_binary = 0 WHERE version_id = ?",
                   (created["VersionId"],))
    with pytest.raises(SecretsManagerError):
        call("GetSecretValue", SecretId="bin")


# --- transactions -------------------------------------------------------------------------


def test_a_raised_error_rolls_the_transaction_back(env, store, backend):
    before = dump(backend)
    with pytest.raises(RuntimeError), store.write() as writer:
        secret_id = writer.insert_secret(name="x", path="x", arn="arn:x", description=None,
                                         kms_key_id=None, created=env.clock.now)
        writer.set_tags(secret_id, [("k", "v")])
        raise RuntimeError("halfway")
    assert dump(backend) == before


def test_a_database_error_rolls_back_and_becomes_store_error(env, call, store, backend):
    call("CreateSecret", Name="taken", SecretString="v")
    before = dump(backend)
    with pytest.raises(StoreError), store.write() as writer:
        writer.insert_secret(name="fresh", path="fresh", arn="arn:fresh", description=None,
                             kms_key_id=None, created=env.clock.now)
        writer.insert_secret(name="taken", path="taken2", arn="arn:taken2", description=None,
                             kms_key_id=None, created=env.clock.now)
    assert dump(backend) == before
    with store.write() as writer:  # the connection is usable again
        writer.update_secret(writer.find(name="taken"), description="ok")
    with store.read() as reader:
        assert reader.load(reader.find(name="taken")).description == "ok"
        assert reader.find(name="fresh") is None


def test_a_request_failing_midway_leaves_nothing(env, call, backend, monkeypatch):
    call("CreateSecret", Name="s", SecretString="v")
    before = dump(backend)

    def broken_set_tags(self, secret_id, tags):
        raise backend.driver_error("disk I/O error")

    monkeypatch.setattr(backend.writer, "set_tags", broken_set_tags)
    with pytest.raises(ServiceUnavailable) as failure:
        call("CreateSecret", Name="new", SecretString="secret-value")
    assert failure.value.code == "InternalServiceError"
    assert "secret-value" not in str(failure.value)
    assert dump(backend) == before
    monkeypatch.undo()
    with pytest.raises(SecretsManagerError):
        call("DescribeSecret", SecretId="new")
    call("CreateSecret", Name="new", SecretString="v")  # the catalog holds no ghost


def test_a_locked_store_refuses_writes_cleanly(env, call, store, backend):
    """Another daemon's write in progress: this one's writes wait a bounded time, then
    fail as ServiceUnavailable, changing nothing."""
    call("CreateSecret", Name="s", SecretString="v")
    backend.shorten_write_wait(store)
    before = dump(backend)
    snapshot = env.snapshot("s")
    other = backend.open()
    with other.write():
        with pytest.raises(ServiceUnavailable):
            call("PutSecretValue", SecretId="s", SecretString="w")
        with pytest.raises(ServiceUnavailable):
            call("CreateSecret", Name="other", SecretString="w")
    other.close()
    assert dump(backend) == before
    assert env.snapshot("s") == snapshot
    call("PutSecretValue", SecretId="s", SecretString="w")
    assert call("GetSecretValue", SecretId="s")["SecretString"] == "w"


# --- two daemons on one store -------------------------------------------------------------

MOVES = 200


def test_concurrent_label_moves_from_two_daemons_serialize(env, call, backend):
    """Two daemons move AWSCURRENT 200 times each, at once, each move naming where it
    saw the label (RemoveFromVersionId). The label is never on two versions, and the
    moves that succeed chain: each starts where the one before it ended, as if they
    had run one at a time; a move that read a stale place is refused."""
    versions = [call("CreateSecret", Name="race", SecretString="v0")["VersionId"]]
    versions += [call("PutSecretValue", SecretId="race", SecretString=f"v{n}",
                      VersionStages=[f"spare{n}"])["VersionId"] for n in (1, 2, 3)]
    daemons = [env.service, another_daemon(env, backend)]
    secret_id = env.service.catalog.id_by_name("race")
    done = threading.Event()
    seen_twice: list[list[tuple]] = []

    def move(service: SecretsManagerService, seed: int):
        moves, refused = [], 0
        for turn in range(MOVES):
            with service.store.read() as reader:
                holder = reader.load(secret_id).labels[AWSCURRENT]
            target = versions[(versions.index(holder) + 1 + (turn + seed) % 3) % 4]
            try:
                service.call("UpdateSecretVersionStage", {
                    "SecretId": "race", "VersionStage": AWSCURRENT,
                    "MoveToVersionId": target, "RemoveFromVersionId": holder}, SYSTEM)
            except InvalidParameterException:
                refused += 1
                continue
            moves.append((holder, target))
        return moves, refused

    def watch():
        while not done.is_set():
            twice = backend.execute(
                "SELECT label, count(*) FROM labels GROUP BY label HAVING count(*) > 1")
            if twice:
                seen_twice.append(twice)

    with ThreadPoolExecutor(3) as pool:
        watcher = pool.submit(watch)
        runs = [pool.submit(move, daemon, seed) for seed, daemon in enumerate(daemons)]
        results = [run.result() for run in runs]
        done.set()
        watcher.result()
    assert seen_twice == []
    moves = [step for made, _ in results for step in made]
    assert all(made for made, _ in results), "each daemon moved the label"
    assert len(moves) + sum(refused for _, refused in results) == 2 * MOVES
    with env.service.store.read() as reader:
        labels = reader.load(secret_id).labels
    assert backend.execute("SELECT label, count(*) FROM labels GROUP BY label"
                           " HAVING count(*) > 1") == []
    # One chain from v0 to where AWSCURRENT is: every version is left as often as it
    # is reached, but for the chain's two ends.
    balance = Counter()
    for source, target in moves:
        balance[source] += 1
        balance[target] -= 1
    ends = {} if labels[AWSCURRENT] == versions[0] else {
        versions[0]: 1, labels[AWSCURRENT]: -1}
    assert {version: n for version, n in balance.items() if n} == ends
    assert (labels[AWSPREVIOUS], labels[AWSCURRENT]) in moves


def test_concurrent_creates_of_one_name_from_two_daemons(env, backend):
    """Both daemons create the same name at the same moment, 20 times: one wins, the
    other gets ResourceExistsException (never a store error), and one row exists."""
    daemons = [env.service, another_daemon(env, backend)]
    start = threading.Barrier(2)

    def create(service: SecretsManagerService, name: str):
        start.wait()
        try:
            return service.call("CreateSecret", {"Name": name, "SecretString": "v"}, SYSTEM)
        except ResourceExistsException as error:
            return error

    with ThreadPoolExecutor(2) as pool:
        for n in range(20):
            name = f"race/{n}"
            outcomes = [result.result() for result in [
                pool.submit(create, daemon, name) for daemon in daemons]]
            assert sorted(type(outcome).__name__ for outcome in outcomes) == [
                "ResourceExistsException", "dict"], outcomes
            assert backend.execute("SELECT count(*) FROM secrets WHERE name = ?",
                                   (name,)) == [(1,)]


# --- leases: the one host that acts on a secret -------------------------------------------


def test_a_lease_is_held_for_its_block_and_given_back(env, call, store, backend):
    """Granted while nobody holds it, for the whole block, then free again; a lease is
    apart from the write lock both ways, and a lease on another secret is its own."""
    with store.lease(7) as held:
        assert held is True
        call("CreateSecret", Name="s", SecretString="v")  # writes go on meanwhile
        with store.lease(8) as beside:
            assert beside is True
        if backend.name == "postgres":
            assert lease_holders(backend, 7) and not lease_holders(backend, 8)
    with store.write(), store.lease(7) as again:
        assert again is True
    if backend.name == "postgres":
        assert lease_holders(backend, 7) == []


def lease_holders(backend, secret_id: int) -> list[int]:
    """The server processes holding the secret's lease."""
    classid, objid = postgres_store.lease_key(secret_id)
    return [pid for (pid,) in backend.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = ? AND objid::bigint = ? AND objsubid = 2 AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())",
        (classid, objid % 2**32))]


def free(store, secret_id: int) -> bool:
    """Whether the lease is granted to `store` just now (and given back)."""
    with store.lease(secret_id) as held:
        return held


@only_postgres
def test_two_hosts_never_hold_one_lease_at_once(env, backend):
    """Two stores (two hosts), two threads each, ask for one lease 200 times in all and
    hold it a moment when granted: never two holders at once, and each host gets it."""
    hosts = [backend.open(), backend.open()]
    env.opened.extend(hosts)
    lock = threading.Lock()
    holding, most, granted = 0, 0, Counter()

    def contend(store, host: int):
        nonlocal holding, most
        for _ in range(50):
            with store.lease(7) as held:
                if not held:
                    continue
                with lock:
                    holding += 1
                    most = max(most, holding)
                    granted[host] += 1
                time.sleep(0.001)
                with lock:
                    holding -= 1

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(contend, hosts[n % 2], n % 2) for n in range(4)]:
            future.result()
    assert most == 1
    assert granted[0] and granted[1], granted
    assert lease_holders(backend, 7) == []


_HOLDER = """
import sys, time
from secretfs.store.postgres import PostgresStore
with PostgresStore(sys.stdin.readline().strip()).lease(7) as held:
    print(held, flush=True)
    time.sleep(60)
"""


@only_postgres
def test_a_lease_ends_when_its_holder_is_killed(env, backend):
    """A host SIGKILLed while it holds a lease: the server ends its connection, and
    with it the lease, which another host is then granted at once."""
    store = backend.open()
    env.opened.append(store)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdin.write(backend.url + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "True"
        assert not free(store, 7)
    finally:
        holder.kill()
        holder.wait()
    killed = time.monotonic()
    assert wait_for(lambda: free(store, 7), 5)
    assert time.monotonic() - killed < 1.0


@only_postgres
def test_a_lease_ends_when_its_connection_is_cut(env, backend):
    """The server ends the holder's connection while the holder lives: the lease goes
    to another host; the holder's block still ends cleanly, and the cut connection is
    not pooled again (its next lease is asked on a live one)."""
    holder, other = backend.open(), backend.open()
    env.opened.extend([holder, other])
    with holder.lease(7) as held:
        assert held and not free(other, 7)
        (pid,) = lease_holders(backend, 7)
        backend.execute("SELECT pg_terminate_backend(?)", (pid,))
        assert wait_for(lambda: free(other, 7), 5)
    assert free(holder, 7)
    with holder.read() as reader:  # the pool holds no dead connection either
        assert reader.rows() == []


@only_postgres
def test_a_lease_asked_on_a_dropped_pooled_connection_is_asked_anew(env, backend):
    """The server dropped the store's idle connections (a restart, a failover): the
    lease is asked again on a new connection, not refused."""
    store = backend.open()
    env.opened.append(store)
    with store.read() as reader:
        reader.rows()  # leaves a connection in the pool
    (dropped,) = backend.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert dropped[0] >= 1
    with store.lease(7) as held:
        assert held and lease_holders(backend, 7)


@only_postgres
def test_a_lease_the_server_refuses_is_a_store_error(env, backend):
    """No connection to be had: asking for the lease fails with a one-line StoreError
    naming why, and leaves no lease behind."""
    store = backend.open()
    env.opened.append(store)
    backend.execute(f'ALTER DATABASE "{backend.dbname}" CONNECTION LIMIT 0')
    backend.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    try:
        with pytest.raises(StoreError, match=r"^can't connect to the store at .*"
                                             r"too many connections") as raised, \
                store.lease(7):
            pass
    finally:
        backend.execute(f'ALTER DATABASE "{backend.dbname}" CONNECTION LIMIT -1')
    assert "\n" not in str(raised.value)
    assert lease_holders(backend, 7) == []
    assert free(store, 7)


@only_postgres
def test_lease_keys_fit_the_two_int_form_for_any_secret_id(env, backend):
    """objid is an int4: ids past it wrap into its range, and are granted as any other."""
    for secret_id in (1, 2**31 - 1, 2**31, 2**32 + 7, 2**62):
        classid, objid = postgres_store.lease_key(secret_id)
        assert classid == postgres_store.LEASE_CLASS and -2**31 <= objid < 2**31
        assert free(env.service.store, secret_id)
    assert postgres_store.lease_key(2**32 + 7) == postgres_store.lease_key(7)


# --- SQLite: the files on disk ------------------------------------------------------------


def db(env) -> sqlite3.Connection:
    """A connection of the test's own, beside the service's."""
    connection = sqlite3.connect(env.db_path, isolation_level=None)
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


def files(env) -> dict[str, bytes]:
    """The bytes of every file the store owns."""
    found = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = env.db_path.with_name(env.db_path.name + suffix)
        if path.exists():
            found[path.name] = path.read_bytes()
    return found


def checkpoint(env) -> None:
    with closing(db(env)) as connection:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0


@only_sqlite
def test_wal_mode_and_owner_only_files(env, call):
    call("CreateSecret", Name="s", SecretString="v")
    with closing(db(env)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for name in ("secrets.db", "secrets.db-wal", "secrets.db-shm"):
        path = env.root / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def write_many_values(env, call, monkeypatch) -> tuple[list[bytes], list[bytes]]:
    """80 values in 20 secrets under two master keys, read back and partly deleted:
    the values (string and binary) and the 80 data keys that sealed them."""
    provider = env.service.keys
    data_keys: list[bytes] = []
    wrap = provider.wrap

    def spying_wrap(key_id, data_key, context):
        data_keys.append(bytes(data_key))
        return wrap(key_id, data_key, context)

    monkeypatch.setattr(provider, "wrap", spying_wrap)
    call("CreateKey", Alias="alias/other")
    values: list[bytes] = []

    def string() -> str:
        value = f"plain-{secrets.token_hex(24)}"
        values.append(value.encode())
        return value

    def binary() -> bytes:
        value = secrets.token_bytes(64)
        values.append(value)
        return value

    for i in range(20):
        call("CreateSecret", Name=f"app/{i}", SecretString=string(),
             **({"KmsKeyId": "alias/other"} if i % 2 else {}))
        call("PutSecretValue", SecretId=f"app/{i}", SecretBinary=binary())
        call("PutSecretValue", SecretId=f"app/{i}", SecretString=string(),
             VersionStages=["AWSPENDING"])
        call("UpdateSecret", SecretId=f"app/{i}", SecretString=string())
    for i in range(20):  # reads, and the access dates they write, must not leak either
        call("GetSecretValue", SecretId=f"app/{i}")
        call("BatchGetSecretValue", SecretIdList=[f"app/{i}"])
    env.service.flush_accesses()
    call("DeleteSecret", SecretId="app/3", ForceDeleteWithoutRecovery=True)
    call("DeleteSecret", SecretId="app/4", RecoveryWindowInDays=7)
    assert len(data_keys) == 80 and len(set(data_keys)) == 80
    return values, data_keys


def assert_clean(content: bytes, values: list[bytes], data_keys: list[bytes], where) -> None:
    for value in values:
        assert value not in content, where
        assert base64.b64encode(value) not in content, where
    for key in data_keys:
        for form in (key, key.hex().encode(), base64.b64encode(key)):
            assert form not in content, where


def any_ciphertext(backend, call) -> bytes:
    """A version's ciphertext as the store holds it: the searches' positive control."""
    return version_row(backend, "app/0", call(
        "DescribeSecret", SecretId="app/0")["VersionIdsToStages"].popitem()[0])[0]


@only_sqlite
def test_no_plaintext_value_or_data_key_reaches_any_file(env, call, backend, monkeypatch):
    values, data_keys = write_many_values(env, call, monkeypatch)

    def assert_files_clean(stage: str) -> None:
        on_disk = files(env)
        on_disk["keys.json"] = env.key_path.read_bytes()
        for name, content in on_disk.items():
            assert_clean(content, values, data_keys, (stage, name))

    assert env.db_path.with_name("secrets.db-wal").stat().st_size > 0
    assert_files_clean("in the WAL")
    # Positive control: the ciphertext itself is on disk, so the search would find a value.
    ciphertext = any_ciphertext(backend, call)
    assert any(ciphertext in content for content in files(env).values())
    checkpoint(env)
    assert_files_clean("after checkpoint")
    assert ciphertext in files(env)["secrets.db"]


@only_sqlite
def test_deleted_ciphertext_is_wiped_from_the_file(env, call, backend):
    created = call("CreateSecret", Name="gone", SecretString="v" * 200)
    ciphertext = version_row(backend, "gone", created["VersionId"])[0]
    checkpoint(env)
    assert ciphertext in files(env)["secrets.db"]
    call("DeleteSecret", SecretId="gone", ForceDeleteWithoutRecovery=True)
    checkpoint(env)
    assert all(ciphertext not in content for content in files(env).values())


# --- PostgreSQL: what reaches the server ---------------------------------------------------


@only_postgres
def test_no_plaintext_value_or_data_key_reaches_the_postgresql_server(
        env, call, backend, monkeypatch, postgres_cluster):
    """Everything the store sends (each statement and its parameters) is free of
    values and data keys; the database's files and the WAL written meanwhile hold the
    ciphertext and none of the string values."""
    with postgres_cluster.admin() as admin:
        (first_wal,) = admin.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    sent: list[bytes] = []
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    def message(query, params) -> bytes:
        return b"\0".join(item if isinstance(item, bytes) else str(item).encode()
                          for item in (query, *(params or ())))

    def spying_execute(self, query, params=None, **options):
        sent.append(message(query, params))
        return execute(self, query, params, **options)

    def spying_executemany(self, query, params_seq, **options):
        params_seq = list(params_seq)
        sent.extend(message(query, params) for params in params_seq)
        return executemany(self, query, params_seq, **options)

    monkeypatch.setattr(psycopg.Cursor, "execute", spying_execute)
    monkeypatch.setattr(psycopg.Cursor, "executemany", spying_executemany)
    values, data_keys = write_many_values(env, call, monkeypatch)
    ciphertext = any_ciphertext(backend, call)
    assert any(ciphertext in each for each in sent)  # the spy saw what was written
    assert_clean(b"\n".join(sent), values, data_keys, "sent to the server")

    with postgres_cluster.admin() as admin:
        admin.execute("CHECKPOINT")
        (oid,) = admin.execute("SELECT oid FROM pg_database WHERE datname = %s",
                               (backend.dbname,)).fetchone()
    data = postgres_cluster.data_directory()
    stored = [path for path in (data / "base" / str(oid)).iterdir() if path.is_file()]
    stored += [path for path in (data / "pg_wal").iterdir()
               if path.is_file() and path.name >= first_wal]
    found_ciphertext = False
    for path in stored:
        content = path.read_bytes()
        found_ciphertext = found_ciphertext or ciphertext in content
        # Every string value starts so; nothing else the tests write does.
        assert b"plain-" not in content, path
    assert found_ciphertext  # positive control: the search reads the rows
