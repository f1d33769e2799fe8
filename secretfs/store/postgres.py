"""The PostgreSQL store: one database shared by every host of a fleet.

Selected by a URL, `postgresql://USER@HOST[:PORT]/DBNAME[?PARAM=VALUE…]` (libpq's own
URL, so every libpq parameter works: `sslmode`, `passfile`, several hosts for a
failover pair, `options=-csearch_path%3Dsecretfs` for a schema of its own). The
password never sits in the URL secretfs records: `secretfs init` moves it to the
state directory's `pgpass` (0600, libpq's password file format) and records the URL
with `passfile=` instead; without one, libpq finds it as usual (PGPASSFILE,
~/.pgpass, PGPASSWORD) or uses a client certificate.

Same schema semantics as sqlite.py, in PostgreSQL's types (dates are epoch seconds
as double precision, values bytea); a store is created at schema version 1 and
walks the same migrations. The queries are sqlite.py's: its Reader and Writer run
here unchanged on a thin facade (`?` placeholders, `lastrowid`), so keep their SQL
portable, or override the method here; the store tests run on both backends. Only
the rotation-due index differs (JSON operators), and `versions.rowid` is a column
here, an identity that keeps sqlite's insertion order among versions created in the
same instant. Text that is sorted or compared as a range (names, paths, ARNs) is
`COLLATE "C"`: byte order, as SQLite's, whatever the database's locale.

Isolation. Every `write()` is one READ COMMITTED transaction that first takes one
transaction-scoped advisory lock (`pg_advisory_xact_lock`): writers from every host
serialize exactly as SQLite's `BEGIN IMMEDIATE` serializes them on one host, and the
service's check-then-write rules keep holding under races. That includes rules no
row lock covers: a name's directory against every other secret's, a custom label
against the secrets below its directory, the label rules ("a label is on one
version", AWSPREVIOUS follows AWSCURRENT) that `_mutate` checks on a fresh load inside
the transaction. SERIALIZABLE would detect those races too, but only by failing a
transaction that then has to be replayed whole, and `store.write()` is a context
manager whose body can't be replayed; a row lock per secret would miss the rules
across secrets. Secrets Manager writes are rare and short (a few round trips), so one
writer at a time costs little; the lock is released at commit, rollback, or when the
connection dies, and waiting for it is bounded (`write_wait`, then StoreError).
Readers never wait: a single-statement read sees the latest commit, and `load()`
reads its four tables in one REPEATABLE READ snapshot.

Connections: a small pool; a thread keeps the connection it took for the whole
`read()` or `write()`, so a read nested in a write sees the write's transaction, as
with SQLite's per-thread connection. Every call blocks, as SQLite's do: the daemon
makes them from worker threads (trio.to_thread), never on the trio loop. A pooled
connection the server dropped (a restart, a failover) is retried once at the start of
a write; a read fails with StoreError and the next one connects afresh.

Values arrive here already encrypted: this module never sees plaintext. Unlike
SQLite's secure_delete, PostgreSQL leaves a deleted version's ciphertext in its data
files until VACUUM reuses the space, and in its WAL and backups: ciphertext only.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import SplitResult, quote, unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from secretfs.files import write_new_file
from secretfs.store import StoreError
from secretfs.store import sqlite as portable
from secretfs.store.sqlite import SCHEMA_VERSION

SCHEMES = ("postgresql", "postgres")
# How long a write waits for another host's write to finish before it fails.
WRITE_WAIT = 10.0
# Connections kept open between calls; a burst beyond it opens (and closes) more.
IDLE_CONNECTIONS = 8
# The advisory lock every write transaction holds ("secretfs" in ASCII). Advisory
# locks are per database: stores in two databases of one server never contend.
WRITE_LOCK = 0x7365637265746673

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE secrets (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    path TEXT COLLATE "C" NOT NULL UNIQUE,
    arn TEXT COLLATE "C" NOT NULL UNIQUE,
    description TEXT,
    kms_key_id TEXT,
    created DOUBLE PRECISION NOT NULL,
    changed DOUBLE PRECISION NOT NULL,
    accessed DOUBLE PRECISION,
    deleted DOUBLE PRECISION,
    rotation TEXT
);
CREATE TABLE tags (
    secret_id BIGINT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (secret_id, key)
);
CREATE TABLE versions (
    secret_id BIGINT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version_id TEXT COLLATE "C" NOT NULL,
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    created DOUBLE PRECISION NOT NULL,
    is_binary INTEGER NOT NULL,
    ciphertext BYTEA,
    wrapped_key BYTEA,
    key_id TEXT,
    accessed DOUBLE PRECISION,
    PRIMARY KEY (secret_id, version_id)
);
CREATE TABLE labels (
    secret_id BIGINT NOT NULL,
    label TEXT COLLATE "C" NOT NULL,
    version_id TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (secret_id, label),
    FOREIGN KEY (secret_id, version_id)
        REFERENCES versions(secret_id, version_id) ON DELETE CASCADE
);
CREATE INDEX secrets_by_created ON secrets(created, id);
CREATE INDEX secrets_by_deleted ON secrets(deleted) WHERE deleted IS NOT NULL;
"""

# sqlite.py's _ROTATION_DUE in PostgreSQL's JSON operators: json_extract gives SQL
# NULL for a JSON null, hence the nullif.
_ROTATION_DUE = (
    "(CASE WHEN nullif(rotation::jsonb -> 'Pending', 'null') IS NOT NULL"
    " THEN coalesce((rotation::jsonb #>> '{Pending,RetryAt}')::float8, 0)"
    " WHEN (rotation::jsonb ->> 'Enabled')::boolean"
    " THEN (rotation::jsonb ->> 'NextRotationDate')::float8 END)")
_ROTATING = portable._ROTATING
DUE_QUERY = (f"SELECT id FROM secrets WHERE {_ROTATING} AND {_ROTATION_DUE} <= ?"
             f" ORDER BY {_ROTATION_DUE}")
NEXT_DUE_QUERY = (f"SELECT {_ROTATION_DUE} FROM secrets WHERE {_ROTATING}"
                  f" AND {_ROTATION_DUE} >= 0 ORDER BY {_ROTATION_DUE} LIMIT 1")

# sqlite.py's migrations, in PostgreSQL's types.
_MIGRATIONS = {
    2: """
ALTER TABLE secrets ADD COLUMN policy TEXT;
CREATE TABLE identity_policies (
    principal TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    document TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (principal, name)
);
""",
    3: f"CREATE INDEX secrets_by_rotation_due ON secrets (({_ROTATION_DUE})) WHERE {_ROTATING}",
    4: """
CREATE TABLE access_keys (
    access_key_id TEXT COLLATE "C" PRIMARY KEY,
    principal TEXT COLLATE "C" NOT NULL,
    ciphertext BYTEA NOT NULL,
    wrapped_key BYTEA NOT NULL,
    key_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
""",
}

# What an operator can do about a server's refusal, by SQLSTATE.
_HINTS = {
    "25006": "the server takes no writes: a standby, or default_transaction_read_only",
    "53100": "the database server's disk is full",
    "53300": "the database server has no free connection slot",
    "55P03": "another host's write held the store's write lock too long",
}


# --- the URL and its password ----------------------------------------------------------

def split_password(url: str) -> tuple[str, str | None]:
    """The URL without its password (from `user:password@` or `?password=`), and that
    password. The rest of the URL is kept as written."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    password = None
    if at and ":" in userinfo:
        userinfo, _, encoded = userinfo.partition(":")
        password = unquote(encoded)
    kept = []
    for item in parts.query.split("&") if parts.query else ():
        name, _, value = item.partition("=")
        if unquote(name) == "password":
            password = unquote(value)
        else:
            kept.append(item)
    netloc = f"{userinfo}@{hosts}" if at else hosts
    return _unsplit(parts._replace(netloc=netloc, query="&".join(kept))), password


def _unsplit(parts: SplitResult) -> str:
    # urlunsplit would drop the // of a URL without a host (postgresql:///db?host=/run/…).
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    return url + (f"?{parts.query}" if parts.query else "") + (
        f"#{parts.fragment}" if parts.fragment else "")


def redacted(url: str) -> str:
    """The URL as messages may show it."""
    return split_password(url)[0]


def record_password(url: str, password_file: Path) -> tuple[str, bool]:
    """The URL to record for a store: with a password (in the URL, else in PGPASSWORD),
    the password goes to `password_file` (0600, in libpq's format) and the URL names
    that file as its `passfile`. Returns that URL and whether the file was written."""
    url, password = split_password(url)
    password = password if password is not None else os.environ.get("PGPASSWORD")
    if not password:
        return url, False
    if any(character in password for character in "\r\n"):
        raise StoreError("a password with a line break can't go in a libpq password file")
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    # The file serves this one URL, so any host, port, database and user may use it:
    # a failover URL names several hosts.
    write_new_file(password_file, f"*:*:*:*:{escaped}\n".encode())
    parts = urlsplit(url)
    query = [item for item in parts.query.split("&")
             if item and unquote(item.partition("=")[0]) != "passfile"]
    query.append("passfile=" + quote(str(password_file), safe="/"))
    return _unsplit(parts._replace(query="&".join(query))), True


def _conninfo(url: str) -> str:
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's message may quote any part of the URL, the password too.
        raise StoreError(f"libpq can't parse the store URL {redacted(url)}") from None
    params.setdefault("application_name", "secretfs")
    params.setdefault("connect_timeout", "10")
    return make_conninfo(**params)


# --- a psycopg connection behind sqlite3's calls -----------------------------------------

@functools.lru_cache(maxsize=512)
def _portable(query: str) -> str:
    """sqlite3's placeholders in psycopg's (no query here holds a literal `?`)."""
    return query.replace("%", "%%").replace("?", "%s")


class _Cursor(psycopg.Cursor):
    @property
    def lastrowid(self) -> int:
        """sqlite3's: the id the INSERT just drew (this session's last sequence value)."""
        return self.connection.execute("SELECT lastval()").fetchone()[0]


class _Sql:
    """The sqlite3 calls sqlite.py's Reader and Writer make, on one psycopg connection."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, query: str, params: tuple = ()) -> psycopg.Cursor:
        return self.raw.execute(_portable(query), tuple(params))

    def executemany(self, query: str, rows) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(_portable(query), rows)
        return cursor


def _reason(error: psycopg.Error) -> str:
    """The server's or libpq's message on one line, and what it means when known."""
    message = " ".join(str(error).split())
    hint = _HINTS.get(getattr(error, "sqlstate", None) or "")
    return f"{message} ({hint})" if hint else message


def _rollback(raw: psycopg.Connection) -> None:
    if raw.closed or raw.info.transaction_status not in (
            TransactionStatus.INTRANS, TransactionStatus.INERROR):
        return
    try:
        raw.execute("ROLLBACK")
    except psycopg.Error:
        raw.close()


def _schema_version(db: _Sql) -> int | None:
    if db.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
        return None
    found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(found[0]) if found else None


# --- queries -----------------------------------------------------------------------------

class Reader(portable.Reader):
    """sqlite.py's queries; `load()` in one snapshot, the rotation index in jsonb."""

    def load(self, secret_id: int):
        raw = self.db.raw
        if raw.info.transaction_status != TransactionStatus.IDLE:
            return super().load(secret_id)  # inside write(): the lock keeps it consistent
        raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            found = super().load(secret_id)
        except BaseException:
            _rollback(raw)
            raise
        raw.execute("COMMIT")
        return found

    def rotations_due(self, now: float) -> list[int]:
        return [row[0] for row in self.db.execute(DUE_QUERY, (now,))]

    def next_rotation_due(self) -> float | None:
        found = self.db.execute(NEXT_DUE_QUERY).fetchone()
        return found[0] if found else None


class Writer(portable.Writer, Reader):
    """sqlite.py's mutations; only ever used inside one `store.write()` transaction."""


# --- the store ---------------------------------------------------------------------------

class PostgresStore:
    """The store in one PostgreSQL database, shared by every host that names it."""

    def __init__(self, url: str, *, write_wait: float = WRITE_WAIT):
        self.url = url
        self.where = redacted(url)
        self.write_wait = write_wait
        self._conninfo = _conninfo(url)
        self._local = threading.local()
        self._pool_lock = threading.Lock()
        self._idle: list[_Sql] = []
        self._closed = False
        try:
            with self.read() as reader:
                version = _schema_version(reader.db)
            if version is None:
                raise StoreError(f"{self.where} has no secretfs schema (run 'secretfs init')")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.where} has schema version {version}; this secretfs knows up to "
                    f"{SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:
                self._migrate()
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, url: str) -> PostgresStore:
        """Lay schema version 1 into a database that holds no secretfs store yet, then
        open it (which migrates it, as every older store is)."""
        where = redacted(url)
        db = _connect(_conninfo(url), where)
        try:
            if db.execute("SHOW server_encoding").fetchone()[0] != "UTF8":
                raise StoreError(f"{where} is not a UTF8 database")
            _begin_write(db, WRITE_WAIT)
            if _schema_version(db) is not None:
                raise StoreError(f"{where} already holds a secretfs store")
            db.raw.execute(_SCHEMA)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
            db.raw.execute("COMMIT")
        except psycopg.Error as error:
            raise StoreError(f"can't create the store in {where}: {_reason(error)}") from None
        finally:
            _rollback(db.raw)
            db.raw.close()
        return cls(url)

    def _migrate(self) -> None:
        try:
            with self.write() as writer:
                # Read again under the write lock: another host may have upgraded it.
                version = _schema_version(writer.db)
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    writer.db.raw.execute(_MIGRATIONS[target])
                writer.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                  (str(SCHEMA_VERSION),))
        except StoreError as error:
            raise StoreError(f"can't upgrade {self.where} to schema {SCHEMA_VERSION}: "
                             f"{error}") from None

    # --- connections -------------------------------------------------------------------

    def _checkout(self) -> tuple[_Sql, bool]:
        """A connection, and whether it comes from the pool (the server may have
        dropped it since)."""
        with self._pool_lock:
            if self._idle:
                return self._idle.pop(), True
        return _connect(self._conninfo, self.where), False

    def _checkin(self, db: _Sql) -> None:
        raw = db.raw
        _rollback(raw)
        if raw.closed or raw.broken:
            raw.close()
            self._drop_idle()  # most likely the server dropped them all
            return
        with self._pool_lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(db)
                return
        raw.close()

    def _drop_idle(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for db in idle:
            db.raw.close()

    @contextmanager
    def _connection(self, *, writing: bool = False) -> Iterator[_Sql]:
        """This thread's connection for one read() or write(); a write's transaction
        begun, holding the write lock."""
        held = getattr(self._local, "db", None)
        if held is not None:
            if writing:
                if held.raw.info.transaction_status != TransactionStatus.IDLE:
                    raise RuntimeError("store.write() inside store.write()")
                self._begin(held)
            yield held
            return
        db, pooled = self._checkout()
        try:
            if writing:
                try:
                    _begin_write(db, self.write_wait)
                except psycopg.Error as error:
                    if not (pooled and db.raw.broken):
                        raise StoreError(
                            f"the store can't start a write: {_reason(error)}") from None
                    # A connection the server dropped while pooled: once more, anew.
                    db.raw.close()
                    self._drop_idle()
                    db = _connect(self._conninfo, self.where)
                    self._begin(db)
            self._local.db = db
            yield db
        finally:
            self._local.db = None
            self._checkin(db)

    def _begin(self, db: _Sql) -> None:
        try:
            _begin_write(db, self.write_wait)
        except psycopg.Error as error:
            raise StoreError(f"the store can't start a write: {_reason(error)}") from None

    # --- the interface -----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Reader]:
        with self._connection() as db:
            try:
                yield Reader(db)
            except psycopg.Error as error:
                raise StoreError(f"the store can't complete the read: {_reason(error)}") \
                    from None

    @contextmanager
    def write(self) -> Iterator[Writer]:
        with self._connection(writing=True) as db:
            try:
                yield Writer(db)
            except psycopg.Error as error:
                _rollback(db.raw)
                raise StoreError(
                    f"the store can't complete the write: {_reason(error)}") from None
            except BaseException:
                _rollback(db.raw)
                raise
            try:
                db.raw.execute("COMMIT")
            except psycopg.Error as error:
                lost = db.raw.broken
                _rollback(db.raw)
                raise StoreError(
                    f"the store can't commit: {_reason(error)}"
                    + (" (the connection was lost during COMMIT: the write may or may not "
                       "have been applied)" if lost else "")) from None

    def close(self) -> None:
        """Close the pooled connections; connections in use close when returned."""
        with self._pool_lock:
            self._closed = True
        self._drop_idle()


def _connect(conninfo: str, where: str) -> _Sql:
    try:
        raw = psycopg.connect(conninfo, autocommit=True, cursor_factory=_Cursor)
    except psycopg.Error as error:
        raise StoreError(f"can't connect to the store at {where}: {_reason(error)}") from None
    return _Sql(raw)


def _begin_write(db: _Sql, wait: float) -> None:
    """BEGIN, bound the wait for the write lock, take it: one round trip."""
    milliseconds = max(1, int(wait * 1000))
    db.raw.execute(
        f"BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {milliseconds};"
        f" SELECT pg_advisory_xact_lock({WRITE_LOCK})", prepare=False)
