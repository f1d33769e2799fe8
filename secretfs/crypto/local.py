"""The local key provider: master keys kept in a JSON key file in the state directory.

This module owns the key file (its format, its 0600 permissions, its atomic rewrite), the
KMS-style naming of master keys (key id, key ARN, aliases, alias ARNs) and the wrapping of
data keys under a master key with AES-256-GCM. The file holds the master keys in base64;
it never holds a data key, wrapped or not: wrapped data keys live in the store next to the
values they protect.

One process (the daemon) owns a key file; ``create_key`` rewrites it without locking
against other processes.

Sealed key files: the key file may keep every key's id, aliases and dates, and each
key's material only sealed (AES-256-GCM), so the file alone opens nothing. The sealing key
comes from one of two places:

- a systemd credential (``LoadCredentialEncrypted=secretfs-master-key:...``, read from
  ``$CREDENTIALS_DIRECTORY/secretfs-master-key``) holding the default key's first material
  (base64), through HKDF. A plaintext key file is sealed the first time it is loaded with
  a matching credential; ``export_master_key`` gives the credential's content.
- a passphrase (the "passphrase" key provider), through Argon2id, whose parameters and
  salt the file records (see crypto/passphrase.py). The daemon is given the passphrase
  once, at start.

Key versions: ``rotate_key`` gives a master key new material, a new version, while its id,
ARN and aliases stay. Every data key is wrapped under the newest version of its master
key, and the wrapped key records that version (its first byte is the format: 1 for keys
wrapped before versions existed, which are version 1; 2 for ``2 || version (4 bytes) ||
nonce || ciphertext``). Older versions stay in the file, to unwrap what they wrapped,
until ``retire_old_versions`` drops them; the file remembers which were retired, so a
wrapped key that names one fails with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import secrets
import stat
import struct
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secretfs.crypto import passphrase as passphrases
from secretfs.crypto.envelope import encode_fields
from secretfs.files import fsync_directory, write_new_file
from secretfs.model import (
    DecryptionFailure,
    EncryptionFailure,
    InvalidParameterException,
    ResourceExistsException,
)

DEFAULT_ALIAS = "alias/aws/secretsmanager"
DEFAULT_DESCRIPTION = (
    "Default key that protects my Secrets Manager secrets when no other key is defined")

MASTER_KEY_SIZE = 32
_FILE_FORMAT = 1
_NONCE_SIZE, _TAG_SIZE = 12, 16
# Wrapped data keys: format 1 (before key versions: version 1) and format 2, which names
# the key version in its header and binds it into the associated data.
_WRAP_FORMATS = {1: (struct.Struct(">B"), "secretfs/wrap/v1"),
                 2: (struct.Struct(">BI"), "secretfs/wrap/v2")}
_WRAP_FORMAT = 2
_VERSION_MAX = 2 ** 32 - 1

# KMS: an alias is at most 256 characters including its "alias/" prefix, and the prefix
# "alias/aws/" belongs to AWS managed keys (here: the default key).
_ALIAS_PREFIX = "alias/"
_RESERVED_ALIAS_PREFIX = "alias/aws/"
_ALIAS_MAX = 256
_ALIAS_RE = re.compile(r"^alias/[A-Za-z0-9/_-]+$")
_DESCRIPTION_MAX = 8192
_ACCOUNT_RE = re.compile(r"^[0-9]{12}$")
_REGION_RE = re.compile(r"^[a-z0-9-]{1,64}$")
_SHOWN_REF_MAX = 300

# The systemd credential that may hold the master key, and how a key file says it is sealed.
CREDENTIAL_NAME = "secretfs-master-key"
SEALED_BY_CREDENTIAL = f"credential:{CREDENTIAL_NAME}"
SEALED_BY_PASSPHRASE = "passphrase"
_SEAL_AAD_TAG = "secretfs/key-file-seal/v1"


def sealed_by_credential(content: bytes) -> bool:
    """Whether a key file's bytes hold key material sealed by the systemd credential
    (opened only where that credential is). ValueError: not a key file's JSON object."""
    try:
        return json.loads(content).get("SealedBy") == SEALED_BY_CREDENTIAL
    except (ValueError, AttributeError):
        raise ValueError("not a key file (not a JSON object)") from None


def credential_path() -> Path | None:
    """``$CREDENTIALS_DIRECTORY/secretfs-master-key`` when systemd passed that credential."""
    return passphrases.credential_path(CREDENTIAL_NAME)


def read_credential(path: Path) -> bytes:
    """The master key in a credential file: base64 text (what ``export_master_key``
    prints), or the 32 raw bytes."""
    raw = Path(path).read_bytes()
    if len(raw) == MASTER_KEY_SIZE:
        return raw
    try:
        material = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        material = b""
    if len(material) != MASTER_KEY_SIZE:
        raise ValueError(f"credential {path} does not hold a {MASTER_KEY_SIZE}-byte master "
                         "key in base64 (make it with 'secretfs export-master-key')")
    return material


class _SealMismatch(Exception):
    """Sealed key material that does not open: the wrong credential or passphrase, or an
    altered file."""


class _Sealer:
    """Seals key material in the key file under a key-encryption key, derived from the
    systemd credential (HKDF) or from a passphrase (Argon2id, its parameters in the file)."""

    def __init__(self, kek: bytes, *, sealed_by: str, kdf: dict | None = None,
                 master: bytes | None = None):
        self.sealed_by = sealed_by
        self.kdf = kdf  # how the passphrase gives the kek: written into the file
        self.master = master  # the credential's key, to recognise it in a plaintext file
        self._aead = AESGCM(kek)

    @classmethod
    def from_credential(cls, master: bytes) -> _Sealer:
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=_SEAL_AAD_TAG.encode()).derive(master)
        return cls(kek, sealed_by=SEALED_BY_CREDENTIAL, master=master)

    @classmethod
    def from_passphrase(cls, passphrase: bytes, kdf: dict) -> _Sealer:
        return cls(passphrases.derive_key(passphrase, kdf), sealed_by=SEALED_BY_PASSPHRASE,
                   kdf=kdf)

    def seal(self, key_id: str, version: int, material: bytes) -> str:
        nonce = os.urandom(_NONCE_SIZE)
        body = self._aead.encrypt(nonce, material, _seal_aad(key_id, version))
        return base64.b64encode(nonce + body).decode("ascii")

    def open(self, key_id: str, version: int, sealed: object) -> bytes:
        try:
            blob = base64.b64decode(sealed, validate=True)  # type: ignore[arg-type]
            return self._aead.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:],
                                      _seal_aad(key_id, version))
        except (binascii.Error, TypeError, ValueError, InvalidTag):
            raise _SealMismatch(key_id) from None

    def refusal(self, path: Path) -> str:
        """Why a key file's sealed material does not open, in one line."""
        if self.sealed_by == SEALED_BY_PASSPHRASE:
            return f"the passphrase does not open key file {path}"
        return (f"the credential {CREDENTIAL_NAME} does not open key file {path} (not "
                "its master key?)")


def _seal_aad(key_id: str, version: int) -> bytes:
    # Version 1 keeps the associated data of files sealed before key versions existed.
    if version == 1:
        return encode_fields(_SEAL_AAD_TAG, key_id)
    return encode_fields(_SEAL_AAD_TAG, key_id, str(version))


@dataclass(frozen=True, slots=True)
class _KeyVersion:
    """One material of a master key; the newest wraps new data keys."""

    number: int
    created: datetime
    material: bytes = field(repr=False)
    aead: AESGCM = field(repr=False, compare=False)

    @classmethod
    def generate(cls, number: int) -> _KeyVersion:
        material = os.urandom(MASTER_KEY_SIZE)
        return cls(number, datetime.now(UTC), material, AESGCM(material))

    @classmethod
    def from_json(cls, entry: dict, key_id: str, number: int, created: datetime,
                  sealer: _Sealer | None) -> _KeyVersion:
        """The version's material from a key entry (or a PreviousVersions entry)."""
        where = f"key {key_id}" + (f" version {number}" if number != 1 else "")
        if "SealedKeyMaterial" in entry:
            if sealer is None:
                raise ValueError(f"{where}: its material is sealed, and no credential or "
                                 "passphrase was given to open it")
            material = sealer.open(key_id, number, entry["SealedKeyMaterial"])
        elif sealer is not None:
            raise ValueError(f"{where}: a sealed key file holds no plaintext KeyMaterial")
        else:
            try:
                material = base64.b64decode(entry.get("KeyMaterial", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(f"{where}: KeyMaterial is not base64") from None
        if len(material) != MASTER_KEY_SIZE:
            raise ValueError(f"{where}: KeyMaterial is not {MASTER_KEY_SIZE} bytes")
        return cls(number, created, material, AESGCM(material))

    def material_json(self, key_id: str, sealer: _Sealer | None) -> dict:
        if sealer is None:
            return {"KeyMaterial": base64.b64encode(self.material).decode("ascii")}
        return {"SealedKeyMaterial": sealer.seal(key_id, self.number, self.material)}


@dataclass(frozen=True, slots=True)
class _MasterKey:
    key_id: str
    aliases: tuple[str, ...]
    description: str | None
    created: datetime
    versions: tuple[_KeyVersion, ...]  # oldest first; the last one wraps new data keys
    retired: tuple[int, ...] = ()  # versions whose material was dropped

    @property
    def current(self) -> _KeyVersion:
        return self.versions[-1]

    def version(self, number: int) -> _KeyVersion | None:
        for version in self.versions:
            if version.number == number:
                return version
        return None

    @classmethod
    def generate(cls, *, aliases: tuple[str, ...], description: str | None) -> _MasterKey:
        return cls(key_id=str(uuid.uuid4()), aliases=aliases, description=description,
                   created=datetime.now(UTC), versions=(_KeyVersion.generate(1),))

    @classmethod
    def from_json(cls, entry: object, sealer: _Sealer | None = None) -> _MasterKey:
        """One key from the file; messages name the field at fault, never its value."""
        if not isinstance(entry, dict):
            raise ValueError("a key entry is not an object")
        key_id = entry.get("KeyId")
        if not isinstance(key_id, str) or not _is_key_id(key_id):
            raise ValueError("a key entry has no valid KeyId")
        aliases = entry.get("Aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"key {key_id}: Aliases is not a list of strings")
        description = entry.get("Description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"key {key_id}: Description is not a string")
        created = _date(entry, "CreationDate", key_id)
        previous = entry.get("PreviousVersions", [])
        if not isinstance(previous, list) or not all(isinstance(p, dict) for p in previous):
            raise ValueError(f"key {key_id}: PreviousVersions is not a list of objects")
        versions = [_KeyVersion.from_json(
            old, key_id, _version_number(old, key_id), _date(old, "CreationDate", key_id),
            sealer) for old in previous]
        number = _version_number(entry, key_id)
        versions.append(_KeyVersion.from_json(
            entry, key_id, number,
            _date(entry, "KeyVersionDate", key_id) if number != 1 else created, sealer))
        numbers = [version.number for version in versions]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"key {key_id}: its versions are not in increasing order")
        retired = entry.get("RetiredVersions", [])
        if not isinstance(retired, list) or not all(
                isinstance(n, int) and 0 < n < number for n in retired) \
                or set(retired) & set(numbers):
            raise ValueError(f"key {key_id}: RetiredVersions is not a list of old versions")
        return cls(key_id=key_id, aliases=tuple(aliases), description=description,
                   created=created, versions=tuple(versions), retired=tuple(sorted(retired)))

    def to_json(self, sealer: _Sealer | None = None) -> dict:
        """The entry; a key never rotated has exactly the entry of files made before key
        versions: its material is the newest version's, and older ones follow it."""
        current = self.current
        entry = {
            "KeyId": self.key_id,
            "Aliases": list(self.aliases),
            "Description": self.description,
            "CreationDate": self.created.isoformat(),
        }
        if current.number != 1:
            entry["KeyVersion"] = current.number
            entry["KeyVersionDate"] = current.created.isoformat()
        entry.update(current.material_json(self.key_id, sealer))
        if len(self.versions) > 1:
            entry["PreviousVersions"] = [
                {"KeyVersion": old.number, "CreationDate": old.created.isoformat(),
                 **old.material_json(self.key_id, sealer)} for old in self.versions[:-1]]
        if self.retired:
            entry["RetiredVersions"] = list(self.retired)
        return entry


def _version_number(entry: dict, key_id: str) -> int:
    number = entry.get("KeyVersion", 1)
    if not isinstance(number, int) or isinstance(number, bool) \
            or not 1 <= number <= _VERSION_MAX:
        raise ValueError(f"key {key_id}: KeyVersion is not a number from 1 to {_VERSION_MAX}")
    return number


def _date(entry: dict, name: str, key_id: str) -> datetime:
    try:
        when = datetime.fromisoformat(entry[name])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"key {key_id}: {name} is not an ISO 8601 date") from None
    if when.tzinfo is None:
        raise ValueError(f"key {key_id}: {name} has no time zone")
    return when


@dataclass(frozen=True, slots=True)
class _Index:
    """All keys and aliases as one value, swapped whole so readers never see half an update."""

    keys: dict[str, _MasterKey]
    ids_by_alias: dict[str, str]

    @classmethod
    def build(cls, keys: Iterable[_MasterKey]) -> _Index:
        by_id: dict[str, _MasterKey] = {}
        by_alias: dict[str, str] = {}
        for key in keys:
            if key.key_id in by_id:
                raise ValueError(f"key {key.key_id} appears twice")
            by_id[key.key_id] = key
            for alias in key.aliases:
                if alias in by_alias:
                    raise ValueError(f"alias {alias} names two keys")
                by_alias[alias] = key.key_id
        if DEFAULT_ALIAS not in by_alias:
            raise ValueError(f"no key has the alias {DEFAULT_ALIAS}")
        return cls(by_id, by_alias)


class LocalKeyProvider:
    """Master keys from a local key file; implements ``secretfs.crypto.KeyProvider`` and
    ``secretfs.crypto.RotatingKeyProvider``."""

    def __init__(self, path: Path, keys: Iterable[_MasterKey], *, region: str,
                 account_id: str, sealer: _Sealer | None = None):
        # Use create() or load(); this only assembles a provider from keys already validated.
        if not isinstance(region, str) or not _REGION_RE.match(region):
            raise ValueError(f"invalid region {region!r}")
        if not isinstance(account_id, str) or not _ACCOUNT_RE.match(account_id):
            raise ValueError(f"invalid account id {account_id!r}: expected 12 digits")
        self._path = Path(path)
        self._region = region
        self._account_id = account_id
        self._arn_prefix = f"arn:aws:kms:{region}:{account_id}:"
        self._index = _Index.build(keys)
        self._sealer = sealer
        # Serialises the changes (create_key, rotate_key, retire_old_versions); readers
        # use self._index, which a change replaces whole.
        self._lock = threading.Lock()

    @property
    def sealed(self) -> bool:
        """Whether the key file holds key material only sealed (by the credential or a
        passphrase)."""
        return self._sealer is not None

    @property
    def sealed_by(self) -> str | None:
        """What seals the key file's material: SEALED_BY_CREDENTIAL, SEALED_BY_PASSPHRASE,
        or None for a plaintext key file."""
        return None if self._sealer is None else self._sealer.sealed_by

    def __repr__(self) -> str:
        return f"LocalKeyProvider(path={str(self._path)!r}, keys={len(self._index.keys)})"

    def status(self) -> dict:
        """What `secretfs status` shows of this provider."""
        source = {None: "key file", SEALED_BY_CREDENTIAL: "systemd credential",
                  SEALED_BY_PASSPHRASE: "passphrase"}[self.sealed_by]
        return {"Kind": "passphrase" if self.sealed_by == SEALED_BY_PASSPHRASE else "local",
                "Source": source, "Path": str(self._path), "Keys": len(self._index.keys)}

    @classmethod
    def create(cls, path: Path, *, region: str, account_id: str, sealed: bool = False,
               passphrase: bytes | None = None) -> LocalKeyProvider:
        """Create the key file with its default key; FileExistsError if it exists.
        ``sealed``: the file never holds the master key (``master_key()`` returns it, for
        the credential). ``passphrase``: the file holds the key material only sealed
        under a key derived from it."""
        path = Path(path)
        default = _MasterKey.generate(aliases=(DEFAULT_ALIAS,), description=DEFAULT_DESCRIPTION)
        if sealed and passphrase is not None:
            raise ValueError("a key file is sealed by the credential or by a passphrase, "
                             "not both")
        sealer = None
        if sealed:
            sealer = _Sealer.from_credential(default.current.material)
        elif passphrase is not None:
            sealer = _Sealer.from_passphrase(passphrase, passphrases.new_kdf())
        provider = cls(path, [default], region=region, account_id=account_id, sealer=sealer)
        # Written in place rather than renamed over: O_EXCL is what refuses an existing file.
        write_new_file(path, provider._serialize())
        fsync_directory(path.parent)
        return provider

    @classmethod
    def load(cls, path: Path, *, region: str, account_id: str,
             credential: bytes | None = None,
             passphrase: bytes | None = None) -> LocalKeyProvider:
        """Load a key file, refusing one that group or others may read or write.

        With ``credential`` (the master key from a systemd credential) the file's key
        material is opened with it, and a file that still holds plaintext material is
        sealed now, once the credential is known to be its master key. A file sealed
        under a passphrase needs ``passphrase``."""
        path = Path(path)
        with open(path, "rb") as file:
            # fstat the open file, so the mode checked is the mode of the bytes read.
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            if mode & 0o077:
                raise PermissionError(
                    f"refusing to load key file {path}: its mode {mode:04o} lets group or "
                    f"others read or write it (run 'chmod 600 {path}')")
            raw = file.read()
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            # from None: a JSONDecodeError keeps the whole document, key material included.
            raise ValueError(f"key file {path} is not valid JSON") from None
        try:
            if not isinstance(doc, dict) or doc.get("Format") != _FILE_FORMAT:
                raise ValueError(f"unknown format (expected Format {_FILE_FORMAT})")
            entries = doc.get("Keys")
            if not isinstance(entries, list):
                raise ValueError("Keys is not a list")
            sealed_by = doc.get("SealedBy")
            if sealed_by not in (None, SEALED_BY_CREDENTIAL, SEALED_BY_PASSPHRASE):
                raise ValueError("SealedBy names neither the credential nor a passphrase")
        except ValueError as exc:
            raise ValueError(f"key file {path} is invalid: {exc}") from None
        sealer = _file_sealer(sealed_by, doc, path, credential=credential,
                              passphrase=passphrase)
        try:
            keys = [_MasterKey.from_json(entry, sealer if sealed_by else None)
                    for entry in entries]
            provider = cls(path, keys, region=region, account_id=account_id, sealer=sealer)
        except _SealMismatch:
            raise ValueError(sealer.refusal(path)) from None
        except ValueError as exc:
            raise ValueError(f"key file {path} is invalid: {exc}") from None
        if sealer is not None and not sealed_by:
            default = provider._index.keys[provider._index.ids_by_alias[DEFAULT_ALIAS]]
            if not any(hmac.compare_digest(version.material, sealer.master)
                       for version in default.versions):
                raise ValueError(f"the credential {CREDENTIAL_NAME} is not the master key "
                                 f"of key file {path} (see 'secretfs export-master-key')")
            provider._persist(provider._index)  # the plaintext material leaves the file
        return provider

    def master_key(self) -> bytes:
        """The credential's content (base64 of the default key's newest material, one line)."""
        default = self._index.keys[self._index.ids_by_alias[DEFAULT_ALIAS]]
        return base64.b64encode(default.current.material) + b"\n"

    def create_key(self, *, alias: str | None, description: str | None = None) -> dict:
        """Add a master key, persist the key file atomically, and describe the new key."""
        if alias is not None:
            _validate_alias(alias)
        if description is not None and (
                not isinstance(description, str) or len(description) > _DESCRIPTION_MAX):
            raise InvalidParameterException(
                f"A key description must be a string of at most {_DESCRIPTION_MAX} characters.")
        with self._lock:
            index = self._index
            if alias is not None and alias in index.ids_by_alias:
                raise ResourceExistsException(f"An alias with the name {alias} already exists.")
            key = _MasterKey.generate(aliases=() if alias is None else (alias,),
                                      description=description)
            self._commit(index, key)
        return self._describe(key)

    def rotate_key(self, key_id: str) -> dict:
        """Give a master key new material, its next version, which wraps every data key
        from now on: the file is rewritten first, then this provider switches at once."""
        with self._lock:
            index = self._index
            key = self._key(key_id, InvalidParameterException)
            if key.current.number == _VERSION_MAX:
                raise InvalidParameterException(f"KMS key {key_id} has no version left.")
            rotated = replace(key, versions=(
                *key.versions, _KeyVersion.generate(key.current.number + 1)))
            self._commit(index, rotated)
        return self._describe(rotated)

    def retire_old_versions(self, key_id: str) -> list[int]:
        """Drop the material of every version of a key but the newest; the versions
        dropped. The caller makes sure no stored data key is wrapped under them."""
        with self._lock:
            index = self._index
            key = self._key(key_id, InvalidParameterException)
            dropped = [version.number for version in key.versions[:-1]]
            if dropped:
                self._commit(index, replace(key, versions=(key.current,),
                                            retired=tuple(sorted((*key.retired, *dropped)))))
        return dropped

    def key_version(self, key_id: str) -> int:
        """The version of a key that wraps new data keys."""
        return self._key(key_id, InvalidParameterException).current.number

    def wrapped_version(self, key_id: str, wrapped: bytes) -> int | None:
        """The key version a wrapped data key names, or None if it is malformed."""
        header = _wrap_header(wrapped)
        return None if header is None else header[1]

    def list_keys(self) -> list[dict]:
        """Every master key in creation order, described without its material."""
        return [self._describe(key) for key in self._index.keys.values()]

    def resolve(self, key_ref: str | None) -> str:
        """The key id named by None (the default key), an id, a key ARN, an alias or alias ARN."""
        index = self._index
        if key_ref is None:
            return index.ids_by_alias[DEFAULT_ALIAS]
        if not isinstance(key_ref, str):
            raise InvalidParameterException("A KMS key id must be a string.")
        ref = key_ref
        if ref.startswith("arn:"):
            # A key in another region or account can't be one of ours.
            if not ref.startswith(self._arn_prefix):
                raise _key_not_found(key_ref)
            ref = ref[len(self._arn_prefix):]
            if ref.startswith("key/"):
                key_id = ref[len("key/"):]
                if key_id in index.keys:
                    return key_id
                raise _key_not_found(key_ref)
            if not ref.startswith(_ALIAS_PREFIX):
                raise _key_not_found(key_ref)
        if ref.startswith(_ALIAS_PREFIX):
            key_id = index.ids_by_alias.get(ref)
        else:
            key_id = ref if ref in index.keys else None
        if key_id is None:
            raise _key_not_found(key_ref)
        return key_id

    def key_arn(self, key_id: str) -> str:
        self._key(key_id, InvalidParameterException)
        return f"{self._arn_prefix}key/{key_id}"

    def wrap(self, key_id: str, data_key: bytes, context: dict[str, str]) -> bytes:
        """2 || key version (4 bytes) || nonce(12) || AES-256-GCM(data key), under the
        newest version of the master key."""
        version = self._key(key_id, EncryptionFailure).current
        nonce = os.urandom(_NONCE_SIZE)
        header = _WRAP_FORMATS[_WRAP_FORMAT][0].pack(_WRAP_FORMAT, version.number)
        body = version.aead.encrypt(nonce, data_key,
                                    _wrap_aad(_WRAP_FORMAT, key_id, version.number, context))
        return header + nonce + body

    def unwrap(self, key_id: str, wrapped: bytes, context: dict[str, str]) -> bytearray:
        """The data key, in a bytearray the caller should zero after use."""
        key = self._key(key_id, DecryptionFailure)
        header = _wrap_header(wrapped)
        if header is None:
            raise DecryptionFailure(
                f"The wrapped data key for KMS key {key_id} is malformed or in an unknown format.")
        wrap_format, number, size = header
        version = key.version(number)
        if version is None:
            why = ("which was retired from the key file" if number in key.retired else
                   "which this key file does not hold (a copy older than its last rotate-key?)")
            raise DecryptionFailure(
                f"The data key is wrapped under version {number} of KMS key {key_id}, {why}.")
        nonce, body = wrapped[size:size + _NONCE_SIZE], wrapped[size + _NONCE_SIZE:]
        data_key = bytearray(len(body) - _TAG_SIZE)
        try:
            # decrypt_into writes straight into data_key, so no unwipeable bytes copy is made.
            version.aead.decrypt_into(nonce, body, _wrap_aad(wrap_format, key_id, number,
                                                             context), data_key)
        except InvalidTag:
            data_key[:] = bytes(len(data_key))
            raise DecryptionFailure(
                f"The data key does not unwrap under KMS key {key_id} with this encryption "
                "context.") from None
        return data_key

    # --- internals ---------------------------------------------------------------------

    def _key(self, key_id: str, error: type[Exception]) -> _MasterKey:
        key = self._index.keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise error(f"KMS key {_shown(key_id)} not found.")
        return key

    def _describe(self, key: _MasterKey) -> dict:
        return {
            "KeyId": key.key_id,
            "Arn": f"{self._arn_prefix}key/{key.key_id}",
            "Aliases": list(key.aliases),
            "Description": key.description,
            "CreationDate": key.created,
            "KeyVersion": key.current.number,
            "PreviousKeyVersions": [version.number for version in key.versions[:-1]],
        }

    def _commit(self, index: _Index, key: _MasterKey) -> None:
        """Put ``key`` (new, or a new state of one) into the index; the caller holds the
        lock. Persisted first: if the write fails, memory still matches the file."""
        keys = dict(index.keys)
        keys[key.key_id] = key  # a key replaced keeps its place in the file
        new_index = _Index.build(keys.values())
        self._persist(new_index)
        self._index = new_index

    def _serialize(self, index: _Index | None = None) -> bytes:
        keys = (index or self._index).keys.values()
        doc: dict = {"Format": _FILE_FORMAT}
        if self._sealer is not None:
            doc["SealedBy"] = self._sealer.sealed_by
            if self._sealer.kdf is not None:
                doc["Kdf"] = self._sealer.kdf
        doc["Keys"] = [key.to_json(self._sealer) for key in keys]
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    def _persist(self, index: _Index) -> None:
        # Write a new 0600 file beside the old one and rename it over: a crash leaves either
        # the old file or the new one, never a torn one.
        tmp = self._path.with_name(f".{self._path.name}.{secrets.token_hex(8)}.tmp")
        write_new_file(tmp, self._serialize(index))
        try:
            os.replace(tmp, self._path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(self._path.parent)


def _file_sealer(sealed_by: str | None, doc: dict, path: Path, *, credential: bytes | None,
                 passphrase: bytes | None) -> _Sealer | None:
    """The sealer a key file needs (or, for a plaintext file and a credential, the one
    that seals it now); ValueError when what it needs was not given."""
    if sealed_by == SEALED_BY_PASSPHRASE:
        if passphrase is None:
            raise ValueError(f"key file {path} holds its keys sealed under a passphrase, "
                             "and none was given")
        try:
            return _Sealer.from_passphrase(passphrase, doc.get("Kdf"))
        except passphrases.PassphraseError as error:
            raise ValueError(f"key file {path} is invalid: Kdf: {error}") from None
    if passphrase is not None:
        raise ValueError(f"key file {path} is not sealed under a passphrase")
    if sealed_by == SEALED_BY_CREDENTIAL and credential is None:
        raise ValueError(
            f"key file {path} holds its keys sealed by the systemd credential "
            f"{CREDENTIAL_NAME}, and $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} is missing "
            "(LoadCredentialEncrypted= in the unit)")
    return None if credential is None else _Sealer.from_credential(bytes(credential))


def export_master_key(path: Path, *, region: str, account_id: str) -> bytes:
    """The content of the ``secretfs-master-key`` credential for an unsealed key file
    (read only: the file is sealed when the daemon first starts with the credential)."""
    try:
        with open(path, "rb") as file:
            sealed_by = json.loads(file.read()).get("SealedBy")
    except (UnicodeDecodeError, ValueError, AttributeError):
        sealed_by = None  # load() below says what is wrong with it
    if sealed_by == SEALED_BY_CREDENTIAL:
        raise ValueError(f"key file {path} is already sealed: its master key is only in the "
                         f"systemd credential {CREDENTIAL_NAME}")
    if sealed_by == SEALED_BY_PASSPHRASE:
        raise ValueError(f"key file {path} is sealed under a passphrase, which the daemon "
                         "needs instead of a credential")
    return LocalKeyProvider.load(path, region=region, account_id=account_id).master_key()


def _wrap_header(wrapped: bytes) -> tuple[int, int, int] | None:
    """(format, key version, header size) of a wrapped data key, or None if malformed."""
    if not isinstance(wrapped, bytes | bytearray | memoryview) or not wrapped:
        return None
    found = _WRAP_FORMATS.get(wrapped[0])
    if found is None or len(wrapped) < found[0].size + _NONCE_SIZE + _TAG_SIZE:
        return None
    header = found[0].unpack_from(wrapped)
    number = header[1] if len(header) > 1 else 1
    return (header[0], number, found[0].size) if number >= 1 else None


def _wrap_aad(wrap_format: int, key_id: str, version: int, context: dict[str, str]) -> bytes:
    pairs = [part for name in sorted(context) for part in (name, context[name])]
    tag = _WRAP_FORMATS[wrap_format][1]
    if wrap_format == 1:
        return encode_fields(tag, key_id, *pairs)
    return encode_fields(tag, key_id, str(version), *pairs)


def _validate_alias(alias: object) -> None:
    if not isinstance(alias, str) or not alias.startswith(_ALIAS_PREFIX):
        raise InvalidParameterException(
            f"Invalid alias {_shown(alias)}: an alias must begin with 'alias/'.")
    if len(alias) > _ALIAS_MAX:
        raise InvalidParameterException(
            f"Invalid alias {_shown(alias)}: an alias is at most {_ALIAS_MAX} characters long.")
    if not _ALIAS_RE.match(alias):
        raise InvalidParameterException(
            f"Invalid alias {_shown(alias)}: after 'alias/' an alias needs at least one of "
            "the characters A-Z, a-z, 0-9, '/', '_' and '-', and no others.")
    if alias.startswith(_RESERVED_ALIAS_PREFIX):
        raise InvalidParameterException(
            f"Invalid alias {_shown(alias)}: the prefix 'alias/aws/' is reserved.")


def _key_not_found(key_ref: str) -> InvalidParameterException:
    return InvalidParameterException(f"KMS key {_shown(key_ref)} not found.")


def _shown(value: object) -> str:
    """A caller-supplied name, quoted and cut short so a huge one can't flood a message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_REF_MAX else text[:_SHOWN_REF_MAX] + "..."


def _is_key_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
