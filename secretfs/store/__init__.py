"""Persistence behind one small interface.

A store keeps secrets, their tags, versions (ciphertext and wrapped data key,
never plaintext) and staging labels. Reads happen through `store.read()`, every
mutation through exactly one `store.write()` transaction. `sqlite.py` is the
embedded default; a PostgreSQL store for fleets implements the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass


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
