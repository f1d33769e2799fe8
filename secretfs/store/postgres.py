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

Leases. `lease(secret_id)` elects the one host that acts on a secret (the rotation
runner's): a session-level advisory lock held on a connection of its own, which the
server frees when its holder's connection ends, so a host that dies hands over at once
(see the section "leases").

Change notifications. Every host keeps what it serves in memory, so each commit is
announced by the database itself: triggers NOTIFY the channel `secretfs` with what
changed, and `listen()` gives a session that hears them (secretfs/fleet.py follows it;
see the section "change notifications").

Values arrive here already encrypted: this module never sees plaintext. Unlike
SQLite's secure_delete, PostgreSQL leaves a deleted version's ciphertext in its data
files until VACUUM reuses the space, and in its WAL and backups: ciphertext only.
"""

from __future__ import annotations

import functools
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple
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

    # Other hosts act on it too: a rotation one of them starts or leaves unfinished is
    # found by looking (the rotation runner polls a shared store).
    shared = True

    def __init__(self, url: str, *, write_wait: float = WRITE_WAIT):
        self.url = url
        self.where = redacted(url)
        self.write_wait = write_wait
        self._conninfo = _conninfo(url)
        self._local = threading.local()
        self._pool_lock = threading.Lock()
        self._idle: list[_Sql] = []
        self._closed = False
        # Tags this process's writes, so its own change notifications are told apart.
        self.origin = secrets.token_hex(8)
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
            _install_notifications(self)
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
                    _begin_write(db, self.write_wait, self.origin)
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
            _begin_write(db, self.write_wait, self.origin)
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

    def listen(self) -> ChangeListener:
        """A session of its own that hears every host's commits (see "change
        notifications" below). It is opened at start, or after the last one was lost,
        which the pool's idle connections most likely were too: they are dropped, so
        the reads that follow connect afresh rather than fail once."""
        self._drop_idle()
        return ChangeListener(self)

    def lease(self, secret_id: int) -> AbstractContextManager[bool]:
        """Whether this process holds the lease on one secret, until the block ends:
        while it does, every other host's lease on it is False (see "leases" below)."""
        return _lease(self, secret_id)


def _connect(conninfo: str, where: str) -> _Sql:
    try:
        raw = psycopg.connect(conninfo, autocommit=True, cursor_factory=_Cursor)
    except psycopg.Error as error:
        raise StoreError(f"can't connect to the store at {where}: {_reason(error)}") from None
    return _Sql(raw)


def _begin_write(db: _Sql, wait: float, origin: str | None = None) -> None:
    """BEGIN, bound the wait for the write lock, tag the transaction with its origin
    (see "change notifications"), take the lock: one round trip."""
    milliseconds = max(1, int(wait * 1000))
    tag = f" SET LOCAL {ORIGIN_SETTING} = '{origin}';" if origin else ""
    db.raw.execute(
        f"BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {milliseconds};"
        f"{tag} SELECT pg_advisory_xact_lock({WRITE_LOCK})", prepare=False)


# --- change notifications ----------------------------------------------------------------
#
# Each host serves from memory what it read from the store (catalog.py's snapshots, the
# parsed policies), so a commit must reach the other hosts. Triggers on the tables that
# memory comes from NOTIFY the channel `secretfs` with what a row change touched:
# `secret:<id>` (a secret's row, versions, labels or tags), `policies` (an identity
# policy, or a secret's resource policy) or `access-keys`. PostgreSQL delivers them at
# commit, in commit order, never for a rolled-back write, to every session that LISTENs,
# and folds a transaction's identical notifications into one: a promotion that rewrites
# a secret's row and several labels is heard once.
#
# Each payload ends in `@` and the writing process's origin, set (SET LOCAL) at the start
# of its every write, so a daemon skips its own commits: it refreshed after them already.
# A write by another tool (psql) has no origin, and every host hears it.
#
# The triggers are installed when a store is opened, once per NOTIFICATIONS version (the
# meta key `change_notifications`), under the write lock, so hosts starting together
# install them once. They are no schema migration: the schema version is SQLite's too,
# and a SQLite store has one host, no one to tell.

CHANNEL = "secretfs"
ORIGIN_SETTING = "secretfs.origin"
NOTIFICATIONS = 1
NOTIFICATIONS_KEY = "change_notifications"
_NOTIFYING_TABLES = ("secrets", "versions", "labels", "tags", "identity_policies",
                     "access_keys")
_NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION secretfs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    origin text := '@' || coalesce(current_setting('{ORIGIN_SETTING}', true), '');
    changed record;
BEGIN
    IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
    IF TG_TABLE_NAME = 'identity_policies' THEN
        PERFORM pg_notify('{CHANNEL}', 'policies' || origin);
    ELSIF TG_TABLE_NAME = 'access_keys' THEN
        PERFORM pg_notify('{CHANNEL}', 'access-keys' || origin);
    ELSIF TG_TABLE_NAME = 'secrets' THEN
        PERFORM pg_notify('{CHANNEL}', 'secret:' || changed.id || origin);
        IF TG_OP = 'UPDATE' THEN
            IF OLD.policy IS DISTINCT FROM NEW.policy THEN
                PERFORM pg_notify('{CHANNEL}', 'policies' || origin);
            END IF;
        ELSIF changed.policy IS NOT NULL THEN
            PERFORM pg_notify('{CHANNEL}', 'policies' || origin);
        END IF;
    ELSE
        PERFORM pg_notify('{CHANNEL}', 'secret:' || changed.secret_id || origin);
    END IF;
    RETURN NULL;
END $$
"""
# The listening session is idle between notifications: libpq's TCP keepalives find a
# server that vanished without a word (no FIN) in about idle + interval x count = 11 s,
# and tcp_user_timeout a ping that is never acknowledged in 10 s. The URL's own
# settings win; a Unix-socket connection ignores them.
_LISTENING_SETTINGS = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                       "keepalives_count": "3", "tcp_user_timeout": "10000"}


def _install_notifications(store: PostgresStore) -> None:
    """The triggers of this NOTIFICATIONS version, unless the store has them already."""
    with store.read() as reader:
        if reader.meta(NOTIFICATIONS_KEY) == str(NOTIFICATIONS):
            return
    try:
        with store.write() as writer:
            if writer.meta(NOTIFICATIONS_KEY) == str(NOTIFICATIONS):
                return  # another host installed them meanwhile
            writer.db.raw.execute(_NOTIFY_FUNCTION)
            for table in _NOTIFYING_TABLES:  # (CREATE OR REPLACE TRIGGER is 14's)
                writer.db.raw.execute(
                    f"DROP TRIGGER IF EXISTS secretfs_notify ON {table}; CREATE TRIGGER "
                    f"secretfs_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION secretfs_notify()")
            writer.set_meta(NOTIFICATIONS_KEY, str(NOTIFICATIONS))
    except StoreError as error:
        raise StoreError(f"can't install change notifications in {store.where}: "
                         f"{error}") from None


class Change(NamedTuple):
    """One notification: what changed ("secret", "policies" or "access-keys"), which
    secret, and the origin of the write that changed it ("" when unknown)."""

    kind: str
    secret_id: int | None
    origin: str


def parse_change(payload: str) -> Change | None:
    """A notification's payload; None for one this secretfs doesn't know (a newer
    host's), which a listener answers by reading everything again."""
    what, at, origin = payload.rpartition("@")
    kind, _, number = what.partition(":")
    if not at:
        return None
    if kind == "secret" and number.isdigit():
        return Change(kind, int(number), origin)
    if kind in ("policies", "access-keys") and what == kind:
        return Change(kind, None, origin)
    return None


class ChangeListener:
    """A session of its own that LISTENs to the store's channel: `changes()` waits for
    notifications, `ping()` proves the session, and so their delivery, still works.
    Its application_name (`<name>-feed-<origin>`) tells it apart in pg_stat_activity."""

    def __init__(self, store: PostgresStore):
        params = conninfo_to_dict(store._conninfo)
        for name, value in _LISTENING_SETTINGS.items():
            params.setdefault(name, value)
        self.application_name = f"{params.get('application_name', 'secretfs')}-feed-" \
                                f"{store.origin}"
        params["application_name"] = self.application_name
        self.where = store.where
        try:
            self.raw = psycopg.connect(make_conninfo(**params), autocommit=True)
        except psycopg.Error as error:
            raise StoreError(f"can't connect to the store at {self.where}: "
                             f"{_reason(error)}") from None
        try:
            self.raw.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as error:
            self.raw.close()
            raise StoreError(f"can't listen to the store at {self.where}: "
                             f"{_reason(error)}") from None

    def changes(self, timeout: float) -> list[Change | None]:
        """The notifications that arrive within `timeout` seconds: the first burst, at
        once (and any that came during a ping)."""
        try:
            found = list(self.raw.notifies(timeout=timeout, stop_after=1))
            if found:
                found += self.raw.notifies(timeout=0)
        except psycopg.Error as error:
            raise StoreError(f"the store's change notifications stopped: "
                             f"{_reason(error)}") from None
        return [parse_change(notify.payload) for notify in found if notify.channel == CHANNEL]

    def ping(self) -> None:
        """One round trip: every commit before it has been delivered once it returns."""
        try:
            self.raw.execute("SELECT 1")
        except psycopg.Error as error:
            raise StoreError(f"the store's change notifications stopped: "
                             f"{_reason(error)}") from None

    def close(self) -> None:
        self.raw.close()


# --- leases ------------------------------------------------------------------------------
#
# A lease says which host of a fleet acts alone on one secret (the rotation runner takes
# one for each rotation it runs). It is a session-level advisory lock in the two-int form,
# (LEASE_CLASS, secret id), on a connection set aside for the lease's whole duration:
# another host's pg_try_advisory_lock on that key is refused at once, and the server
# frees the lock when its holder unlocks it or its connection ends. A holder that is
# SIGKILLed, or whose connection breaks, thus hands the secret over with no timeout to
# wait out. The two-int form (objsubid 2 in pg_locks) never collides with WRITE_LOCK's
# single bigint; the class keeps the key apart from other users of the two-int form.
# The lock is the server's, so a lease is only as exclusive as the connection is alive:
# a holder cut off from the server loses it while it may still act, which is why AWS's
# rotation steps are written to be run again.

LEASE_CLASS = 0x726F7461  # "rota"
# Server-side TCP keepalives on a lease's connection: a holder whose machine vanished
# (no FIN ever comes) loses the lease in about idle + interval x count = 25 s rather
# than after the kernel's default two hours. A Unix-socket connection ignores them.
_LEASE_SETTINGS = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5,
                   "tcp_keepalives_count": 3}
_TRY_LEASE = "SELECT " + "".join(
    f"set_config('{name}', '{value}', false), " for name, value in _LEASE_SETTINGS.items()
) + "pg_try_advisory_lock(%s, %s)"


def lease_key(secret_id: int) -> tuple[int, int]:
    """The advisory lock a secret's lease is. objid is an int4: ids wrap past 2^31, so
    ids 2^32 apart would share a lease, which only makes them take turns."""
    return LEASE_CLASS, (secret_id + 2**31) % 2**32 - 2**31


def _try_lease(db: _Sql, key: tuple[int, int]) -> bool:
    return db.raw.execute(_TRY_LEASE, key).fetchone()[-1]


@contextmanager
def _lease(store: PostgresStore, secret_id: int) -> Iterator[bool]:
    key = lease_key(secret_id)
    db, pooled = store._checkout()
    try:
        held = _try_lease(db, key)
    except psycopg.Error as error:
        dropped = pooled and db.raw.broken
        db.raw.close()
        if not dropped:
            raise StoreError(f"the store can't grant a lease: {_reason(error)}") from None
        # A connection the server dropped while pooled: once more, anew.
        store._drop_idle()
        db = _connect(store._conninfo, store.where)
        try:
            held = _try_lease(db, key)
        except psycopg.Error as error:
            db.raw.close()
            raise StoreError(f"the store can't grant a lease: {_reason(error)}") from None
    if not held:
        store._checkin(db)
        yield False
        return
    try:
        yield True
    finally:
        _release(store, db, key)


def _release(store: PostgresStore, db: _Sql, key: tuple[int, int]) -> None:
    """Unlock, and pool the connection again only when it is known to hold no lock."""
    try:
        released = db.raw.execute("SELECT pg_advisory_unlock(%s, %s)", key).fetchone()[0]
    except psycopg.Error:
        released = False  # the connection is gone, and the lock with it
    if released:
        store._checkin(db)
    else:
        db.raw.close()
