"""Persistence behind one small interface.

A store keeps secrets, their tags, versions (ciphertext and wrapped data key,
never plaintext) and staging labels. Reads happen through `store.read()`, every
mutation through exactly one `store.write()` transaction, and `store.lease(secret_id)`
elects the one host of those sharing the store that rotates a secret. `sqlite.py` is the
embedded default; `postgres.py`, for fleets, runs the same queries on PostgreSQL.
A URL names the store: `sqlite:///ABSOLUTE/PATH` or `postgresql://…`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SecretRow:
    """The index columns every daemon keeps in memory for all secrets."""

    secret_id: int
    name: str
    path: str
    arn: str
    deleted: float | None


@dataclass(frozen=True, slots=True)
class SealedValue:
    """A version's stored value: still encrypted."""

    ciphertext: bytes
    wrapped_key: bytes
    key_id: str
    is_binary: bool


class StoreError(Exception):
    """The store could not complete an operation (disk full, read-only, corrupt)."""


def store_kind(url: str) -> str:
    """"sqlite" or "postgresql", from a store URL's scheme."""
    scheme = url.partition("://")[0]
    if scheme == "sqlite" and url.startswith("sqlite:///"):
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise StoreError(f"not a store URL: {scheme}://…; give sqlite:///ABSOLUTE/PATH or "
                     "postgresql://USER@HOST/DBNAME")


def open_store(url: str):
    """The store a URL names, checked and migrated to the current schema."""
    if store_kind(url) == "sqlite":
        from secretfs.store.sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite://")))
    from secretfs.store.postgres import PostgresStore

    return PostgresStore(url)


def create_store(url: str, *, password_file: Path):
    """Create the store a URL names. Returns it and the URL to record, which holds no
    password: a PostgreSQL password (in the URL or PGPASSWORD) goes to `password_file`."""
    if store_kind(url) == "sqlite":
        from secretfs.store.sqlite import SqliteStore

        return SqliteStore.create(Path(url.removeprefix("sqlite://"))), url
    from secretfs.store.postgres import PostgresStore, record_password

    recorded, written = record_password(url, password_file)
    try:
        return PostgresStore.create(recorded), recorded
    except BaseException:
        if written:
            password_file.unlink(missing_ok=True)
        raise
