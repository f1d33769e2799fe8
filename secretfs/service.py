"""Every Secrets Manager rule, once: versions, staging labels, idempotency tokens,
version retention, deletion windows, and the names-as-directories rule.

Each AWS action is a method taking the caller and the request's members by
their AWS names, returning the response's members; `call()` dispatches by
action name, so the API adapter stays a translation of bytes. The filesystem
uses the read-side helpers at the bottom. Mutations run one store transaction,
then refresh the catalog so the filesystem sees the committed state at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import inspect
import json
import math
import random
import re
import secrets
import string
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from secretfs import model, policy, presentation, templates
from secretfs.access_keys import AccessKeys, principal_caller
from secretfs.catalog import Catalog
from secretfs.crypto import KeyProvider
from secretfs.crypto.envelope import Sealed, seal, unseal
from secretfs.identity import SYSTEM, Caller, Identity, Sessions
from secretfs.model import (
    AWSCURRENT,
    AWSPENDING,
    AWSPREVIOUS,
    InvalidNextTokenException,
    InvalidParameterException,
    InvalidRequestException,
    LimitExceededException,
    ResourceExistsException,
    ResourceNotFoundException,
    Secret,
    ServiceUnavailable,
    ValidationException,
)
from secretfs.passwords import random_password
from secretfs.policy import Authorizer
from secretfs.rekey import Rekeying
from secretfs.rotation import rotators, schedule
from secretfs.store import SealedValue, StoreError

MARKED_FOR_DELETION = (
    "You can't perform this operation on the secret because it was marked for deletion.")
NOT_FOUND = "Secrets Manager can't find the specified secret."


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _snake(action: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower()


class SecretsManagerService:
    AWS_ACTIONS = frozenset({
        "CreateSecret", "PutSecretValue", "GetSecretValue", "BatchGetSecretValue",
        "UpdateSecret", "UpdateSecretVersionStage", "DescribeSecret", "ListSecrets",
        "ListSecretVersionIds", "DeleteSecret", "RestoreSecret", "TagResource",
        "UntagResource", "GetRandomPassword", "PutResourcePolicy", "GetResourcePolicy",
        "DeleteResourcePolicy", "ValidateResourcePolicy", "RotateSecret", "CancelRotateSecret",
    })
    # Actions that change state: each success is one more audit record.
    MUTATIONS = frozenset({
        "CreateSecret", "PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage",
        "DeleteSecret", "RestoreSecret", "TagResource", "UntagResource", "PutResourcePolicy",
        "DeleteResourcePolicy", "CreateKey", "PutIdentityPolicy", "DeleteIdentityPolicy",
        "RotateSecret", "CancelRotateSecret", "CreateAccessKey", "DeleteAccessKey",
        "RotateKey", "RetireKeyVersions", "ReEncrypt",
    })
    # Reads answered from what this host holds: refused while it may be stale.
    CURRENT_READS = frozenset({
        "GetSecretValue", "BatchGetSecretValue", "DescribeSecret", "ListSecrets",
        "ListSecretVersionIds",
    })
    EXTENSION_ACTIONS = frozenset({
        "CreateKey", "ListKeys", "PutIdentityPolicy", "GetIdentityPolicy",
        "DeleteIdentityPolicy", "ListIdentityPolicies", "CreateAccessKey", "ListAccessKeys",
        "DeleteAccessKey", "GetStatus", "Refresh", "RotateKey", "RetireKeyVersions",
        "ReEncrypt", "GetReEncryptStatus",
    })

    def __init__(self, store, keys: KeyProvider, *, region: str, account_id: str,
                 authorizer=None, clock: Callable[[], datetime] = _utcnow,
                 rng: random.Random | None = None):
        self.store = store
        self.keys = keys
        self.region = region
        self.account_id = account_id
        self.authorizer = authorizer or Authorizer(clock=clock)
        self.now = clock
        # Where inside a rotation window the next rotation starts.
        self._rng = rng or random.SystemRandom()
        self.catalog = Catalog(store)
        # Serializes mutations so commits and catalog refreshes happen in one order.
        self._mutation_lock = threading.RLock()
        self._pending_access: dict[tuple[int, str], datetime] = {}
        # Today's date for LastAccessedDate, and from and until when it is today, in
        # seconds since the epoch: time.time() with the daemon's clock, cheaper to read
        # on every open than a datetime.
        self._access_day: tuple[datetime, float, float] | None = None
        self._seconds = time.time if clock is _utcnow else (lambda: clock().timestamp())
        self._policy_listeners: list[Callable[[], None]] = []
        # Told when a rotation was requested, so the runner need not wait its turn.
        self.rotation_listeners: list[Callable[[], None]] = []
        # Rotation steps in progress, by the RotationToken handed to their rotator.
        self.sessions = Sessions()
        self.access_keys = AccessKeys(store, keys)
        # Master-key rotation and the re-encryption of stored data keys (secretfs/rekey.py).
        self.rekeying = Rekeying(store, keys, on_moved=self._rekeyed)
        self.policy_generation = 0
        # The daemon's side of `secretfs status` and `refresh` (secretfs/control.py).
        self.control = None
        # The change feed of a store other hosts write too (secretfs/fleet.py).
        self.feed = None
        self._load_policies()

    # --- dispatch ---------------------------------------------------------------

    def call(self, action: str, params: dict, caller: Caller) -> dict:
        if action not in self.AWS_ACTIONS and action not in self.EXTENSION_ACTIONS:
            raise model.UnknownOperationException(f"Unknown action {action!r}.")
        method = getattr(self, _snake(action))
        if action in self.CURRENT_READS:
            self._require_current()
        if action == "PutSecretValue" and params.get("RotationToken") is not None:
            caller = self._rotation_caller(params["RotationToken"])
        try:
            bound = inspect.signature(method).bind(caller, **params)
        except TypeError as error:
            raise ValidationException(f"Invalid parameters for {action}: {error}") from None
        try:
            result = method(*bound.args, **bound.kwargs)
        except StoreError as error:
            raise ServiceUnavailable(f"The store can't complete the request: {error}") from None
        if action in self.MUTATIONS:
            self.authorizer.record_mutation(caller, action, params, result)
        return result

    def _rotation_caller(self, token: str) -> Caller:
        """PutSecretValue's RotationToken: as in AWS, the call is made as the rotation's
        principal the token stands for, and a token that stands for none is refused."""
        found = self.sessions.caller(token)
        if found is None:
            raise model.AccessDeniedException(
                "The RotationToken doesn't belong to a rotation step in progress.")
        return found

    def _authorize(self, caller: Caller, action: str, secret: Secret | None = None,
                   **request) -> None:
        self.authorizer.check(caller, action, secret, **request)

    # --- resolving SecretId ---------------------------------------------------

    def _lookup(self, secret_id: str) -> int:
        if not isinstance(secret_id, str) or not secret_id:
            raise InvalidParameterException("You must provide a SecretId.")
        if model.looks_like_arn(secret_id):
            found = self.catalog.id_by_arn(secret_id)
            if found is None:
                with self.store.read() as reader:
                    matches = reader.find_arn_prefix(secret_id)
                found = matches[0] if len(matches) == 1 else None
        else:
            found = self.catalog.id_by_name(secret_id)
        if found is None:
            raise ResourceNotFoundException(NOT_FOUND)
        return found

    def _secret(self, secret_id: str) -> Secret:
        secret = self.catalog.get(self._lookup(secret_id))
        if secret is None:
            raise ResourceNotFoundException(NOT_FOUND)
        return secret

    def _mutate(self, secret_id: int, change: Callable) -> tuple[object, Secret | None]:
        """Run `change(writer, fresh_secret)` in one transaction, then refresh."""
        with self._mutation_lock:
            with self.store.write() as writer:
                fresh = writer.load(secret_id)
                if fresh is None:
                    raise ResourceNotFoundException(NOT_FOUND)
                result = change(writer, fresh)
            return result, self.catalog.refresh(secret_id)

    # --- values -----------------------------------------------------------------

    @staticmethod
    def _value(SecretString, SecretBinary, *, required: bool) -> tuple[bytes, bool] | None:
        if SecretString is not None and SecretBinary is not None:
            raise InvalidParameterException(
                "You can't specify both a binary secret value and a string secret value "
                "in the same secret.")
        if SecretString is not None:
            if not isinstance(SecretString, str) or not SecretString:
                raise InvalidParameterException("SecretString must be a non-empty string.")
            data, is_binary = SecretString.encode("utf-8"), False
        elif SecretBinary is not None:
            if isinstance(SecretBinary, str):
                try:
                    SecretBinary = base64.b64decode(SecretBinary, validate=True)
                except binascii.Error:
                    raise InvalidParameterException(
                        "SecretBinary must be base64-encoded.") from None
            if not isinstance(SecretBinary, bytes | bytearray) or not SecretBinary:
                raise InvalidParameterException("SecretBinary must be non-empty bytes.")
            data, is_binary = bytes(SecretBinary), True
        elif required:
            raise InvalidParameterException(
                "You must provide either SecretString or SecretBinary.")
        else:
            return None
        if len(data) > model.VALUE_MAX:
            raise InvalidParameterException(
                f"The secret value is {len(data)} bytes; the maximum is {model.VALUE_MAX}.")
        return data, is_binary

    def _seal(self, secret: Secret, version_id: str, data: bytes, is_binary: bool) -> SealedValue:
        key_id = self.keys.resolve(secret.kms_key_id)
        sealed = seal(self.keys, key_id, data, arn=secret.arn, version_id=version_id,
                      binary=is_binary)
        return SealedValue(sealed.ciphertext, sealed.wrapped_key, sealed.key_id, is_binary)

    def _seal_ahead(self, secret: Secret, version_id: str,
                    value: tuple[bytes, bool]) -> tuple[str, str | None, SealedValue] | None:
        """A new version's value sealed before its write transaction begins: with KMS its
        data key is a network round trip, which must not hold the store's write lock (on
        a shared store every host's writes wait for that lock). None for a version that
        already holds a value (an idempotent repeat, compared inside the transaction).
        `_add_version` uses it only if the secret's ARN and key are still the ones it was
        sealed for."""
        existing = secret.versions.get(version_id)
        if existing is not None and existing.size is not None:
            return None
        return secret.arn, secret.kms_key_id, self._seal(secret, version_id, *value)

    def _decrypt(self, secret: Secret, version_id: str) -> tuple[bytes, bool] | None:
        with self.store.read() as reader:
            stored = reader.sealed_value(secret.secret_id, version_id)
        if stored is None:
            return None
        plaintext = unseal(self.keys, Sealed(stored.ciphertext, stored.wrapped_key, stored.key_id),
                           arn=secret.arn, version_id=version_id, binary=stored.is_binary)
        return plaintext, stored.is_binary

    # --- the names-as-directories rule ----------------------------------------

    def _check_tree(self, reader, path: str) -> None:
        """A new secret's directory may not collide with what a secret's directory holds.

        Directly below a secret, the names `versions`, `keys`, the AWS labels and
        the secret's own labels belong to the secret; a child secret can't take them.
        """
        segments = path.split("/")
        for depth in range(1, len(segments)):
            ancestor = reader.find(path="/".join(segments[:depth]))
            if ancestor is None:
                continue
            child = segments[depth]
            holder = reader.load(ancestor)
            taken = {model.file_name(label) for label in holder.labels}
            if child in model.RESERVED_SEGMENTS or child in taken:
                raise InvalidParameterException(
                    f"The name segment {child!r} can't be used below secret "
                    f"{holder.name!r}: that secret's directory uses it "
                    "(versions, keys and staging labels are reserved there).")
        for below in reader.paths_below(path):
            child = below[len(path) + 1:].split("/")[0]
            if child in model.RESERVED_SEGMENTS:
                raise InvalidParameterException(
                    f"A secret at {path!r} would own the name {child!r}, which the existing "
                    f"secret at {below!r} already uses as a directory.")

    def _check_label_fits(self, reader, secret: Secret, label: str) -> None:
        name = model.file_name(label)
        if name in ("versions", "keys"):
            raise InvalidParameterException(
                f"The staging label {label!r} is reserved in the secret's directory.")
        for below in reader.paths_below(secret.path):
            if below[len(secret.path) + 1:].split("/")[0] == name:
                raise InvalidParameterException(
                    f"The staging label {label!r} would collide with the directory of "
                    f"secret {below!r}.")

    # --- labels and versions ----------------------------------------------------

    def _attach(self, writer, secret: Secret, version_id: str, stages: list[str]) -> None:
        labels = dict(secret.labels)
        for label in stages:
            model.validate_label(label)
            if label not in model.AWS_LABELS and label not in labels:
                self._check_label_fits(writer, secret, label)
            previous = labels.get(label)
            if previous == version_id:
                continue
            writer.set_label(secret.secret_id, label, version_id)
            labels[label] = version_id
            if label == AWSCURRENT and previous is not None and AWSPREVIOUS not in stages:
                writer.set_label(secret.secret_id, AWSPREVIOUS, previous)
                labels[AWSPREVIOUS] = previous
        rotating = ((secret.rotation or {}).get("Pending") or {}).get("Token")
        if AWSCURRENT in stages and rotating == version_id:
            # A rotation's finishSecret: only then does AWSPENDING go away by itself.
            self._finish_rotation(writer, secret, version_id)

    @staticmethod
    def _check_labels(after: Secret) -> None:
        counts: dict[str, int] = {}
        for version_id in after.labels.values():
            counts[version_id] = counts.get(version_id, 0) + 1
        for version_id, count in counts.items():
            if count > model.LABELS_PER_VERSION:
                raise LimitExceededException(
                    f"Version {version_id} would have {count} staging labels; the maximum "
                    f"is {model.LABELS_PER_VERSION}.")

    def _prune(self, writer, secret_id: int) -> None:
        after = writer.load(secret_id)
        excess = len(after.versions) - model.VERSIONS_KEPT
        if excess <= 0:
            return
        labelled = set(after.labels.values())
        cutoff = self.now() - timedelta(seconds=model.DEPRECATED_MIN_AGE_SECONDS)
        for version in after.versions.values():  # oldest first
            if excess <= 0:
                break
            if version.version_id not in labelled and version.created < cutoff:
                writer.delete_version(secret_id, version.version_id)
                excess -= 1

    def _add_version(self, writer, secret: Secret, token: str | None, value: tuple[bytes, bool],
                     stages: list[str], *, ahead=None) -> str:
        """Create (or idempotently repeat) a version; returns its id. `ahead`: the value
        as `_seal_ahead` sealed it outside the transaction."""
        version_id = model.validate_token(token) if token is not None else model.new_token()
        data, is_binary = value
        existing = secret.versions.get(version_id)
        if existing is not None and existing.size is not None:
            stored = self._decrypt(secret, version_id)
            if stored is None or stored[1] != is_binary or not hmac.compare_digest(
                    stored[0], data):
                raise ResourceExistsException(
                    f"You can't modify an existing version ({version_id}); "
                    "use a new ClientRequestToken to create a new version.")
            return version_id
        if existing is None:
            self._prune(writer, secret.secret_id)
            secret = writer.load(secret.secret_id)
            if AWSCURRENT not in secret.labels and AWSCURRENT not in stages:
                # AWS: the first version of a secret always gets AWSCURRENT.
                stages = [*stages, AWSCURRENT]
        if existing is None and len(secret.versions) >= model.VERSIONS_MAX:
            raise LimitExceededException(
                f"The secret already has {len(secret.versions)} versions created in the last "
                "24 hours; wait before adding more.")
        if ahead is not None and ahead[:2] == (secret.arn, secret.kms_key_id):
            sealed = ahead[2]
        else:
            sealed = self._seal(secret, version_id, data, is_binary)
        if existing is None:
            writer.insert_version(secret.secret_id, version_id, created=self.now(),
                                  sealed=sealed, is_binary=is_binary)
        else:  # a version created empty (by rotation) receives its value
            writer.fill_version(secret.secret_id, version_id, sealed)
        self._attach(writer, secret, version_id, stages)
        self._check_labels(writer.load(secret.secret_id))
        self._prune(writer, secret.secret_id)
        return version_id

    # --- actions: create and change ----------------------------------------------

    def create_secret(self, caller: Caller, Name, ClientRequestToken=None, Description=None,
                      KmsKeyId=None, SecretBinary=None, SecretString=None, Tags=None,
                      AddReplicaRegions=None, ForceOverwriteReplicaSecret=None, Type=None,
                      CrossAccountPrimaryARN=None):
        self._authorize(caller, "CreateSecret")
        model.validate_name(Name)
        if AddReplicaRegions or CrossAccountPrimaryARN:
            raise InvalidRequestException("secretfs doesn't replicate secrets across regions.")
        if Type:
            raise InvalidParameterException("secretfs doesn't support managed external secrets.")
        self._check_description(Description)
        tags = self._validate_tags(Tags or [])
        if len(tags) > model.TAGS_MAX:
            raise InvalidParameterException(f"A secret can have at most {model.TAGS_MAX} tags.")
        value = self._value(SecretString, SecretBinary, required=False)
        if ClientRequestToken is not None:
            model.validate_token(ClientRequestToken)
        kms_key_id = KmsKeyId or None
        if kms_key_id:
            self.keys.resolve(kms_key_id)
        path = "/".join(model.name_segments(Name))
        with self._mutation_lock:
            existing = self.catalog.id_by_name(Name)
            if existing is not None:
                return self._repeat_create(existing, Name, ClientRequestToken, value)
            with self.store.write() as writer:
                if writer.find(path=path) is not None:
                    raise ResourceExistsException(
                        f"The secret {Name} maps to the directory {path!r}, which another "
                        "secret already uses.")
                self._check_tree(writer, path)
                now = self.now()
                arn = self._new_arn(writer, Name)
                secret_id = writer.insert_secret(
                    name=Name, path=path, arn=arn, description=Description,
                    kms_key_id=kms_key_id, created=now)
                writer.set_tags(secret_id, tags)
                version_id = None
                if value is not None:
                    version_id = self._add_version(
                        writer, writer.load(secret_id), ClientRequestToken, value, [AWSCURRENT])
            self.catalog.refresh(secret_id)
        response = {"ARN": arn, "Name": Name}
        if version_id:
            response["VersionId"] = version_id
        return response

    def _repeat_create(self, secret_id: int, name: str, token: str | None, value) -> dict:
        """CreateSecret retried with the same token and value succeeds as before."""
        secret = self.catalog.get(secret_id)
        if secret.is_deleted:
            raise InvalidRequestException(
                "You can't create this secret because a secret with this name is already "
                "scheduled for deletion.")
        if token is not None and value is not None and token in secret.versions:
            stored = self._decrypt(secret, token)
            if stored is not None and stored[1] == value[1] and hmac.compare_digest(
                    stored[0], value[0]):
                return {"ARN": secret.arn, "Name": secret.name, "VersionId": token}
        raise ResourceExistsException(f"The operation failed because the secret {name} already exists.")

    def _new_arn(self, reader, name: str) -> str:
        alphabet = string.ascii_letters + string.digits
        while True:
            suffix = "".join(secrets.choice(alphabet) for _ in range(6))
            arn = (f"arn:aws:secretsmanager:{self.region}:{self.account_id}:secret:"
                   f"{name}-{suffix}")
            if reader.find(arn=arn) is None:
                return arn

    @staticmethod
    def _named(secret: Secret, version_id: str | None = None) -> dict:
        """The ARN and Name most responses carry, and the VersionId when there is one."""
        response = {"ARN": secret.arn, "Name": secret.name}
        if version_id:
            response["VersionId"] = version_id
        return response

    @staticmethod
    def _check_description(description) -> None:
        if description is not None and (
                not isinstance(description, str) or len(description) > model.DESCRIPTION_MAX):
            raise InvalidParameterException(
                f"Description must be a string of at most {model.DESCRIPTION_MAX} characters.")

    def put_secret_value(self, caller: Caller, SecretId, ClientRequestToken=None,
                         SecretBinary=None, SecretString=None, VersionStages=None,
                         RotationToken=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "PutSecretValue", secret)
        value = self._value(SecretString, SecretBinary, required=True)
        stages = self._stages(VersionStages)
        token = (model.validate_token(ClientRequestToken) if ClientRequestToken is not None
                 else model.new_token())
        ahead = self._seal_ahead(secret, token, value)

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            version_id = self._add_version(writer, fresh, token, value, stages, ahead=ahead)
            writer.update_secret(fresh.secret_id, changed=self.now())
            return version_id

        version_id, after = self._mutate(secret.secret_id, change)
        return {"ARN": after.arn, "Name": after.name, "VersionId": version_id,
                "VersionStages": after.stages_of(version_id)}

    @staticmethod
    def _stages(stages) -> list[str]:
        if stages is None:
            return [AWSCURRENT]
        if not isinstance(stages, list) or not stages:
            raise InvalidParameterException("VersionStages must be a non-empty list of labels.")
        if len(stages) > model.LABELS_PER_VERSION:
            raise InvalidParameterException(
                f"A version can have at most {model.LABELS_PER_VERSION} staging labels.")
        return [model.validate_label(label) for label in stages]

    @staticmethod
    def _require_live(secret: Secret) -> None:
        if secret.is_deleted:
            raise InvalidRequestException(MARKED_FOR_DELETION)

    def update_secret(self, caller: Caller, SecretId, ClientRequestToken=None, Description=None,
                      KmsKeyId=None, SecretBinary=None, SecretString=None, Type=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "UpdateSecret", secret)
        if Type:
            raise InvalidParameterException("secretfs doesn't support managed external secrets.")
        self._check_description(Description)
        value = self._value(SecretString, SecretBinary, required=False)
        if KmsKeyId:
            self.keys.resolve(KmsKeyId)

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            fields = {}
            if Description is not None:
                fields["description"] = Description
            if KmsKeyId is not None:
                # New versions use the new key; existing versions keep the key
                # they were sealed with (recorded per version), so they still open.
                fields["kms_key_id"] = KmsKeyId or None
            if fields:
                writer.update_secret(fresh.secret_id, **fields)
            version_id = None
            if value is not None:
                version_id = self._add_version(
                    writer, writer.load(fresh.secret_id), ClientRequestToken, value,
                    [AWSCURRENT])
            if fields or value is not None:
                writer.update_secret(fresh.secret_id, changed=self.now())
            return version_id

        version_id, after = self._mutate(secret.secret_id, change)
        return self._named(after, version_id)

    def update_secret_version_stage(self, caller: Caller, SecretId, VersionStage,
                                    RemoveFromVersionId=None, MoveToVersionId=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "UpdateSecretVersionStage", secret)
        label = model.validate_label(VersionStage)
        if RemoveFromVersionId is None and MoveToVersionId is None:
            raise InvalidParameterException(
                "Specify RemoveFromVersionId, MoveToVersionId, or both.")

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            holder = fresh.labels.get(label)
            if RemoveFromVersionId is not None:
                if RemoveFromVersionId not in fresh.versions:
                    raise InvalidParameterException(
                        f"Not a valid version: {RemoveFromVersionId}")
                if holder != RemoveFromVersionId:
                    raise InvalidParameterException(
                        f"The staging label {label} is not attached to version "
                        f"{RemoveFromVersionId}.")
            if MoveToVersionId is None:
                if label == AWSCURRENT:
                    raise InvalidParameterException(
                        "You can't remove AWSCURRENT from a version without moving it to "
                        "another version with MoveToVersionId.")
                writer.remove_label(fresh.secret_id, label)
            else:
                target = fresh.versions.get(MoveToVersionId)
                if target is None:
                    raise ResourceNotFoundException(
                        f"Secrets Manager can't find the specified secret version: "
                        f"{MoveToVersionId}")
                if holder is not None and holder not in (MoveToVersionId, RemoveFromVersionId):
                    raise InvalidParameterException(
                        f"The parameter RemoveFromVersionId can't be empty. Staging label "
                        f"{label} is currently attached to version {holder}, so you must "
                        "explicitly reference that version in RemoveFromVersionId.")
                if label == AWSCURRENT and target.size is None:
                    raise InvalidRequestException(
                        f"Version {MoveToVersionId} has no value yet; AWSCURRENT can't move "
                        "to it.")
                self._attach(writer, fresh, MoveToVersionId, [label])
                self._check_labels(writer.load(fresh.secret_id))
            writer.update_secret(fresh.secret_id, changed=self.now())

        _, after = self._mutate(secret.secret_id, change)
        return {"ARN": after.arn, "Name": after.name}

    def tag_resource(self, caller: Caller, SecretId, Tags):
        secret = self._secret(SecretId)
        self._authorize(caller, "TagResource", secret)
        new_tags = self._validate_tags(Tags)

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            merged = dict(fresh.tags)
            merged.update(new_tags)
            if len(merged) > model.TAGS_MAX:
                raise LimitExceededException(f"A secret can have at most {model.TAGS_MAX} tags.")
            writer.set_tags(fresh.secret_id, list(merged.items()))
            writer.update_secret(fresh.secret_id, changed=self.now())

        self._mutate(secret.secret_id, change)
        return {}

    @staticmethod
    def _validate_tags(tags) -> list[tuple[str, str]]:
        """AWS's tag rules, and secretfs's own tags: presentation and templates."""
        pairs = model.validate_tags(tags)
        presentation.validate(pairs)
        templates.validate(pairs)
        return pairs

    def untag_resource(self, caller: Caller, SecretId, TagKeys):
        secret = self._secret(SecretId)
        self._authorize(caller, "UntagResource", secret)
        if not isinstance(TagKeys, list):
            raise InvalidParameterException("TagKeys must be a list of tag keys.")
        drop = {model.validate_tag_key(key) for key in TagKeys}

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            writer.set_tags(fresh.secret_id,
                            [(key, value) for key, value in fresh.tags if key not in drop])
            writer.update_secret(fresh.secret_id, changed=self.now())

        self._mutate(secret.secret_id, change)
        return {}

    # --- deletion ---------------------------------------------------------------

    def delete_secret(self, caller: Caller, SecretId, RecoveryWindowInDays=None,
                      ForceDeleteWithoutRecovery=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "DeleteSecret", secret)
        if ForceDeleteWithoutRecovery and RecoveryWindowInDays is not None:
            raise InvalidParameterException(
                "You can't use ForceDeleteWithoutRecovery in conjunction with "
                "RecoveryWindowInDays.")
        window = model.RECOVERY_WINDOW_DEFAULT if RecoveryWindowInDays is None else RecoveryWindowInDays
        if not isinstance(window, int) or not (
                model.RECOVERY_WINDOW_MIN <= window <= model.RECOVERY_WINDOW_MAX):
            raise InvalidParameterException(
                f"RecoveryWindowInDays must be between {model.RECOVERY_WINDOW_MIN} and "
                f"{model.RECOVERY_WINDOW_MAX} days.")
        now = self.now()
        if ForceDeleteWithoutRecovery:
            with self._mutation_lock:
                with self.store.write() as writer:
                    writer.delete_secret(secret.secret_id)
                self.catalog.refresh(secret.secret_id)
            return {"ARN": secret.arn, "Name": secret.name, "DeletionDate": now}

        def change(writer, fresh: Secret):
            if fresh.is_deleted:
                raise InvalidRequestException(
                    "You can't delete the secret because it is already scheduled for deletion.")
            deletion = now + timedelta(days=window)
            writer.update_secret(fresh.secret_id, deleted=deletion, changed=now)
            return deletion

        deletion, _ = self._mutate(secret.secret_id, change)
        return {"ARN": secret.arn, "Name": secret.name, "DeletionDate": deletion}

    def restore_secret(self, caller: Caller, SecretId):
        secret = self._secret(SecretId)
        self._authorize(caller, "RestoreSecret", secret)

        def change(writer, fresh: Secret):
            if not fresh.is_deleted:
                raise InvalidRequestException(
                    "You can't restore the secret because it isn't scheduled for deletion.")
            writer.update_secret(fresh.secret_id, deleted=None, changed=self.now())

        self._mutate(secret.secret_id, change)
        return {"ARN": secret.arn, "Name": secret.name}

    def purge_expired(self) -> int:
        """Remove secrets whose recovery window has passed; returns how many."""
        with self.store.read() as reader:
            expired = reader.expired(self.now().timestamp())
        purged = 0
        for secret_id in expired:
            with self._mutation_lock:
                with self.store.write() as writer:
                    fresh = writer.load(secret_id)
                    # Restored (or already gone) since the query above: keep it.
                    if fresh is None or fresh.deleted is None or fresh.deleted > self.now():
                        continue
                    writer.delete_secret(secret_id)
                self.catalog.refresh(secret_id)
                purged += 1
                self.authorizer.record_mutation(SYSTEM, "PurgeSecret", {}, {
                    "ARN": fresh.arn, "Name": fresh.name})
        return purged

    def next_deletion(self) -> datetime | None:
        with self.store.read() as reader:
            when = reader.next_deletion()
        return None if when is None else datetime.fromtimestamp(when, UTC)

    # --- actions: read ------------------------------------------------------------

    def get_secret_value(self, caller: Caller, SecretId, VersionId=None, VersionStage=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "GetSecretValue", secret, version_id=VersionId,
                        stages=(VersionStage,) if VersionStage else self._stages_asked(
                            secret, VersionId))
        return self._secret_value(secret, VersionId, VersionStage)

    @staticmethod
    def _stages_asked(secret: Secret, version_id: str | None) -> tuple[str, ...]:
        """secretsmanager:VersionStage of a read: AWSCURRENT unless a version is named."""
        if version_id is None:
            return (AWSCURRENT,)
        return tuple(secret.stages_of(version_id))

    def _secret_value(self, secret: Secret, version_id, stage) -> dict:
        self._require_live(secret)
        version_id = self.resolve_version(secret, version_id, stage)
        stored = self._decrypt(secret, version_id)
        if stored is None:
            raise ResourceNotFoundException(
                f"Secrets Manager can't find the specified secret value for VersionId: "
                f"{version_id}")
        data, is_binary = stored
        self.record_access(secret, version_id)
        response = {"ARN": secret.arn, "Name": secret.name, "VersionId": version_id,
                    "VersionStages": secret.stages_of(version_id),
                    "CreatedDate": secret.versions[version_id].created}
        if is_binary:
            response["SecretBinary"] = data
        else:
            response["SecretString"] = data.decode("utf-8")
        return response

    @staticmethod
    def resolve_version(secret: Secret, version_id: str | None, stage: str | None) -> str:
        if version_id is not None:
            if version_id not in secret.versions:
                raise ResourceNotFoundException(
                    f"Secrets Manager can't find the specified secret value for VersionId: "
                    f"{version_id}")
            if stage is not None and secret.labels.get(stage) != version_id:
                raise InvalidRequestException(
                    "You provided a VersionStage that is not associated to the provided "
                    "VersionId.")
            return version_id
        stage = stage or AWSCURRENT
        found = secret.labels.get(stage)
        if found is None:
            raise ResourceNotFoundException(
                f"Secrets Manager can't find the specified secret value for staging label: "
                f"{stage}")
        return found

    def batch_get_secret_value(self, caller: Caller, SecretIdList=None, Filters=None,
                               MaxResults=None, NextToken=None):
        self._authorize(caller, "BatchGetSecretValue")
        if (SecretIdList is None) == (Filters is None):
            raise InvalidParameterException(
                "Specify either SecretIdList or Filters, but not both.")
        values, errors, next_token = [], [], None
        if SecretIdList is not None:
            if NextToken is not None or MaxResults is not None:
                raise InvalidParameterException(
                    "NextToken and MaxResults apply only with Filters.")
            if not isinstance(SecretIdList, list) or not 1 <= len(SecretIdList) <= model.BATCH_MAX_IDS:
                raise InvalidParameterException(
                    f"SecretIdList must hold 1 to {model.BATCH_MAX_IDS} secret ids.")
            secrets_ = []
            for secret_id in SecretIdList:
                try:
                    secrets_.append((secret_id, self._secret(secret_id)))
                except model.SecretsManagerError as error:
                    errors.append(self._batch_error(secret_id, error))
        else:
            limit = MaxResults or model.BATCH_MAX_IDS
            if not isinstance(limit, int) or not 1 <= limit <= model.BATCH_MAX_IDS:
                raise InvalidParameterException(
                    f"MaxResults must be between 1 and {model.BATCH_MAX_IDS}.")
            page, next_token = self._page(Filters, limit, NextToken, False, "created-date", "asc",
                                          caller)
            secrets_ = [(secret.name, secret) for secret in page]
        for secret_id, secret in secrets_:
            try:
                self._authorize(caller, "GetSecretValue", secret, stages=(AWSCURRENT,))
                values.append(self._secret_value(secret, None, None))
            except model.SecretsManagerError as error:
                errors.append(self._batch_error(secret_id, error))
        response = {"SecretValues": values, "Errors": errors}
        if next_token:
            response["NextToken"] = next_token
        return response

    @staticmethod
    def _batch_error(secret_id: str, error: model.SecretsManagerError) -> dict:
        return {"SecretId": secret_id, "ErrorCode": error.code, "Message": error.message}

    def describe_secret(self, caller: Caller, SecretId):
        secret = self._secret(SecretId)
        self._authorize(caller, "DescribeSecret", secret)
        response = self._metadata(secret)
        response["VersionIdsToStages"] = self._versions_to_stages(secret)
        return response

    def _metadata(self, secret: Secret) -> dict:
        response = {"ARN": secret.arn, "Name": secret.name}
        if secret.description is not None:
            response["Description"] = secret.description
        if secret.kms_key_id:
            response["KmsKeyId"] = secret.kms_key_id
        rotation = secret.rotation or {}
        if rotation:
            response["RotationEnabled"] = bool(rotation.get("Enabled"))
            for key in ("RotationLambdaARN", "RotationRules"):
                if rotation.get(key) is not None:
                    response[key] = rotation[key]
            for key in ("LastRotatedDate", "NextRotationDate"):
                if rotation.get(key) is not None:
                    response[key] = datetime.fromtimestamp(rotation[key], UTC)
            pending = rotation.get("Pending")
            if pending:
                # secretfs's own member (AWS SDKs ignore members they don't know): where
                # an open rotation stands, and why its last attempt failed.
                response["RotationInProgress"] = {
                    key: value for key, value in (
                        ("VersionId", pending["Token"]),
                        ("LastCompletedStep", pending.get("Step")),
                        ("LastError", pending.get("Error")),
                        ("Attempts", pending.get("Attempts") or None),
                        ("NextAttemptDate", pending.get("RetryAt") and datetime.fromtimestamp(
                            pending["RetryAt"], UTC)),
                    ) if value is not None}
        response["LastChangedDate"] = secret.changed
        if secret.accessed is not None:
            response["LastAccessedDate"] = secret.accessed
        if secret.deleted is not None:
            response["DeletedDate"] = secret.deleted
        if secret.tags:
            response["Tags"] = [{"Key": key, "Value": value} for key, value in secret.tags]
        response["CreatedDate"] = secret.created
        return response

    @staticmethod
    def _versions_to_stages(secret: Secret) -> dict[str, list[str]]:
        mapping: dict[str, list[str]] = {}
        for label, version_id in sorted(secret.labels.items()):
            mapping.setdefault(version_id, []).append(label)
        return mapping

    def list_secret_version_ids(self, caller: Caller, SecretId, MaxResults=None, NextToken=None,
                                IncludeDeprecated=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "ListSecretVersionIds", secret)
        limit = self._limit(MaxResults, model.LIST_MAX_RESULTS)
        labelled = set(secret.labels.values())
        versions = [version for version in reversed(list(secret.versions.values()))
                    if IncludeDeprecated or version.version_id in labelled]
        cursor = self._decode_token(NextToken, "versions") if NextToken else [0]
        start = cursor[0] if len(cursor) == 1 else None
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InvalidNextTokenException("The NextToken value is invalid.")
        page = versions[start:start + limit]
        entries = []
        for version in page:
            entry = {"VersionId": version.version_id,
                     "VersionStages": secret.stages_of(version.version_id),
                     "CreatedDate": version.created}
            if version.last_accessed is not None:
                entry["LastAccessedDate"] = version.last_accessed
            if version.key_id:
                entry["KmsKeyIds"] = [self.keys.key_arn(version.key_id)]
            entries.append(entry)
        response = {"Versions": entries, "ARN": secret.arn, "Name": secret.name}
        if start + limit < len(versions):
            response["NextToken"] = self._encode_token("versions", start + limit)
        return response

    def list_secrets(self, caller: Caller, IncludePlannedDeletion=None, MaxResults=None,
                     NextToken=None, Filters=None, SortOrder=None, SortBy=None):
        self._authorize(caller, "ListSecrets")
        limit = self._limit(MaxResults, model.LIST_MAX_RESULTS)
        sort_by = SortBy or "created-date"
        if sort_by not in ("created-date", "last-accessed-date", "last-changed-date", "name"):
            raise InvalidParameterException(f"Invalid SortBy value {SortBy!r}.")
        if SortOrder not in (None, "asc", "desc"):
            raise InvalidParameterException(f"Invalid SortOrder value {SortOrder!r}.")
        page, next_token = self._page(Filters, limit, NextToken, bool(IncludePlannedDeletion),
                                      sort_by, SortOrder or "asc", caller)
        entries = []
        for secret in page:
            entry = self._metadata(secret)
            entry["SecretVersionsToStages"] = self._versions_to_stages(secret)
            entries.append(entry)
        response = {"SecretList": entries}
        if next_token:
            response["NextToken"] = next_token
        return response

    @staticmethod
    def _limit(value, maximum: int) -> int:
        if value is None:
            return maximum
        if not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidParameterException(f"MaxResults must be between 1 and {maximum}.")
        return value

    def _page(self, filters, limit: int, token: str | None, include_deleted: bool,
              sort_by: str, order: str, caller: Caller) -> tuple[list[Secret], str | None]:
        """A page of secrets matching the filters that the caller may see: names are
        listed only to whoever may describe or read the secret."""
        wanted = self._filter(filters)

        def match(secret: Secret) -> bool:
            return wanted(secret) and self.may_see(caller, secret)

        after = None
        if token:
            cursor = self._decode_token(token, f"secrets:{sort_by}:{order}")
            value_type = str if sort_by == "name" else (int, float)
            if (len(cursor) != 2 or not isinstance(cursor[1], int)
                    or isinstance(cursor[1], bool) or not isinstance(cursor[0], value_type)):
                raise InvalidNextTokenException("The NextToken value is invalid.")
            after = tuple(cursor)
        kind = f"secrets:{sort_by}:{order}"
        found: list[Secret] = []
        batch = max(limit * 2, 100)
        with self.store.read() as reader:
            def rows_after(cursor, count):
                return reader.ids_sorted(sort_by=sort_by, descending=order == "desc",
                                         include_deleted=include_deleted, after=cursor,
                                         limit=count)
            while True:
                rows = rows_after(after, batch)
                for cursor in rows:
                    secret = self.catalog.get(cursor[1])
                    if secret is None or not match(secret):
                        continue
                    found.append(secret)
                    if len(found) == limit:
                        more = rows_after(cursor, 1)
                        return found, self._encode_token(kind, *cursor) if more else None
                if len(rows) < batch:
                    return found, None
                after = rows[-1]

    def _filter(self, filters) -> Callable[[Secret], bool]:
        if not filters:
            return lambda secret: True
        if not isinstance(filters, list) or len(filters) > 10:
            raise InvalidParameterException("Filters must be a list of at most 10 filters.")
        checks = []
        for item in filters:
            key = item.get("Key") if isinstance(item, dict) else None
            values = item.get("Values") if isinstance(item, dict) else None
            if key not in ("description", "name", "tag-key", "tag-value", "primary-region",
                           "owning-service", "all"):
                raise InvalidParameterException(f"Invalid filter key {key!r}.")
            if not isinstance(values, list) or not values or not all(
                    isinstance(value, str) for value in values):
                raise InvalidParameterException(f"Filter {key!r} needs a list of values.")
            checks.append(self._filter_check(key, values))
        return lambda secret: all(check(secret) for check in checks)

    def _filter_check(self, key: str, values: list[str]) -> Callable[[Secret], bool]:
        def attributes(secret: Secret) -> tuple[list[str], bool]:
            if key == "name":
                return [secret.name], False
            if key == "description":
                return [secret.description or ""], True
            if key == "tag-key":
                return [k for k, _ in secret.tags], False
            if key == "tag-value":
                return [v for _, v in secret.tags], False
            if key == "primary-region":
                return [self.region], False
            if key == "owning-service":
                return [], False
            text = " ".join([secret.name, secret.description or "",
                             *(f"{k} {v}" for k, v in secret.tags)])
            return [word for word in re.split(r"[\s/_+=.@:-]+", text) if word], True

        positive = [value for value in values if not value.startswith("!")]
        negative = [value[1:] for value in values if value.startswith("!")]

        def matches(secret: Secret, value: str) -> bool:
            candidates, fold = attributes(secret)
            if fold:
                candidates = [candidate.lower() for candidate in candidates]
            if key == "all":
                words = [word for word in re.split(r"[\s/_+=.@:-]+", value.lower()) if word]
                return all(any(c.startswith(word) for c in candidates) for word in words)
            value = value.lower() if fold else value
            return any(candidate.startswith(value) for candidate in candidates)

        def check(secret: Secret) -> bool:
            if positive and not any(matches(secret, value) for value in positive):
                return False
            return not any(matches(secret, value) for value in negative)

        return check

    @staticmethod
    def _encode_token(kind: str, *cursor) -> str:
        raw = json.dumps([kind, *cursor], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @staticmethod
    def _decode_token(token: str, kind: str) -> list:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        except (ValueError, TypeError, binascii.Error):
            raise InvalidNextTokenException("The NextToken value is invalid.") from None
        if not isinstance(decoded, list) or not decoded or decoded[0] != kind:
            raise InvalidNextTokenException("The NextToken value is invalid.")
        return decoded[1:]

    def get_random_password(self, caller: Caller, PasswordLength=None, ExcludeCharacters=None,
                            ExcludeNumbers=None, ExcludePunctuation=None, ExcludeUppercase=None,
                            ExcludeLowercase=None, IncludeSpace=None,
                            RequireEachIncludedType=None):
        self._authorize(caller, "GetRandomPassword")
        given = {name: value for name, value in locals().items()
                 if name not in ("self", "caller") and value is not None}
        return {"RandomPassword": random_password(**given)}

    # --- rotation ---------------------------------------------------------------------

    def rotate_secret(self, caller: Caller, SecretId, ClientRequestToken=None,
                      RotationLambdaARN=None, RotationRules=None, RotateImmediately=None,
                      ExternalSecretRotationMetadata=None, ExternalSecretRotationRoleArn=None):
        """Configure rotation and (by default) start one: the new version, whose id is
        the token, is created empty under AWSPENDING for the rotator to fill."""
        secret = self._secret(SecretId)
        self._authorize(caller, "RotateSecret", secret)
        if ExternalSecretRotationMetadata or ExternalSecretRotationRoleArn:
            raise InvalidParameterException("secretfs doesn't rotate managed external secrets.")
        if RotationLambdaARN:
            rotators.check_rotator(RotationLambdaARN)
        rules = schedule.RotationRules.from_api(RotationRules) if RotationRules else None
        token = model.validate_token(ClientRequestToken) if ClientRequestToken else None

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            config = dict(fresh.rotation or {})
            rotator = RotationLambdaARN or config.get("RotationLambdaARN")
            if not rotator:
                raise InvalidRequestException(
                    "No rotation function (RotationLambdaARN) is associated with this secret.")
            config["RotationLambdaARN"] = rotator
            if rules is not None:
                config["RotationRules"] = rules.to_api()
            config["Enabled"] = True
            version_id = None
            if RotateImmediately is not False:
                version_id = self._start_rotation(writer, fresh, config, token)
            else:
                config["NextRotationDate"] = self._next_rotation(config)
            writer.update_secret(fresh.secret_id, rotation=config, changed=self.now())
            return version_id

        version_id, after = self._mutate(secret.secret_id, change)
        for listener in self.rotation_listeners:
            listener()
        return self._named(after, version_id)

    def _start_rotation(self, writer, secret: Secret, config: dict, token: str | None) -> str:
        pending = secret.labels.get(AWSPENDING)
        current = secret.labels.get(AWSCURRENT)
        if pending is not None and pending != current:
            if token is not None and pending == token:
                return token  # the same request again
            raise InvalidRequestException(
                "A previous rotation isn't complete. That rotation will be reattempted.")
        if current is None:
            raise InvalidRequestException(
                "The secret has no AWSCURRENT version to rotate from.")
        version_id = token or model.new_token()
        if version_id in secret.versions:
            raise ResourceExistsException(
                f"A version with the ClientRequestToken {version_id} already exists.")
        writer.insert_version(secret.secret_id, version_id, created=self.now(), sealed=None,
                              is_binary=secret.versions[current].is_binary)
        writer.set_label(secret.secret_id, AWSPENDING, version_id)
        config["Pending"] = {"Token": version_id, "Step": None, "Error": None,
                             "Started": self.now().timestamp(), "Attempts": 0}
        return version_id

    def _next_rotation(self, config: dict) -> float | None:
        rules = config.get("RotationRules")
        if not config.get("Enabled") or not rules:
            return None
        parsed = schedule.RotationRules.from_api(rules)
        last = config.get("LastRotatedDate")
        when = parsed.next_rotation(
            self.now(), last_rotated=None if last is None else datetime.fromtimestamp(last, UTC),
            rng=self._rng)
        return when.timestamp()

    def cancel_rotate_secret(self, caller: Caller, SecretId):
        """Turn rotation off; a rotation in progress stops where it is (AWSPENDING stays,
        as in AWS, until a new rotation or a label move removes it)."""
        secret = self._secret(SecretId)
        self._authorize(caller, "CancelRotateSecret", secret)

        def change(writer, fresh: Secret):
            self._require_live(fresh)
            config = dict(fresh.rotation or {})
            if not config.get("Enabled") and not config.get("Pending"):
                raise InvalidRequestException("Rotation is not enabled for this secret.")
            pending = (config.get("Pending") or {}).get("Token")
            config.update(Enabled=False, NextRotationDate=None, Pending=None)
            writer.update_secret(fresh.secret_id, rotation=config, changed=self.now())
            return pending

        pending, after = self._mutate(secret.secret_id, change)
        return self._named(after, pending)

    def _finish_rotation(self, writer, secret: Secret, version_id: str) -> None:
        """AWSCURRENT reached the version the running rotation created: it is done."""
        if secret.labels.get(AWSPENDING) == version_id:
            writer.remove_label(secret.secret_id, AWSPENDING)
        config = dict(secret.rotation or {})
        now = self.now().timestamp()
        config.update(LastRotatedDate=now, Pending=None)
        config["NextRotationDate"] = self._next_rotation(config)
        writer.update_secret(secret.secret_id, rotation=config)

    # --- for the rotation runner ---------------------------------------------------------

    ROTATION_RETRY_MIN, ROTATION_RETRY_MAX = 60.0, 3600.0

    def rotations_due(self) -> list[int]:
        with self.store.read() as reader:
            return reader.rotations_due(self.now().timestamp())

    def next_rotation_due(self) -> datetime | None:
        with self.store.read() as reader:
            when = reader.next_rotation_due()
        return None if when is None else datetime.fromtimestamp(when, UTC)

    def rotation_lease(self, secret_id: int):
        """The store's lease on a secret, a context manager giving whether this daemon
        holds it: of the hosts sharing a store, only its holder runs the rotation."""
        return self.store.lease(secret_id)

    @staticmethod
    def _rotation_due_at(config: dict) -> float | None:
        """When a rotation is due, as the store's rotation index computes it: an open one
        at once or at its retry time, else the scheduled date; None when it isn't."""
        pending = config.get("Pending")
        if pending is not None:
            return pending.get("RetryAt") or 0.0
        return config.get("NextRotationDate") if config.get("Enabled") else None

    def open_rotation(self, secret_id: int) -> dict | None:
        """The rotation to run for a due secret — the open one, or a new one started
        now: {"Token", "Step" (the last step done, or None), "Rotator"}. None when the
        secret no longer rotates or isn't due (any more). Due-ness is decided here, on
        the fresh row inside the write: the runner's list of due secrets may be stale by
        then, as when another host of a fleet has just finished this rotation and moved
        NextRotationDate on, and starting one then would rotate the secret twice."""
        def change(writer, fresh: Secret):
            config = dict(fresh.rotation or {})
            if fresh.is_deleted or not config.get("RotationLambdaARN"):
                return None
            due = self._rotation_due_at(config)
            if due is None or due > self.now().timestamp():
                return None
            if not config.get("Pending"):
                self._start_rotation(writer, fresh, config, None)
                config["NextRotationDate"] = None
                writer.update_secret(fresh.secret_id, rotation=config)
            pending = config["Pending"]
            return {"Token": pending["Token"], "Step": pending.get("Step"),
                    "Rotator": config["RotationLambdaARN"]}

        opened, _ = self._mutate(secret_id, change)
        return opened

    def record_rotation_step(self, secret_id: int, token: str, step: str,
                             error: str | None = None) -> None:
        """Persist a step's outcome, so a restart resumes where the rotation stood. A
        failed step leaves AWSCURRENT alone and schedules a retry with backoff."""
        def change(writer, fresh: Secret):
            config = dict(fresh.rotation or {})
            pending = dict(config.get("Pending") or {})
            if pending.get("Token") != token:
                return  # finished (finishSecret clears it) or cancelled meanwhile
            if error is None:
                pending.update(Step=step, Error=None, RetryAt=None)
            else:
                attempts = pending.get("Attempts", 0) + 1
                delay = min(self.ROTATION_RETRY_MIN * 2 ** (attempts - 1), self.ROTATION_RETRY_MAX)
                pending.update(Error=f"{step}: {error}", Attempts=attempts,
                               RetryAt=self.now().timestamp() + delay)
            config["Pending"] = pending
            writer.update_secret(fresh.secret_id, rotation=config)

        _, after = self._mutate(secret_id, change)
        if error is not None:
            self.authorizer.record_mutation(SYSTEM, "RotationStepFailed", {},
                                            self._named(after, token))

    # --- access policies -----------------------------------------------------------

    def subscribe_policies(self, listener: Callable[[], None]) -> None:
        """Hear every policy change (after it is in force)."""
        self._policy_listeners.append(listener)

    def _load_policies(self) -> None:
        """Parse every stored policy into a new PolicySet and swap it in at once."""
        with self.store.read() as reader:
            identity = {key: policy.parse_policy(document, resource_policy=False)
                        for key, document in reader.identity_policies().items()}
            resource = {secret_id: policy.parse_policy(document, resource_policy=True)
                        for secret_id, document in reader.resource_policies().items()}
        self.authorizer.policies = policy.PolicySet(identity, resource)
        self.policy_generation += 1
        for listener in self._policy_listeners:
            listener()

    def put_resource_policy(self, caller: Caller, SecretId, ResourcePolicy,
                            BlockPublicPolicy=None, PolicyName=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "PutResourcePolicy", secret)
        parsed = policy.parse_policy(ResourcePolicy, resource_policy=True)
        # Safer than AWS's default: a policy that lets everyone read is refused
        # unless the caller says BlockPublicPolicy=false.
        if BlockPublicPolicy is not False and policy.grants_public_read(parsed):
            raise policy.PublicPolicyException(
                "The resource policy grants everyone (Principal \"*\") read access to the "
                "secret; pass BlockPublicPolicy=false to allow it.")

        return self._set_resource_policy(secret, parsed.text)

    def _set_resource_policy(self, secret: Secret, document: str | None) -> dict:
        def change(writer, fresh: Secret):
            if document is not None:
                self._require_live(fresh)
            writer.set_resource_policy(fresh.secret_id, document)
            writer.update_secret(fresh.secret_id, changed=self.now())

        with self._mutation_lock:
            self._mutate(secret.secret_id, change)
            self._load_policies()
        return self._named(secret)

    def get_resource_policy(self, caller: Caller, SecretId, PolicyName=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "GetResourcePolicy", secret)
        with self.store.read() as reader:
            document = reader.resource_policy(secret.secret_id)
        response = {"ARN": secret.arn, "Name": secret.name}
        if document is not None:
            response["ResourcePolicy"] = document
        return response

    def delete_resource_policy(self, caller: Caller, SecretId, PolicyName=None):
        secret = self._secret(SecretId)
        self._authorize(caller, "DeleteResourcePolicy", secret)
        return self._set_resource_policy(secret, None)

    def validate_resource_policy(self, caller: Caller, ResourcePolicy, SecretId=None):
        secret = self._secret(SecretId) if SecretId is not None else None
        self._authorize(caller, "ValidateResourcePolicy", secret)
        errors = policy.validate_policy(ResourcePolicy, resource_policy=True)
        return {"PolicyValidationPassed": not errors,
                "ValidationErrors": [{"CheckName": error.location,
                                      "ErrorMessage": error.message} for error in errors]}

    def put_identity_policy(self, caller: Caller, Principal, PolicyName, PolicyDocument):
        self._authorize(caller, "secretfs:PutIdentityPolicy")
        self._check_identity_policy_name(Principal, PolicyName)
        parsed = policy.parse_policy(PolicyDocument, resource_policy=False)
        with self._mutation_lock:
            with self.store.write() as writer:
                writer.put_identity_policy(Principal, PolicyName, parsed.text, self.now())
            self._load_policies()
        return {"Principal": Principal, "PolicyName": PolicyName}

    def get_identity_policy(self, caller: Caller, Principal, PolicyName):
        self._authorize(caller, "secretfs:GetIdentityPolicy")
        self._check_identity_policy_name(Principal, PolicyName)
        with self.store.read() as reader:
            document = reader.identity_policies().get((Principal, PolicyName))
        if document is None:
            raise ResourceNotFoundException(
                f"No identity policy {PolicyName!r} is attached to {Principal}.")
        return {"Principal": Principal, "PolicyName": PolicyName, "PolicyDocument": document}

    def delete_identity_policy(self, caller: Caller, Principal, PolicyName):
        self._authorize(caller, "secretfs:DeleteIdentityPolicy")
        self._check_identity_policy_name(Principal, PolicyName)
        with self._mutation_lock:
            with self.store.write() as writer:
                if not writer.delete_identity_policy(Principal, PolicyName):
                    raise ResourceNotFoundException(
                        f"No identity policy {PolicyName!r} is attached to {Principal}.")
            self._load_policies()
        return {"Principal": Principal, "PolicyName": PolicyName}

    def list_identity_policies(self, caller: Caller, Principal=None):
        self._authorize(caller, "secretfs:ListIdentityPolicies")
        if Principal is not None:
            self._check_principal(Principal)
        with self.store.read() as reader:
            found = reader.identity_policies()
        return {"Policies": [{"Principal": principal, "PolicyName": name}
                             for principal, name in found
                             if Principal is None or principal == Principal]}

    @staticmethod
    def _check_principal(principal) -> None:
        try:
            kind, _ = policy.parse_principal(principal)
        except ValueError as error:
            raise InvalidParameterException(str(error)) from None
        if kind == "*":
            raise InvalidParameterException(
                "An identity policy is attached to one principal, not '*'.")

    def _check_identity_policy_name(self, principal, name) -> None:
        self._check_principal(principal)
        if not isinstance(name, str) or not re.fullmatch(r"[\w+=,.@-]{1,128}", name):
            raise InvalidParameterException(
                "PolicyName must be 1 to 128 characters of letters, digits and _+=,.@-")

    # --- secretfs's own actions -------------------------------------------------

    def create_key(self, caller: Caller, Alias=None, Description=None):
        self._authorize(caller, "CreateKey")
        return self.keys.create_key(alias=Alias, description=Description)

    def list_keys(self, caller: Caller):
        self._authorize(caller, "ListKeys")
        return {"Keys": self.keys.list_keys()}

    def rotate_key(self, caller: Caller, KeyId=None):
        """`secretfs rotate-key`: a new version of a master key wraps new data keys."""
        self._authorize(caller, "secretfs:RotateKey")
        return self.rekeying.rotate(KeyId)

    def retire_key_versions(self, caller: Caller, KeyId=None):
        """`secretfs rotate-key --retire-unused`: drop old versions nothing uses."""
        self._authorize(caller, "secretfs:RetireKeyVersions")
        return self.rekeying.retire(KeyId)

    def re_encrypt(self, caller: Caller, KeyId=None):
        """`secretfs re-encrypt`: start moving stored data keys to their key's newest
        version (or follow the re-encryption running); its progress."""
        self._authorize(caller, "secretfs:ReEncrypt")
        return self.rekeying.start(KeyId)

    def get_re_encrypt_status(self, caller: Caller):
        self._authorize(caller, "secretfs:GetReEncryptStatus")
        return self.rekeying.status()

    def _rekeyed(self, secret_ids: set[int]) -> None:
        """Versions of these secrets moved to another master key: show their new KmsKeyIds."""
        with self._mutation_lock:
            for secret_id in secret_ids:
                self.catalog.refresh(secret_id)

    def create_access_key(self, caller: Caller, Principal):
        """A key pair for the network endpoint, acting as a Unix user; the secret half
        is in this answer and nowhere else in the clear."""
        self._authorize(caller, "secretfs:CreateAccessKey")
        return self.access_keys.create(Principal, self.now())

    def list_access_keys(self, caller: Caller, Principal=None):
        self._authorize(caller, "secretfs:ListAccessKeys")
        return {"AccessKeys": self.access_keys.list(Principal)}

    def delete_access_key(self, caller: Caller, AccessKeyId):
        self._authorize(caller, "secretfs:DeleteAccessKey")
        return self.access_keys.delete(AccessKeyId)

    def get_status(self, caller: Caller):
        """`secretfs status`: the mount, store, keys, rotations, audit log and hooks."""
        audit = self.authorizer.audit
        queued = audit.pending if audit is not None else 0  # without this request's record
        self._authorize(caller, "secretfs:GetStatus")
        return self._control().status(audit_queued=queued)

    def refresh(self, caller: Caller, SecretId=None):
        """`secretfs refresh`: re-read one secret, or everything, from the store."""
        self._authorize(caller, "secretfs:Refresh")
        secret_id = None
        if SecretId is not None:
            try:
                secret_id = self._lookup(SecretId)
            except ResourceNotFoundException:
                # Perhaps created by another process: the catalog doesn't know it yet.
                with self.store.read() as reader:
                    secret_id = reader.find(**{"arn" if model.looks_like_arn(SecretId)
                                               else "name": SecretId})
                if secret_id is None:
                    raise
        return self._control().refresh(secret_id)

    def _control(self):
        if self.control is None:
            raise ServiceUnavailable("No daemon serves this store.")
        return self.control

    def reload(self, secret_id: int | None = None, *, policies: bool = True) -> list[str]:
        """Re-read what another process committed to a shared store: the secrets (one,
        or all) and, unless told not to, the policies. Listeners hear each change as
        after a commit; returns the names of the secrets that changed."""
        with self._mutation_lock:
            changed = self.catalog.reload(secret_id)
            if policies:
                self._load_policies()
        return changed

    def reload_policies(self) -> None:
        """Re-read the policies, which another process changed."""
        with self._mutation_lock:
            self._load_policies()

    def is_stale(self) -> bool:
        """Whether this host may have missed other hosts' commits for longer than it
        may serve what it knew (secretfs/fleet.py); never for a store only it writes."""
        feed = self.feed
        return feed is not None and feed.stale()

    def _require_current(self) -> None:
        if self.is_stale():
            raise ServiceUnavailable(
                f"This host has heard nothing from the shared store for over "
                f"{self.feed.max_staleness:g} s, so what it holds may be stale; try "
                f"another host, or again once the store is back.")

    def rotation_summary(self) -> dict:
        """How many secrets have a rotation scheduled or open, which are due now, and
        which are stopped at a failing step (the index gives those; only they are read)."""
        now = self.now().timestamp()
        with self.store.read() as reader:
            due = set(reader.rotations_due(now))
            rotating = [reader.load(secret_id) for secret_id in reader.rotations_due(math.inf)]
            next_due = reader.next_rotation_due()
        rotating = [secret for secret in rotating if secret is not None]
        failing = []
        for secret in rotating:
            pending = (secret.rotation or {}).get("Pending") or {}
            if pending.get("Error"):
                failing.append({"Name": secret.name, "Error": pending["Error"],
                                "Attempts": pending.get("Attempts", 0),
                                "RetryDate": pending.get("RetryAt")})
        return {"Scheduled": len(rotating),
                "Due": sorted(secret.name for secret in rotating if secret.secret_id in due),
                "Failing": failing, "NextDueDate": next_due}

    def record_refused(self, target: str | None, error: model.SecretsManagerError, *,
                       source: str, address: str | None, access_key: str | None) -> None:
        """Audit a network request refused before it had a caller (a bad signature)."""
        audit = self.authorizer.audit
        if audit is None:
            return
        identity = {"sourceIPAddress": address}
        if access_key:
            identity["accessKeyId"] = access_key
        action = (target or "").rpartition(".")[2][:128] or "Unknown"
        audit.record({"eventName": action, "eventSource": source, "userIdentity": identity,
                      "decision": "deny", "decidedBy": "authentication",
                      "errorCode": error.code})

    def network_credentials(self, access_key_id: str, *, source: str,
                            address: str | None) -> tuple[str, Caller] | None:
        """The secret an access key id signs with and the caller it speaks for: a
        rotation step's key while the step runs, else a stored key whose user exists."""
        session = self.sessions.access_key(access_key_id)
        if session is not None:
            secret, caller = session
            return secret, caller._replace(access_key=access_key_id, address=address)
        stored = self.access_keys.credentials(access_key_id)
        if stored is None:
            return None
        secret, principal = stored
        caller = principal_caller(principal, source=source, access_key=access_key_id,
                                  address=address)
        return (secret, caller) if caller is not None else None

    # --- for the filesystem -------------------------------------------------------

    def authorize_read(self, caller: Caller, secret: Secret, version_id: str, *,
                       probe: bool = False, stages: tuple[str, ...] | None = None) -> bool:
        """The open() of a version's file is a GetSecretValue of that version; its
        stages (`stages`, if the caller knows them) are the secretsmanager:VersionStage
        values. A probe (access(2)) answers instead of raising."""
        if stages is None:
            stages = tuple(secret.stages_of(version_id))
        return self.authorizer.check(caller, "GetSecretValue", secret, version_id=version_id,
                                     stages=stages, probe=probe).allowed

    def _listing_request(self, caller: Caller, secret: Secret) -> tuple[str, dict]:
        """Seeing a secret's name takes DescribeSecret or, failing that, a read of its
        AWSCURRENT: the action (and request) that decides it for this caller."""
        if self.authorizer.allows(caller, "DescribeSecret", secret):
            return "DescribeSecret", {}
        return "GetSecretValue", {"stages": (AWSCURRENT,)}

    def authorize_listing(self, caller: Caller, secret: Secret, *, probe: bool = False) -> bool:
        """Opening a secret's directory: allowed to whoever may describe or read it."""
        action, request = self._listing_request(caller, secret)
        return self.authorizer.check(caller, action, secret, event="OpenDirectory",
                                     probe=probe, **request).allowed

    def may_see(self, caller: Caller, secret: Secret) -> bool:
        """Whether a secret's name belongs in this caller's listings (not audited)."""
        if caller.is_root:
            return True
        action, request = self._listing_request(caller, secret)
        return action == "DescribeSecret" or self.authorizer.allows(
            caller, action, secret, **request)

    def may_be_shared(self, secret: Secret) -> bool:
        """Whether a policy may let someone other than root read this secret."""
        return self.authorizer.policies.may_grant_read(secret)

    def record_template_failure(self, caller: Caller, template: Secret, problem: str) -> None:
        """Audit a template that could not be rendered: which one, and why (never a value)."""
        audit = self.authorizer.audit
        if audit is None:
            return
        record = policy.decision_event(Identity(caller), "RenderTemplate", template,
                                       policy.Decision(True, "template"),
                                       error_code=templates.TemplateError.code)
        record["errorMessage"] = problem
        audit.record(record)

    def read_version(self, secret: Secret, version_id: str) -> bytes:
        """The plaintext of one version; DecryptionFailure if its row was tampered with."""
        stored = self._decrypt(secret, version_id)
        if stored is None:
            raise ResourceNotFoundException(
                f"Secrets Manager can't find the specified secret value for VersionId: "
                f"{version_id}")
        return stored[0]

    def record_access(self, secret: Secret, version_id: str) -> None:
        """Note a read; LastAccessedDate is a date, so at most one write a day."""
        day = self._access_day
        if day is None or not day[1] <= self._seconds() < day[2]:  # runs on every open
            midnight = self.now().replace(hour=0, minute=0, second=0, microsecond=0)
            day = self._access_day = (midnight, midnight.timestamp(),
                                      (midnight + timedelta(days=1)).timestamp())
        today = day[0]
        version = secret.versions.get(version_id)
        if secret.accessed != today or (version and version.last_accessed != today):
            self._pending_access[(secret.secret_id, version_id)] = today

    def flush_accesses(self) -> None:
        pending, self._pending_access = self._pending_access, {}
        for (secret_id, version_id), day in pending.items():
            def change(writer, fresh: Secret, version_id=version_id, day=day):
                writer.update_secret(fresh.secret_id, accessed=day)
                if version_id in fresh.versions:
                    writer.touch_version(fresh.secret_id, version_id, day)
            with contextlib.suppress(ResourceNotFoundException):  # deleted since read
                self._mutate(secret_id, change)
