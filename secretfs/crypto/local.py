"""The local key provider: master keys kept in a JSON key file in the state directory.

This module owns the key file (its format, its 0600 permissions, its atomic rewrite), the
KMS-style naming of master keys (key id, key ARN, aliases, alias ARNs) and the wrapping of
data keys under a master key with AES-256-GCM. The file holds the master keys in base64;
it never holds a data key, wrapped or not: wrapped data keys live in the store next to the
values they protect.

One process (the daemon) owns a key file; ``create_key`` rewrites it without locking
against other processes.

Sealed key files: the master key may come from a systemd credential instead
(``LoadCredentialEncrypted=secretfs-master-key:...``, read from
``$CREDENTIALS_DIRECTORY/secretfs-master-key``). The credential holds the default key's
material (base64); the key file then keeps every key's id, aliases and dates, and each
key's material only sealed (AES-256-GCM under a key derived from the credential), so the
file alone opens nothing. A plaintext key file is sealed the first time it is loaded with
a matching credential; ``export_master_key`` gives the credential's content.
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
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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
_WRAP_VERSION = 1
_NONCE_SIZE, _TAG_SIZE = 12, 16
_WRAP_AAD_TAG = "secretfs/wrap/v1"

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
_SEALED_BY = f"credential:{CREDENTIAL_NAME}"
_SEAL_AAD_TAG = "secretfs/key-file-seal/v1"


def credential_path() -> Path | None:
    """``$CREDENTIALS_DIRECTORY/secretfs-master-key`` when systemd passed that credential."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    return path if path.is_file() else None


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


class _Sealer:
    """Seals key material in the key file under a key derived from the credential."""

    def __init__(self, master: bytes):
        self.master = master
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=_SEAL_AAD_TAG.encode()).derive(master)
        self._aead = AESGCM(kek)

    def seal(self, key_id: str, material: bytes) -> str:
        nonce = os.urandom(_NONCE_SIZE)
        body = self._aead.encrypt(nonce, material, encode_fields(_SEAL_AAD_TAG, key_id))
        return base64.b64encode(nonce + body).decode("ascii")

    def open(self, key_id: str, sealed: object) -> bytes:
        try:
            blob = base64.b64decode(sealed, validate=True)  # type: ignore[arg-type]
            return self._aead.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:],
                                      encode_fields(_SEAL_AAD_TAG, key_id))
        except (binascii.Error, TypeError, ValueError, InvalidTag):
            raise ValueError(f"key {key_id}: SealedKeyMaterial does not open with the "
                             f"credential {CREDENTIAL_NAME} (not this key file's "
                             "master key?)") from None


@dataclass(frozen=True, slots=True)
class _MasterKey:
    key_id: str
    aliases: tuple[str, ...]
    description: str | None
    created: datetime
    material: bytes = field(repr=False)
    aead: AESGCM = field(repr=False, compare=False)

    @classmethod
    def generate(cls, *, aliases: tuple[str, ...], description: str | None) -> _MasterKey:
        material = os.urandom(MASTER_KEY_SIZE)
        return cls(key_id=str(uuid.uuid4()), aliases=aliases, description=description,
                   created=datetime.now(UTC), material=material, aead=AESGCM(material))

    @classmethod
    def from_json(cls, entry: object, sealer: _Sealer | None = None) -> _MasterKey:
        """One key from the file; messages name the field at fault, never its value."""
        if not isinstance(entry, dict):
            raise ValueError("a key entry is not an object")
        key_id = entry.get("KeyId")
        if not isinstance(key_id, str) or not _is_key_id(key_id):
            raise ValueError("a key entry has no valid KeyId")
        if "SealedKeyMaterial" in entry:
            if sealer is None:
                raise ValueError(f"key {key_id}: its material is sealed, and no credential "
                                 "was given to open it")
            material = sealer.open(key_id, entry["SealedKeyMaterial"])
        elif sealer is not None:
            raise ValueError(f"key {key_id}: a sealed key file holds no plaintext KeyMaterial")
        else:
            try:
                material = base64.b64decode(entry.get("KeyMaterial", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError(f"key {key_id}: KeyMaterial is not base64") from None
        if len(material) != MASTER_KEY_SIZE:
            raise ValueError(f"key {key_id}: KeyMaterial is not {MASTER_KEY_SIZE} bytes")
        aliases = entry.get("Aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"key {key_id}: Aliases is not a list of strings")
        description = entry.get("Description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"key {key_id}: Description is not a string")
        try:
            created = datetime.fromisoformat(entry["CreationDate"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"key {key_id}: CreationDate is not an ISO 8601 date") from None
        if created.tzinfo is None:
            raise ValueError(f"key {key_id}: CreationDate has no time zone")
        return cls(key_id=key_id, aliases=tuple(aliases), description=description,
                   created=created, material=material, aead=AESGCM(material))

    def to_json(self, sealer: _Sealer | None = None) -> dict:
        entry = {
            "KeyId": self.key_id,
            "Aliases": list(self.aliases),
            "Description": self.description,
            "CreationDate": self.created.isoformat(),
        }
        if sealer is None:
            entry["KeyMaterial"] = base64.b64encode(self.material).decode("ascii")
        else:
            entry["SealedKeyMaterial"] = sealer.seal(self.key_id, self.material)
        return entry


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
    """Master keys from a local key file; implements ``secretfs.crypto.KeyProvider``."""

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
        if sealer is not None:
            default = self._index.keys[self._index.ids_by_alias[DEFAULT_ALIAS]]
            if not hmac.compare_digest(default.material, sealer.master):
                raise ValueError(f"the credential {CREDENTIAL_NAME} is not the master key of "
                                 f"key file {path} (see 'secretfs export-master-key')")
        self._lock = threading.Lock()  # serialises create_key; readers use self._index

    @property
    def sealed(self) -> bool:
        """Whether the key file holds key material only sealed by the credential."""
        return self._sealer is not None

    def __repr__(self) -> str:
        return f"LocalKeyProvider(path={str(self._path)!r}, keys={len(self._index.keys)})"

    @classmethod
    def create(cls, path: Path, *, region: str, account_id: str,
               sealed: bool = False) -> LocalKeyProvider:
        """Create the key file with its default key; FileExistsError if it exists.
        ``sealed``: the file never holds the master key (``master_key()`` returns it, for
        the credential)."""
        path = Path(path)
        default = _MasterKey.generate(aliases=(DEFAULT_ALIAS,), description=DEFAULT_DESCRIPTION)
        provider = cls(path, [default], region=region, account_id=account_id,
                       sealer=_Sealer(default.material) if sealed else None)
        # Written in place rather than renamed over: O_EXCL is what refuses an existing file.
        write_new_file(path, provider._serialize())
        fsync_directory(path.parent)
        return provider

    @classmethod
    def load(cls, path: Path, *, region: str, account_id: str,
             credential: bytes | None = None) -> LocalKeyProvider:
        """Load a key file, refusing one that group or others may read or write.

        With ``credential`` (the master key from a systemd credential) the file's key
        material is opened with it, and a file that still holds plaintext material is
        sealed now, once the credential is known to be its master key."""
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
            sealed = doc.get("SealedBy") == _SEALED_BY
        except ValueError as exc:
            raise ValueError(f"key file {path} is invalid: {exc}") from None
        if sealed and credential is None:
            raise ValueError(
                f"key file {path} holds its keys sealed by the systemd credential "
                f"{CREDENTIAL_NAME}, and $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} is missing "
                "(LoadCredentialEncrypted= in the unit)")
        sealer = None if credential is None else _Sealer(bytes(credential))
        try:
            keys = [_MasterKey.from_json(entry, sealer if sealed else None)
                    for entry in entries]
            provider = cls(path, keys, region=region, account_id=account_id, sealer=sealer)
        except ValueError as exc:
            raise ValueError(f"key file {path} is invalid: {exc}") from None
        if sealer is not None and not sealed:
            provider._persist(provider._index)  # the plaintext material leaves the file
        return provider

    def master_key(self) -> bytes:
        """The credential's content (base64 of the default key's material, one line)."""
        default = self._index.keys[self._index.ids_by_alias[DEFAULT_ALIAS]]
        return base64.b64encode(default.material) + b"\n"

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
            new_index = _Index.build([*index.keys.values(), key])
            # Persist first: if the write fails, memory still matches the file.
            self._persist(new_index)
            self._index = new_index
        return self._describe(key)

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
        """version(1) || nonce(12) || AES-256-GCM(data key) under the master key."""
        key = self._key(key_id, EncryptionFailure)
        nonce = os.urandom(_NONCE_SIZE)
        body = key.aead.encrypt(nonce, data_key, _wrap_aad(key_id, context))
        return bytes([_WRAP_VERSION]) + nonce + body

    def unwrap(self, key_id: str, wrapped: bytes, context: dict[str, str]) -> bytearray:
        """The data key, in a bytearray the caller should zero after use."""
        key = self._key(key_id, DecryptionFailure)
        header = 1 + _NONCE_SIZE
        if len(wrapped) < header + _TAG_SIZE or wrapped[0] != _WRAP_VERSION:
            raise DecryptionFailure(
                f"The wrapped data key for KMS key {key_id} is malformed or in an unknown format.")
        nonce, body = wrapped[1:header], wrapped[header:]
        data_key = bytearray(len(body) - _TAG_SIZE)
        try:
            # decrypt_into writes straight into data_key, so no unwipeable bytes copy is made.
            key.aead.decrypt_into(nonce, body, _wrap_aad(key_id, context), data_key)
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
        }

    def _serialize(self, index: _Index | None = None) -> bytes:
        keys = (index or self._index).keys.values()
        doc: dict = {"Format": _FILE_FORMAT}
        if self._sealer is not None:
            doc["SealedBy"] = _SEALED_BY
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


def export_master_key(path: Path, *, region: str, account_id: str) -> bytes:
    """The content of the ``secretfs-master-key`` credential for an unsealed key file
    (read only: the file is sealed when the daemon first starts with the credential)."""
    try:
        with open(path, "rb") as file:
            sealed = json.loads(file.read()).get("SealedBy") == _SEALED_BY
    except (UnicodeDecodeError, ValueError, AttributeError):
        sealed = False  # load() below says what is wrong with it
    if sealed:
        raise ValueError(f"key file {path} is already sealed: its master key is only in the "
                         f"systemd credential {CREDENTIAL_NAME}")
    return LocalKeyProvider.load(path, region=region, account_id=account_id).master_key()


def _wrap_aad(key_id: str, context: dict[str, str]) -> bytes:
    pairs = [part for name in sorted(context) for part in (name, context[name])]
    return encode_fields(_WRAP_AAD_TAG, key_id, *pairs)


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
