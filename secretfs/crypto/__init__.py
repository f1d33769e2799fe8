"""Encryption of secret values: envelope encryption and the key providers behind it.

``envelope`` seals each version's value under a fresh data key bound to the secret's ARN
and version id; a ``KeyProvider`` wraps and unwraps those data keys under master keys it
names the way KMS does. ``local`` is the provider backed by a key file in the state
directory, ``kms`` the one backed by AWS KMS (imported only when chosen: it loads the AWS
client). No plaintext data key is ever persisted by anything in this package.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from secretfs.crypto.envelope import Sealed, plaintext_size, seal, unseal
from secretfs.crypto.local import DEFAULT_ALIAS, LocalKeyProvider

__all__ = [
    "DEFAULT_ALIAS",
    "KeyProvider",
    "LocalKeyProvider",
    "RotatingKeyProvider",
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

    A provider may also offer ``generate_data_key(key_id, context) -> (data key as a
    bytearray, wrapped key)``, making the data key where its master key lives (KMS
    GenerateDataKey); ``envelope.seal`` uses it when present, else draws the key itself
    and calls ``wrap``.
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

    def status(self) -> dict:
        """What `secretfs status` shows: Kind, Source, Path, Keys (no remote call)."""
        ...


@runtime_checkable
class RotatingKeyProvider(KeyProvider, Protocol):
    """A provider whose master keys secretfs rotates itself (the local key file; KMS
    rotates its keys on its own, behind the same key id, and is not one).

    A key has numbered versions; ``wrap`` always uses the newest, and the wrapped key
    records which version wrapped it. Older versions keep unwrapping what they wrapped
    until ``retire_old_versions`` drops them.
    """

    def rotate_key(self, key_id: str) -> dict:
        """Make the key's next version the one that wraps, and describe the key."""
        ...

    def retire_old_versions(self, key_id: str) -> list[int]:
        """Drop every version but the newest; the versions dropped."""
        ...

    def key_version(self, key_id: str) -> int:
        """The version that wraps new data keys."""
        ...

    def wrapped_version(self, key_id: str, wrapped: bytes) -> int | None:
        """The version a wrapped data key names (None if it is malformed)."""
        ...
