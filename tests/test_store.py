"""Tier 1: the SQLite store on disk — schema, WAL, no plaintext in any file, tamper
detection end to end, and transactions that fail leaving nothing behind."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import stat
from contextlib import closing

import pytest

from secretfs.model import DecryptionFailure, SecretsManagerError, ServiceUnavailable
from secretfs.store import StoreError
from secretfs.store import sqlite as sqlite_store
from secretfs.store.sqlite import SCHEMA_VERSION, SqliteStore, Writer

pytest_plugins = ["_service_fixtures"]


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


def dump(env) -> list[tuple]:
    """Every row of every table, for before/after comparisons."""
    rows = []
    with closing(db(env)) as connection:
        for (table,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            rows += [(table, *row) for row in connection.execute(
                f"SELECT * FROM {table} ORDER BY 1, 2")]
    return rows


def version_row(env, name: str, version_id: str) -> tuple:
    with closing(db(env)) as connection:
        return connection.execute(
            "SELECT v.ciphertext, v.wrapped_key, v.key_id FROM versions v"
            " JOIN secrets s ON s.id = v.secret_id WHERE s.name = ? AND v.version_id = ?",
            (name, version_id)).fetchone()


def set_version_row(env, name: str, version_id: str, row: tuple) -> None:
    with closing(db(env)) as connection:
        connection.execute(
            "UPDATE versions SET ciphertext = ?, wrapped_key = ?, key_id = ? WHERE version_id = ?"
            " AND secret_id = (SELECT id FROM secrets WHERE name = ?)",
            (*row, version_id, name))
        assert connection.total_changes == 1


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- schema and files --------------------------------------------------------------------


def test_schema_version_is_recorded(env):
    with closing(db(env)) as connection:
        (version,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        tables = {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert int(version) == SCHEMA_VERSION == 4
    assert {"meta", "secrets", "tags", "versions", "labels", "identity_policies",
            "access_keys"} <= tables


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    """A store written by the first schema opens, keeps its rows, and gains policies."""
    path = tmp_path / "v1.db"
    connection = sqlite3.connect(path)
    connection.executescript(sqlite_store._SCHEMA)
    connection.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    connection.execute(
        "INSERT INTO secrets (name, path, arn, created, changed) VALUES ('a', 'a', 'arn:x', 0, 0)")
    connection.commit()
    connection.close()
    store = sqlite_store.SqliteStore(path)
    with store.read() as reader:
        assert [row.name for row in reader.rows()] == ["a"]
        assert reader.identity_policies() == {}
        assert reader.resource_policies() == {}
    with closing(sqlite3.connect(path)) as check:
        assert check.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("4",)
        assert check.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                             " AND name = 'secrets_by_rotation_due'").fetchone()


def _rotation(**fields) -> str:
    return json.dumps({"RotationLambdaARN": "secretfs:random-password", **fields})


def test_due_rotations_come_from_the_index_among_100k_secrets(tmp_path):
    """100,000 secrets, most never rotating: the runner's two questions are answered
    by a search of the rotation index (the plan says so) and answered right."""
    path = tmp_path / "big.db"
    SqliteStore.create(path).close()
    with closing(sqlite3.connect(path)) as connection:
        rotation = {7: _rotation(Enabled=True, NextRotationDate=500.0),
                    70_000: _rotation(Enabled=True, NextRotationDate=100.0),
                    99_999: _rotation(Enabled=True, NextRotationDate=50.0, Pending={
                        "Token": "t", "Step": None, "RetryAt": 300.0}),
                    12: _rotation(Enabled=False),
                    13: _rotation(Enabled=True, NextRotationDate=10.0)}
        connection.executemany(
            "INSERT INTO secrets (id, name, path, arn, created, changed, rotation, deleted)"
            " VALUES (?, ?, ?, ?, 0, 0, ?, ?)",
            ((n, f"s{n}", f"s{n}", f"arn:{n}", rotation.get(n), 1.0 if n == 13 else None)
             for n in range(1, 100_001)))
        connection.commit()
        for query in (
                f"SELECT id FROM secrets WHERE {sqlite_store._ROTATING} AND"
                f" {sqlite_store._ROTATION_DUE} <= 1 ORDER BY {sqlite_store._ROTATION_DUE}",
                f"SELECT {sqlite_store._ROTATION_DUE} AS due FROM secrets WHERE"
                f" {sqlite_store._ROTATING} AND due >= 0 ORDER BY due LIMIT 1"):
            plan = " ".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + query))
            assert plan.startswith("SEARCH secrets USING INDEX secrets_by_rotation_due"), plan
    store = SqliteStore(path)
    with store.read() as reader:
        # The deleted secret (13) and the disabled one (12) are never due.
        assert reader.next_rotation_due() == 100.0
        assert reader.rotations_due(99.0) == []
        assert reader.rotations_due(300.0) == [70_000, 99_999]  # earliest first
        assert reader.rotations_due(1e9) == [70_000, 99_999, 7]
    store.close()


def test_wal_mode_and_owner_only_files(env, call):
    call("CreateSecret", Name="s", SecretString="v")
    with closing(db(env)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for name in ("secrets.db", "secrets.db-wal", "secrets.db-shm"):
        path = env.root / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_a_newer_schema_is_refused(env):
    env.service.store.close()
    with closing(db(env)) as connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                           (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SqliteStore(env.db_path)


def test_a_file_without_the_schema_is_refused(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreError, match="no secretfs schema"):
        SqliteStore(empty)


def test_a_file_that_is_not_sqlite_is_refused_with_store_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, " * 256)
    with pytest.raises(StoreError):
        SqliteStore(junk)


def test_create_refuses_an_existing_file(env):
    with pytest.raises(FileExistsError):
        SqliteStore.create(env.db_path)


# --- invariant 1: no plaintext and no data key on disk ---------------------------------


def test_no_plaintext_value_or_data_key_reaches_any_file(env, call, monkeypatch):
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

    def assert_clean(stage: str) -> None:
        on_disk = files(env)
        on_disk["keys.json"] = env.key_path.read_bytes()
        for name, content in on_disk.items():
            for value in values:
                assert value not in content, (stage, name)
                assert base64.b64encode(value) not in content, (stage, name)
            for key in data_keys:
                for form in (key, key.hex().encode(), base64.b64encode(key)):
                    assert form not in content, (stage, name)

    assert env.db_path.with_name("secrets.db-wal").stat().st_size > 0
    assert_clean("in the WAL")
    # Positive control: the ciphertext itself is on disk, so the search would find a value.
    ciphertext = version_row(env, "app/0", call(
        "DescribeSecret", SecretId="app/0")["VersionIdsToStages"].popitem()[0])[0]
    assert any(ciphertext in content for content in files(env).values())
    checkpoint(env)
    assert_clean("after checkpoint")
    assert ciphertext in files(env)["secrets.db"]


def test_deleted_ciphertext_is_wiped_from_the_file(env, call):
    created = call("CreateSecret", Name="gone", SecretString="v" * 200)
    ciphertext = version_row(env, "gone", created["VersionId"])[0]
    checkpoint(env)
    assert ciphertext in files(env)["secrets.db"]
    call("DeleteSecret", SecretId="gone", ForceDeleteWithoutRecovery=True)
    checkpoint(env)
    assert all(ciphertext not in content for content in files(env).values())


def test_force_delete_leaves_no_rows(env, call):
    call("CreateSecret", Name="s", SecretString="v", Tags=[{"Key": "k", "Value": "v"}])
    call("PutSecretValue", SecretId="s", SecretString="w", VersionStages=["blue"])
    with closing(db(env)) as connection:
        (secret_id,) = connection.execute("SELECT id FROM secrets WHERE name = 's'").fetchone()
    call("DeleteSecret", SecretId="s", ForceDeleteWithoutRecovery=True)
    with closing(db(env)) as connection:
        for table in ("versions", "labels", "tags"):
            assert connection.execute(
                f"SELECT count(*) FROM {table} WHERE secret_id = ?", (secret_id,)
            ).fetchone() == (0,), table
        assert connection.execute("SELECT count(*) FROM secrets").fetchone() == (0,)
    # ids are never reused: an inode keyed by id can't alias a recreated secret
    call("CreateSecret", Name="s", SecretString="again")
    with closing(db(env)) as connection:
        (new_id,) = connection.execute("SELECT id FROM secrets WHERE name = 's'").fetchone()
    assert new_id > secret_id


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


def test_ciphertext_swapped_between_versions_fails(env, call, two_secrets):
    a1, a2, _ = two_secrets
    row1, row2 = version_row(env, "a", a1), version_row(env, "a", a2)
    set_version_row(env, "a", a1, row2)
    set_version_row(env, "a", a2, row1)
    for version_id in (a1, a2):
        with pytest.raises(DecryptionFailure) as failure:
            call("GetSecretValue", SecretId="a", VersionId=version_id)
        assert "a-one" not in str(failure.value) and "a-two" not in str(failure.value)
    assert call("GetSecretValue", SecretId="b")["SecretString"] == "b-one"
    assert_bystanders_read(call)
    set_version_row(env, "a", a1, row1)
    set_version_row(env, "a", a2, row2)
    assert call("GetSecretValue", SecretId="a", VersionId=a1)["SecretString"] == "a-one"


def test_ciphertext_moved_to_another_secret_fails(env, call, two_secrets):
    _, a2, b1 = two_secrets
    set_version_row(env, "b", b1, version_row(env, "a", a2))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="b")
    got = call("BatchGetSecretValue", SecretIdList=["a", "b", "bystander"])
    assert [v["Name"] for v in got["SecretValues"]] == ["a", "bystander"]
    assert [(e["SecretId"], e["ErrorCode"]) for e in got["Errors"]] == [("b", "DecryptionFailure")]


def test_ciphertext_alone_swapped_fails(env, call, two_secrets):
    a1, a2, _ = two_secrets
    ciphertext2 = version_row(env, "a", a2)[0]
    _, wrapped1, key1 = version_row(env, "a", a1)
    set_version_row(env, "a", a1, (ciphertext2, wrapped1, key1))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    assert call("GetSecretValue", SecretId="a")["SecretString"] == "a-two"


@pytest.mark.parametrize("column", ["ciphertext", "wrapped_key"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_fails(env, call, two_secrets, column, where):
    a1, _, _ = two_secrets
    original = version_row(env, "a", a1)
    data = original[0 if column == "ciphertext" else 1]
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    tampered = list(original)
    tampered[0 if column == "ciphertext" else 1] = flipped(data, index)
    set_version_row(env, "a", a1, tuple(tampered))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    assert call("GetSecretValue", SecretId="a")["SecretString"] == "a-two"
    assert_bystanders_read(call)
    set_version_row(env, "a", a1, original)  # the flip alone was the fault
    assert call("GetSecretValue", SecretId="a", VersionId=a1)["SecretString"] == "a-one"


def test_truncated_ciphertext_and_other_key_fail(env, call, two_secrets):
    a1, _, _ = two_secrets
    ciphertext, wrapped, key_id = version_row(env, "a", a1)
    set_version_row(env, "a", a1, (ciphertext[:20], wrapped, key_id))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)
    other = call("CreateKey", Alias="alias/other")["KeyId"]
    set_version_row(env, "a", a1, (ciphertext, wrapped, other))
    with pytest.raises(DecryptionFailure):
        call("GetSecretValue", SecretId="a", VersionId=a1)


def test_is_binary_flag_flipped_fails_cleanly(env, call):
    created = call("CreateSecret", Name="bin", SecretBinary=b"\xff\xfe\x00binary")
    with closing(db(env)) as connection:
        connection.execute("UPDATE versions SET is_binary = 0 WHERE version_id = ?",
                           (created["VersionId"],))
    with pytest.raises(SecretsManagerError):
        call("GetSecretValue", SecretId="bin")


# --- transactions -------------------------------------------------------------------------


def test_a_raised_error_rolls_the_transaction_back(env):
    store = env.service.store
    before = dump(env)
    with pytest.raises(RuntimeError), store.write() as writer:
        secret_id = writer.insert_secret(name="x", path="x", arn="arn:x", description=None,
                                         kms_key_id=None, created=env.clock.now)
        writer.set_tags(secret_id, [("k", "v")])
        raise RuntimeError("halfway")
    assert dump(env) == before


def test_a_database_error_rolls_back_and_becomes_store_error(env, call):
    call("CreateSecret", Name="taken", SecretString="v")
    store = env.service.store
    before = dump(env)
    with pytest.raises(StoreError), store.write() as writer:
        writer.insert_secret(name="fresh", path="fresh", arn="arn:fresh", description=None,
                             kms_key_id=None, created=env.clock.now)
        writer.insert_secret(name="taken", path="taken2", arn="arn:taken2", description=None,
                             kms_key_id=None, created=env.clock.now)
    assert dump(env) == before
    with store.write() as writer:  # the connection is usable again
        writer.update_secret(writer.find(name="taken"), description="ok")
    with store.read() as reader:
        assert reader.load(reader.find(name="taken")).description == "ok"
        assert reader.find(name="fresh") is None


def test_a_request_failing_midway_leaves_nothing(env, call, monkeypatch):
    call("CreateSecret", Name="s", SecretString="v")
    before = dump(env)

    def broken_set_tags(self, secret_id, tags):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Writer, "set_tags", broken_set_tags)
    with pytest.raises(ServiceUnavailable) as failure:
        call("CreateSecret", Name="new", SecretString="secret-value")
    assert failure.value.code == "InternalServiceError"
    assert "secret-value" not in str(failure.value)
    assert dump(env) == before
    monkeypatch.undo()
    with pytest.raises(SecretsManagerError):
        call("DescribeSecret", SecretId="new")
    call("CreateSecret", Name="new", SecretString="v")  # the catalog holds no ghost


def test_a_locked_store_refuses_writes_cleanly(env, call):
    call("CreateSecret", Name="s", SecretString="v")
    with env.service.store.read() as reader:
        reader.db.execute("PRAGMA busy_timeout = 50")
    before = dump(env)
    snapshot = env.snapshot("s")
    with closing(db(env)) as locker:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(ServiceUnavailable):
            call("PutSecretValue", SecretId="s", SecretString="w")
        with pytest.raises(ServiceUnavailable):
            call("CreateSecret", Name="other", SecretString="w")
        locker.execute("ROLLBACK")
    assert dump(env) == before
    assert env.snapshot("s") == snapshot
    call("PutSecretValue", SecretId="s", SecretString="w")
    assert call("GetSecretValue", SecretId="s")["SecretString"] == "w"
