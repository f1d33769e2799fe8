"""Encryption of secret values: envelope encryption and the key providers behind it.

``envelope`` seals each version's value under a fresh data key bound to the secret's ARN
and version id; a ``KeyProvider`` wraps and unwraps those data keys under master keys it
names the way KMS does. ``local`` is the provider backed by a key file in the state
directory. No plaintext data key is ever persisted by anything in this package.
"""

from __future__ import annotations

from typing import Protocol

from secretfs.crypto.envelope import Sealed, plaintext_size, seal, unseal
from secretfs.crypto.local import DEFAULT_ALIAS, LocalKeyProvider

__all__ = [
    "DEFAULT_ALIAS",
    "KeyProvider",
    "LocalKeyProvider",
    "Sealed",
    "plaintext_size",
    "seal",
    "unseal",
]


class KeyProvider(Protocol):
    """Master keys that wrap data keys, named as KMS names them.

    Conformance: ``wrap`` binds the wrapped key to the key id and to the whole context;
    ``unwrap`` under another key, of an altered blob, or with a context that differs in any
    entry raises ``DecryptionFailure``. No message or repr carries key material. ``unwrap``
    may return a ``bytearray``, which the caller zeroes after use.
    """

    def resolve(self, key_ref: str | None) -> str:
        """The canonical key id for None (the default key, alias "alias/aws/secretsmanager"),
        a key id, a key ARN, an alias "alias/name" or an alias ARN.

        An unknown key raises ``InvalidParameterException`` naming the reference.
        """
        ...

    def wrap(self, key_id: str, data_key: bytes, context: dict[str, str]) -> bytes:
        """The data key encrypted under master key ``key_id`` and bound to ``context``."""
        ...

    def unwrap(self, key_id: str, wrapped: bytes, context: dict[str, str]) -> bytes:
        """The data key back, or ``DecryptionFailure``."""
        ...

    def key_arn(self, key_id: str) -> str:
        """The ARN of master key ``key_id``."""
        ...
