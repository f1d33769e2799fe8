"""The embedded SQLite store.

Schema (version 4), dates are epoch seconds (UTC) as REAL:

    meta      (key PRIMARY KEY, value)            -- schema_version, created
    secrets   (id PRIMARY KEY AUTOINCREMENT,       -- ids are never reused, so an
               name UNIQUE, path UNIQUE,           -- inode keyed by id can't alias
               arn UNIQUE, description,            -- a recreated secret
               kms_key_id, created, changed,
               accessed, deleted, rotation JSON,
               policy JSON)                        -- the resource policy (schema 2)
    tags      (secret_id, position, key, value)
    versions  (secret_id, version_id, created, is_binary,
               ciphertext, wrapped_key, key_id, accessed)
    labels    (secret_id, label, version_id)      -- a label is on at most one version
    identity_policies (principal, name, document, created)       -- schema 2
    secrets_by_rotation_due: an index on when each rotation is due   -- schema 3
    access_keys (access_key_id, principal, ciphertext, wrapped_key,  -- schema 4
                 key_id, created)

`path` is the secret's directory below the mountpoint (its name's segments
without empty ones); it is unique so two names never share a directory.

WAL mode; every mutation is one `BEGIN IMMEDIATE` transaction. Each thread gets
its own connection, so readers never wait for a writer's commit. Values arrive
here already encrypted: this module never sees plaintext.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from secretfs.model import Secret, Version
from secretfs.store import SealedValue, SecretRow, StoreError

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE secrets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    arn TEXT NOT NULL UNIQUE,
    description TEXT,
    kms_key_id TEXT,
    created REAL NOT NULL,
    changed REAL NOT NULL,
    accessed REAL,
    deleted REAL,
    rotation TEXT
);
CREATE TABLE tags (
    secret_id INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (secret_id, key)
);
CREATE TABLE versions (
    secret_id INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version_id TEXT NOT NULL,
    created REAL NOT NULL,
    is_binary INTEGER NOT NULL,
    ciphertext BLOB,
    wrapped_key BLOB,
    key_id TEXT,
    accessed REAL,
    PRIMARY KEY (secret_id, version_id)
);
CREATE TABLE labels (
    secret_id INTEGER NOT NULL,
    label TEXT NOT NULL,
    version_id TEXT NOT NULL,
    PRIMARY KEY (secret_id, label),
    FOREIGN KEY (secret_id, version_id)
        REFERENCES versions(secret_id, version_id) ON DELETE CASCADE
);
CREATE INDEX secrets_by_created ON secrets(created, id);
CREATE INDEX secrets_by_deleted ON secrets(deleted) WHERE deleted IS NOT NULL;
"""

# When a secret's rotation is next due: its scheduled date, or at once (or at its
# retry time) while a rotation is open; NULL when it doesn't rotate. The index on
# it (schema 3) covers only live secrets with a rotation configured.
_ROTATION_DUE = (
    "(CASE WHEN json_extract(rotation, '$.Pending') IS NOT NULL"
    " THEN coalesce(json_extract(rotation, '$.Pending.RetryAt'), 0)"
    " WHEN json_extract(rotation, '$.Enabled')"
    " THEN json_extract(rotation, '$.NextRotationDate') END)")
_ROTATING = "deleted IS NULL AND rotation IS NOT NULL"

# Each entry upgrades the schema from the version before it; a new store is
# created at version 1 and walks the same path, so every migration is exercised.
_MIGRATIONS = {
    # Access policies: a resource policy per secret, identity policies per principal.
    2: """
ALTER TABLE secrets ADD COLUMN policy TEXT;
CREATE TABLE identity_policies (
    principal TEXT NOT NULL,
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (principal, name)
);
""",
    # The rotation runner's "what is due next" without a walk over every secret.
    3: f"CREATE INDEX secrets_by_rotation_due ON secrets{_ROTATION_DUE} WHERE {_ROTATING}",
    # Access keys for the network endpoint: the secret half sealed like a value.
    4: """
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    ciphertext BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    key_id TEXT NOT NULL,
    created REAL NOT NULL
);
""",
}

# GCM adds a 12-byte nonce and a 16-byte tag to the plaintext.
_SEAL_OVERHEAD = 28


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would commit the open transaction; run statements one by one.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


class Reader:
    """Queries over one connection; inside `write()` they see the transaction."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def meta(self, key: str) -> str | None:
        """A store-wide setting (schema_version, region, account_id)."""
        found = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def rows(self) -> list[SecretRow]:
        return [SecretRow(*row) for row in self.db.execute(
            "SELECT id, name, path, arn, deleted FROM secrets")]

    def row(self, secret_id: int) -> SecretRow | None:
        found = self.db.execute(
            "SELECT id, name, path, arn, deleted FROM secrets WHERE id = ?",
            (secret_id,)).fetchone()
        return SecretRow(*found) if found else None

    def find(self, *, name: str | None = None, arn: str | None = None,
             path: str | None = None) -> int | None:
        column, value = (("name", name) if name is not None
                         else ("arn", arn) if arn is not None else ("path", path))
        found = self.db.execute(
            f"SELECT id FROM secrets WHERE {column} = ?", (value,)).fetchone()
        return found[0] if found else None

    def find_arn_prefix(self, partial_arn: str) -> list[int]:
        """Secrets whose ARN starts with a partial ARN (one without the random suffix)."""
        return [row[0] for row in self.db.execute(
            "SELECT id FROM secrets WHERE substr(arn, 1, ?) = ? AND length(arn) = ?",
            (len(partial_arn), partial_arn, len(partial_arn) + 7))]

    def paths_below(self, path: str) -> list[str]:
        """Paths of all secrets (live or scheduled for deletion) strictly below `path`."""
        # A range on the unique index over path: under SQLite's byte-wise ordering the
        # paths that start with "<path>/" are exactly those from "<path>/" up to
        # "<path>0" ('0' follows '/'), so this costs O(log n), not a scan per CreateSecret.
        return [row[0] for row in self.db.execute(
            "SELECT path FROM secrets WHERE path >= ? AND path < ?", (path + "/", path + "0"))]

    def load(self, secret_id: int) -> Secret | None:
        found = self.db.execute(
            "SELECT id, name, arn, path, description, kms_key_id, created, changed, accessed,"
            " deleted, rotation FROM secrets WHERE id = ?", (secret_id,)).fetchone()
        if found is None:
            return None
        (sid, name, arn, path, description, kms_key_id, created, changed, accessed,
         deleted, rotation) = found
        tags = tuple(self.db.execute(
            "SELECT key, value FROM tags WHERE secret_id = ? ORDER BY position", (sid,)))
        versions = {
            vid: Version(
                version_id=vid, created=_ts(vcreated),
                size=None if length is None else length - _SEAL_OVERHEAD,
                is_binary=bool(is_binary), key_id=key_id, last_accessed=_ts(vaccessed))
            for vid, vcreated, length, is_binary, key_id, vaccessed in self.db.execute(
                "SELECT version_id, created, length(ciphertext), is_binary, key_id, accessed"
                " FROM versions WHERE secret_id = ? ORDER BY created, rowid", (sid,))
        }
        labels = dict(self.db.execute(
            "SELECT label, version_id FROM labels WHERE secret_id = ?", (sid,)))
        return Secret(
            secret_id=sid, name=name, arn=arn, path=path, description=description,
            kms_key_id=kms_key_id, created=_ts(created), changed=_ts(changed),
            accessed=_ts(accessed), deleted=_ts(deleted),
            rotation=json.loads(rotation) if rotation else None,
            tags=tags, versions=versions, labels=labels)

    def sealed_value(self, secret_id: int, version_id: str) -> SealedValue | None:
        found = self.db.execute(
            "SELECT ciphertext, wrapped_key, key_id, is_binary FROM versions"
            " WHERE secret_id = ? AND version_id = ?", (secret_id, version_id)).fetchone()
        if found is None or found[0] is None:
            return None
        return SealedValue(bytes(found[0]), bytes(found[1]), found[2], bool(found[3]))

    _SORT_COLUMNS = {"created-date": "created", "last-changed-date": "changed",
                     "last-accessed-date": "coalesce(accessed, 0)", "name": "name"}

    def ids_sorted(self, *, sort_by: str, descending: bool, include_deleted: bool,
                   after: tuple[object, int] | None, limit: int) -> list[tuple[object, int]]:
        """A page of (sort value, id) ordered by (sort value, id), after a cursor."""
        column = self._SORT_COLUMNS[sort_by]
        order = "DESC" if descending else "ASC"
        clauses, args = [], []
        if not include_deleted:
            clauses.append("deleted IS NULL")
        if after is not None:
            clauses.append(f"({column}, id) {'<' if descending else '>'} (?, ?)")
            args.extend(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return [(row[0], row[1]) for row in self.db.execute(
            f"SELECT {column}, id FROM secrets {where} ORDER BY {column} {order}, id {order}"
            " LIMIT ?", (*args, limit))]

    def resource_policies(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT id, policy FROM secrets WHERE policy IS NOT NULL"))

    def resource_policy(self, secret_id: int) -> str | None:
        found = self.db.execute("SELECT policy FROM secrets WHERE id = ?", (secret_id,)).fetchone()
        return found[0] if found else None

    def identity_policies(self) -> dict[tuple[str, str], str]:
        return {(principal, name): document for principal, name, document in self.db.execute(
            "SELECT principal, name, document FROM identity_policies ORDER BY principal, name")}

    # Both queries walk the secrets_by_rotation_due index: the runner's wake-ups cost
    # the same with 100 secrets or 100,000, most of which never rotate.
    def rotations_due(self, now: float) -> list[int]:
        return [row[0] for row in self.db.execute(
            f"SELECT id FROM secrets WHERE {_ROTATING} AND {_ROTATION_DUE} <= ?"
            f" ORDER BY {_ROTATION_DUE}", (now,))]

    def next_rotation_due(self) -> float | None:
        found = self.db.execute(
            f"SELECT {_ROTATION_DUE} AS due FROM secrets WHERE {_ROTATING}"
            " AND due >= 0 ORDER BY due LIMIT 1").fetchone()
        return found[0] if found else None

    def access_keys(self) -> list[tuple[str, str, datetime]]:
        """(access key id, principal, created) of every access key."""
        return [(key_id, principal, _ts(created)) for key_id, principal, created in
                self.db.execute("SELECT access_key_id, principal, created FROM access_keys"
                                " ORDER BY principal, created")]

    def access_key(self, access_key_id: str) -> tuple[str, SealedValue] | None:
        """An access key's principal and its sealed secret half."""
        found = self.db.execute(
            "SELECT principal, ciphertext, wrapped_key, key_id FROM access_keys"
            " WHERE access_key_id = ?", (access_key_id,)).fetchone()
        if found is None:
            return None
        return found[0], SealedValue(bytes(found[1]), bytes(found[2]), found[3], False)

    # Both scan their table once (there is no index on key_id): they run at daemon start.
    # rowid is SQLite's own, and a column of postgres.py's versions table.
    def version_key_samples(self, per_key: int) -> list[tuple[str, str, str, bytes]]:
        """Wrapped data keys to try each master key on: (key id, secret ARN, version id,
        wrapped key) of the `per_key` versions last written under each key, newest first."""
        return [(key_id, arn, version_id, bytes(wrapped)) for key_id, arn, version_id, wrapped
                in self.db.execute(
                    "SELECT v.key_id, s.arn, v.version_id, v.wrapped_key FROM versions v"
                    " JOIN secrets s ON s.id = v.secret_id WHERE v.rowid IN"
                    " (SELECT r FROM (SELECT rowid AS r, row_number() OVER"
                    " (PARTITION BY key_id ORDER BY rowid DESC) AS n FROM versions"
                    " WHERE wrapped_key IS NOT NULL) AS ranked WHERE n <= ?)"
                    " ORDER BY v.key_id, v.rowid DESC", (per_key,))]

    def access_key_samples(self, per_key: int) -> list[tuple[str, str, bytes]]:
        """The same for access keys: (key id, access key id, wrapped key) of the
        `per_key` access keys last created under each master key, newest first."""
        return [(key_id, access_key_id, bytes(wrapped)) for key_id, access_key_id, wrapped, _
                in self.db.execute(
                    "SELECT key_id, access_key_id, wrapped_key, n FROM (SELECT key_id,"
                    " access_key_id, wrapped_key, row_number() OVER (PARTITION BY key_id"
                    " ORDER BY created DESC, access_key_id) AS n FROM access_keys) AS ranked"
                    " WHERE n <= ? ORDER BY key_id, n", (per_key,))]

    def expired(self, now: float) -> list[int]:
        return [row[0] for row in self.db.execute(
            "SELECT id FROM secrets WHERE deleted IS NOT NULL AND deleted <= ?", (now,))]

    def next_deletion(self) -> float | None:
        return self.db.execute("SELECT min(deleted) FROM secrets").fetchone()[0]

    # Re-encryption (secretfs/rekey.py) walks the wrapped data keys a page at a time in
    # primary-key order, so a walk that stops resumes where it was.
    def wrapped_versions(self, after: tuple[int, str] | None, limit: int
                         ) -> list[tuple[int, str, str, str | None, str, bytes]]:
        """(secret id, version id, secret ARN, the secret's KmsKeyId, key id, wrapped
        key) of the versions holding a value, after `after` in (secret id, version id)."""
        clause, args = ("AND (v.secret_id, v.version_id) > (?, ?)", after) if after \
            else ("", ())
        return [(*row[:5], bytes(row[5])) for row in self.db.execute(
            "SELECT v.secret_id, v.version_id, s.arn, s.kms_key_id, v.key_id, v.wrapped_key"
            " FROM versions v JOIN secrets s ON s.id = v.secret_id"
            f" WHERE v.wrapped_key IS NOT NULL {clause}"
            " ORDER BY v.secret_id, v.version_id LIMIT ?", (*args, limit))]

    def wrapped_access_keys(self, after: str | None, limit: int
                            ) -> list[tuple[str, str, bytes]]:
        """(access key id, key id, wrapped key) of the access keys after `after`."""
        return [(key_id, master, bytes(wrapped)) for key_id, master, wrapped in self.db.execute(
            "SELECT access_key_id, key_id, wrapped_key FROM access_keys"
            " WHERE access_key_id > ? ORDER BY access_key_id LIMIT ?", (after or "", limit))]

    def wrapped_key_count(self) -> int:
        """How many wrapped data keys the store holds (versions' and access keys')."""
        return self.db.execute(
            "SELECT (SELECT count(*) FROM versions WHERE wrapped_key IS NOT NULL)"
            " + (SELECT count(*) FROM access_keys)").fetchone()[0]


class Writer(Reader):
    """Mutations; only ever used inside one `store.write()` transaction."""

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    def insert_secret(self, *, name: str, path: str, arn: str, description: str | None,
                      kms_key_id: str | None, created: datetime) -> int:
        cursor = self.db.execute(
            "INSERT INTO secrets (name, path, arn, description, kms_key_id, created, changed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, path, arn, description, kms_key_id, _epoch(created), _epoch(created)))
        return cursor.lastrowid

    def update_secret(self, secret_id: int, **fields) -> None:
        columns = {"description", "kms_key_id", "changed", "accessed", "deleted", "rotation"}
        assert set(fields) <= columns, fields
        values = []
        for column, value in fields.items():
            if isinstance(value, datetime):
                value = _epoch(value)
            elif column == "rotation" and value is not None:
                value = json.dumps(value, sort_keys=True)
            values.append(value)
        assignments = ", ".join(f"{column} = ?" for column in fields)
        self.db.execute(f"UPDATE secrets SET {assignments} WHERE id = ?", (*values, secret_id))

    def set_tags(self, secret_id: int, tags: list[tuple[str, str]]) -> None:
        self.db.execute("DELETE FROM tags WHERE secret_id = ?", (secret_id,))
        self.db.executemany(
            "INSERT INTO tags (secret_id, position, key, value) VALUES (?, ?, ?, ?)",
            [(secret_id, position, key, value) for position, (key, value) in enumerate(tags)])

    def insert_version(self, secret_id: int, version_id: str, *, created: datetime,
                       sealed: SealedValue | None, is_binary: bool) -> None:
        self.db.execute(
            "INSERT INTO versions (secret_id, version_id, created, is_binary, ciphertext,"
            " wrapped_key, key_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (secret_id, version_id, _epoch(created), int(is_binary),
             sealed.ciphertext if sealed else None, sealed.wrapped_key if sealed else None,
             sealed.key_id if sealed else None))

    def fill_version(self, secret_id: int, version_id: str, sealed: SealedValue) -> None:
        self.db.execute(
            "UPDATE versions SET ciphertext = ?, wrapped_key = ?, key_id = ?, is_binary = ?"
            " WHERE secret_id = ? AND version_id = ?",
            (sealed.ciphertext, sealed.wrapped_key, sealed.key_id, int(sealed.is_binary),
             secret_id, version_id))

    def touch_version(self, secret_id: int, version_id: str, accessed: datetime) -> None:
        self.db.execute(
            "UPDATE versions SET accessed = ? WHERE secret_id = ? AND version_id = ?",
            (_epoch(accessed), secret_id, version_id))

    def delete_version(self, secret_id: int, version_id: str) -> None:
        self.db.execute(
            "DELETE FROM versions WHERE secret_id = ? AND version_id = ?",
            (secret_id, version_id))

    def set_label(self, secret_id: int, label: str, version_id: str) -> None:
        self.db.execute(
            "INSERT INTO labels (secret_id, label, version_id) VALUES (?, ?, ?)"
            " ON CONFLICT (secret_id, label) DO UPDATE SET version_id = excluded.version_id",
            (secret_id, label, version_id))

    def remove_label(self, secret_id: int, label: str) -> None:
        self.db.execute(
            "DELETE FROM labels WHERE secret_id = ? AND label = ?", (secret_id, label))

    def set_resource_policy(self, secret_id: int, document: str | None) -> None:
        self.db.execute("UPDATE secrets SET policy = ? WHERE id = ?", (document, secret_id))

    def put_identity_policy(self, principal: str, name: str, document: str,
                            created: datetime) -> None:
        self.db.execute(
            "INSERT INTO identity_policies (principal, name, document, created)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (principal, name) DO UPDATE SET"
            " document = excluded.document", (principal, name, document, _epoch(created)))

    def delete_identity_policy(self, principal: str, name: str) -> bool:
        return self.db.execute(
            "DELETE FROM identity_policies WHERE principal = ? AND name = ?",
            (principal, name)).rowcount > 0

    def put_access_key(self, access_key_id: str, principal: str, sealed: SealedValue,
                       created: datetime) -> None:
        self.db.execute(
            "INSERT INTO access_keys (access_key_id, principal, ciphertext, wrapped_key,"
            " key_id, created) VALUES (?, ?, ?, ?, ?, ?)",
            (access_key_id, principal, sealed.ciphertext, sealed.wrapped_key, sealed.key_id,
             _epoch(created)))

    def delete_access_key(self, access_key_id: str) -> bool:
        return self.db.execute("DELETE FROM access_keys WHERE access_key_id = ?",
                               (access_key_id,)).rowcount > 0

    # Compare-and-swap: a version deleted, or a key rewrapped by someone else since it
    # was read, is left alone (False).
    def rewrap_version(self, secret_id: int, version_id: str, old: bytes, wrapped: bytes,
                       key_id: str) -> bool:
        """Replace a version's wrapped data key, if it still is `old`."""
        return self.db.execute(
            "UPDATE versions SET wrapped_key = ?, key_id = ? WHERE secret_id = ?"
            " AND version_id = ? AND wrapped_key = ?",
            (wrapped, key_id, secret_id, version_id, old)).rowcount > 0

    def rewrap_access_key(self, access_key_id: str, old: bytes, wrapped: bytes,
                          key_id: str) -> bool:
        """Replace an access key's wrapped data key, if it still is `old`."""
        return self.db.execute(
            "UPDATE access_keys SET wrapped_key = ?, key_id = ? WHERE access_key_id = ?"
            " AND wrapped_key = ?", (wrapped, key_id, access_key_id, old)).rowcount > 0

    def delete_secret(self, secret_id: int) -> None:
        self.db.execute("DELETE FROM secrets WHERE id = ?", (secret_id,))


class SqliteStore:
    """The store on one SQLite file in WAL mode."""

    # One daemon owns the file: no other host acts on it behind this daemon's back.
    shared = False

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            with self._connection() as db:
                version = self._schema_version(db)
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a secretfs store: {error}") from None
        if version is None:
            raise StoreError(f"{self.path} has no secretfs schema (run 'secretfs init')")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this secretfs knows up to "
                f"{SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        with self._write_lock, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    _execute_script(db, _MIGRATIONS[target])
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                           (str(SCHEMA_VERSION),))
                db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback(db)
                raise StoreError(f"can't upgrade {self.path} from schema {version}: {error}") \
                    from None

    @classmethod
    def create(cls, path: Path) -> SqliteStore:
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} already exists")
        db = sqlite3.connect(path, isolation_level=None)
        try:
            path.chmod(0o600)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            _execute_script(db, _SCHEMA)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
            db.execute("COMMIT")
        finally:
            db.close()
        return cls(path)

    @staticmethod
    def _schema_version(db: sqlite3.Connection) -> int | None:
        try:
            found = db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError:
            return None
        return int(found[0]) if found else None

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA busy_timeout = 10000")
            # NORMAL in WAL mode: a commit survives a process crash; only an OS
            # crash may lose the last transactions, never corrupt the file.
            db.execute("PRAGMA synchronous = NORMAL")
            # Freed pages are zeroed so deleted ciphertext doesn't linger in the file.
            db.execute("PRAGMA secure_delete = ON")
            self._local.db = db
        yield db

    @contextmanager
    def read(self) -> Iterator[Reader]:
        with self._connection() as db:
            yield Reader(db)

    @contextmanager
    def write(self) -> Iterator[Writer]:
        with self._write_lock, self._connection() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise StoreError(f"the store can't start a write: {self._reason(error)}") \
                    from None
            try:
                yield Writer(db)
            except sqlite3.Error as error:
                self._rollback(db)
                raise StoreError(
                    f"the store can't complete the write: {self._reason(error)}") from None
            except BaseException:
                self._rollback(db)
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback(db)
                raise StoreError(f"the store can't commit: {self._reason(error)}") from None

    def _reason(self, error: sqlite3.Error) -> str:
        """SQLite's message, and why when the file system says: a file system that turned
        read-only under an open database (a disk error) is only a "disk I/O error" to
        SQLite. The probe sets the directory's times to what they are, and opens nothing
        on the database itself (closing a descriptor would drop SQLite's locks)."""
        directory = self.path.parent
        try:
            times = os.stat(directory)
            os.utime(directory, ns=(times.st_atime_ns, times.st_mtime_ns))
        except OSError as probe:
            if probe.errno == errno.EROFS:
                return f"{error} (the file system holding {directory} is read-only)"
        return str(error)

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        # After a disk-full or I/O error SQLite may already have rolled back.
        if db.in_transaction:
            db.execute("ROLLBACK")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @contextmanager
    def lease(self, secret_id: int) -> Iterator[bool]:
        """Always held. A lease elects one host among those sharing a store; a SQLite
        file has one daemon (it holds its state directory's lock, see daemon.py), which
        runs one rotation runner, so there is nobody to elect against."""
        yield True
