"""Envelope encryption of secret values.

This module owns the format of a sealed value and the rule that binds it to its place: every
``seal`` draws a fresh 256-bit data key, encrypts the value under it with AES-256-GCM, and has
a key provider wrap the data key. The ciphertext's associated data names the secret's ARN and
the version id, and the data key is wrapped under the encryption context
``{"SecretARN": arn, "SecretVersionId": version_id}`` (the context Secrets Manager gives KMS),
so a row moved to another secret or version, or altered in any bit, fails to open instead of
returning someone else's value.

The plaintext data key lives only in a ``bytearray`` that is zeroed once the value is sealed
or opened. That is best effort: ``os.urandom`` (or a KMS client's response) returns the
fresh key as a ``bytes`` object that is freed but not wiped, OpenSSL holds its own copy of
the key schedule while a cipher object lives, and Python may leave copies behind in memory
it reuses. What matters here is that a data key is never persisted, logged, or put into a
message.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretfs.model import DecryptionFailure

if TYPE_CHECKING:
    from secretfs.crypto import KeyProvider

NONCE_SIZE = 12
TAG_SIZE = 16
DATA_KEY_SIZE = 32

# Versioned so a later format can coexist with values already written in this one.
_VALUE_AAD_TAG = "secretfs/value/v1"


@dataclass(frozen=True, slots=True, repr=False)
class Sealed:
    """One encrypted value as the store keeps it."""

    ciphertext: bytes  # nonce(12) || AES-256-GCM ciphertext+tag
    wrapped_key: bytes  # the data key wrapped by the provider
    key_id: str  # canonical master key id used

    def __repr__(self) -> str:
        return (f"Sealed(key_id={self.key_id!r}, ciphertext=<{len(self.ciphertext)} bytes>, "
                f"wrapped_key=<{len(self.wrapped_key)} bytes>)")


def encode_fields(*fields: str) -> bytes:
    """An unambiguous byte encoding of strings: each one UTF-8, prefixed by its 4-byte length.

    Length prefixes keep ("ab", "c") and ("a", "bc") apart, which plain joining with a
    separator would not once a field may contain the separator.
    """
    out = bytearray()
    for field in fields:
        if not isinstance(field, str):
            raise TypeError(f"expected str, got {type(field).__name__}")
        data = field.encode("utf-8")
        out += struct.pack(">I", len(data))
        out += data
    return bytes(out)


def encryption_context(arn: str, version_id: str) -> dict[str, str]:
    """The context a version's data key is wrapped under, named as Secrets Manager names it."""
    return {"SecretARN": arn, "SecretVersionId": version_id}


def _value_aad(arn: str, version_id: str, binary: bool) -> bytes:
    # The kind is bound too: a row flipped from string to binary must not open.
    return encode_fields(_VALUE_AAD_TAG, arn, version_id, "binary" if binary else "string")


def seal(provider: KeyProvider, key_id: str, plaintext: bytes, *, arn: str,
         version_id: str, binary: bool = False) -> Sealed:
    """Encrypt one version's value under a fresh data key wrapped by ``key_id``."""
    aad = _value_aad(arn, version_id, binary)
    data_key, wrapped_key = _new_data_key(provider, key_id, encryption_context(arn, version_id))
    try:
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)
    finally:
        _zero(data_key)
    return Sealed(ciphertext=ciphertext, wrapped_key=wrapped_key, key_id=key_id)


def _new_data_key(provider: KeyProvider, key_id: str,
                  context: dict[str, str]) -> tuple[bytearray, bytes]:
    """A fresh data key and its wrapped form: made where the master key lives when the
    provider can (KMS GenerateDataKey, one round trip), else drawn here and wrapped."""
    generate = getattr(provider, "generate_data_key", None)
    if generate is not None:
        return generate(key_id, context)
    data_key = bytearray(os.urandom(DATA_KEY_SIZE))
    try:
        return data_key, provider.wrap(key_id, data_key, context)
    except BaseException:
        _zero(data_key)
        raise


def unseal(provider: KeyProvider, sealed: Sealed, *, arn: str, version_id: str,
           binary: bool = False) -> bytes:
    """Decrypt a value sealed for exactly this ARN, version id and kind, or raise
    DecryptionFailure."""
    aad = _value_aad(arn, version_id, binary)
    what = f"the value of {arn} version {version_id}"
    if len(sealed.ciphertext) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailure(f"Can't decrypt {what}: the stored ciphertext is truncated.")
    try:
        data_key = provider.unwrap(sealed.key_id, sealed.wrapped_key,
                                   encryption_context(arn, version_id))
    except DecryptionFailure as exc:
        raise DecryptionFailure(
            f"Can't decrypt {what}: its data key does not unwrap under KMS key "
            f"{sealed.key_id} for this secret and version (wrong key, altered data, or a "
            f"value that belongs to another secret or version).") from exc
    try:
        if len(data_key) != DATA_KEY_SIZE:
            raise DecryptionFailure(
                f"Can't decrypt {what}: KMS key {sealed.key_id} returned a data key of the "
                "wrong size.")
        nonce, body = sealed.ciphertext[:NONCE_SIZE], sealed.ciphertext[NONCE_SIZE:]
        try:
            return AESGCM(data_key).decrypt(nonce, body, aad)
        except InvalidTag:
            raise DecryptionFailure(
                f"Can't decrypt {what}: the ciphertext does not authenticate (altered data, "
                "or a value that belongs to another secret or version).") from None
    finally:
        # A provider that hands back a bytearray lets us wipe the key; bytes can't be wiped.
        if isinstance(data_key, bytearray):
            _zero(data_key)


def plaintext_size(ciphertext_len: int) -> int:
    """The length of the value inside a ciphertext of this length, without decrypting it."""
    if ciphertext_len < NONCE_SIZE + TAG_SIZE:
        raise ValueError(f"a sealed ciphertext has at least {NONCE_SIZE + TAG_SIZE} bytes, "
                         f"not {ciphertext_len}")
    return ciphertext_len - NONCE_SIZE - TAG_SIZE


def _zero(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))
