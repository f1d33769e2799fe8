"""The AWS KMS key provider: master keys that never leave KMS.

This module owns secretfs's use of KMS: data keys come from GenerateDataKey and come back
from Decrypt, both under the encryption context the envelope names (the secret's ARN and
version id), so KMS itself refuses a wrapped key presented for another secret or version.
A key may be named as KMS names it (key id, key ARN, alias, alias ARN); KMS resolves the
name (DescribeKey), and the key id is what a version records. The default key is the
one `secretfs init --kms-key-id` named: the AWS managed key alias/aws/secretsmanager is
Secrets Manager's own, and not one secretfs can use, so that name stands for the default
key here, as it does in Secrets Manager.

The client is botocore's (boto3's underneath): endpoint, region and credentials come from
the usual chain (environment, shared files, instance or container role), with
config.json's KmsEndpointUrl and KmsRegion first. Every call blocks on a round trip:
callers run them in worker threads, never on the trio loop.

KMS's refusals become the Secrets Manager errors AWS returns for them, in one line naming
the key and never a wrapped key: an unknown key is InvalidParameterException, a key that
won't decrypt or encrypt is DecryptionFailure or EncryptionFailure, a disabled key or one
pending deletion KMSInvalidStateException, a refused permission AccessDeniedException
("Access to KMS is not allowed"), and KMS unreachable or failing InternalServiceError.
An outage is logged once when it starts and once when KMS answers again.

Nothing here caches a data key: each version's key is unwrapped by KMS when the value is
decrypted. What is cached is names: key id -> key ARN.
"""

from __future__ import annotations

import logging
import threading

from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from botocore.session import get_session

from secretfs.crypto.envelope import DATA_KEY_SIZE
from secretfs.crypto.local import DEFAULT_ALIAS, _validate_alias
from secretfs.model import (
    AccessDeniedException,
    DecryptionFailure,
    EncryptionFailure,
    InternalServiceError,
    InvalidParameterException,
    KMSInvalidStateException,
    ResourceExistsException,
    SecretsManagerError,
)

log = logging.getLogger(__name__)

# A KMS call that hangs holds a worker thread (and, for a file read, its reader): fail
# in seconds, with one retry for a dropped connection or a throttled call.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
ATTEMPTS = 2
# KMS: a key id, ARN, alias or alias ARN is at most 2048 characters.
_KEY_REF_MAX = 2048
_SHOWN_MAX = 200
# KMS error codes by what they mean for secretfs.
_STATE_CODES = frozenset({"DisabledException", "KMSInvalidStateException",
                          "KeyUnavailableException"})
_UNAVAILABLE_CODES = frozenset({"KMSInternalException", "DependencyTimeoutException",
                                "ThrottlingException", "ServiceUnavailableException",
                                "InternalFailure"})
# After a failed CreateAlias, the key CreateKey made is scheduled for deletion after the
# shortest window KMS allows.
_ORPHAN_DELETION_DAYS = 7
_CREATED_BY_TAG = {"TagKey": "CreatedBy", "TagValue": "secretfs"}


def kms_client(*, endpoint_url: str | None, region: str | None):
    """A KMS client from the usual credential chain; `region` None: the chain's region."""
    config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                    retries={"mode": "standard", "max_attempts": ATTEMPTS},
                    user_agent_extra="secretfs")
    return get_session().create_client("kms", endpoint_url=endpoint_url, region_name=region,
                                       config=config)


def chain_region() -> str | None:
    """The region the usual chain names (AWS_REGION, AWS_DEFAULT_REGION, the profile)."""
    return get_session().get_config_variable("region")


class KmsKeyProvider:
    """Master keys in AWS KMS; implements ``secretfs.crypto.KeyProvider``."""

    def __init__(self, *, default_key: str, endpoint_url: str | None = None,
                 region: str | None = None, client=None):
        if not isinstance(default_key, str) or not default_key:
            raise ValueError("the KMS key provider needs a default key (KmsKeyId)")
        self.default_key = default_key
        try:
            self._client = client or kms_client(endpoint_url=endpoint_url, region=region)
        except BotoCoreError as error:  # no region anywhere, or an unusable endpoint
            raise ValueError(f"can't make a KMS client: {_one_line(str(error))}") from None
        self.endpoint = self._client.meta.endpoint_url
        self.region = self._client.meta.region_name
        self._arns: dict[str, str] = {}  # key id -> key ARN; names only
        self._lock = threading.Lock()
        self._unreachable = False

    def __repr__(self) -> str:
        return (f"KmsKeyProvider(endpoint={self.endpoint!r}, region={self.region!r}, "
                f"default_key={self.default_key!r})")

    # --- KeyProvider ---------------------------------------------------------------------

    def resolve(self, key_ref: str | None) -> str:
        """The key id of the default key (None, or Secrets Manager's name for it,
        alias/aws/secretsmanager) or of a key id, key ARN, alias or alias ARN, as KMS
        resolves it; the key must be an enabled symmetric encryption key."""
        ref = self.default_key if key_ref is None or _names_default(key_ref) else key_ref
        if not isinstance(ref, str) or not ref or len(ref) > _KEY_REF_MAX:
            raise InvalidParameterException(
                f"A KMS key id is a key id, key ARN, alias or alias ARN of 1 to "
                f"{_KEY_REF_MAX} characters, not {_shown(repr(ref))}.")
        return self._describe_key(ref)["KeyId"]

    def key_arn(self, key_id: str) -> str:
        arn = self._arns.get(key_id)
        if arn is None:
            arn = self._describe_key(key_id, check_state=False)["Arn"]
        return arn

    def generate_data_key(self, key_id: str, context: dict[str, str]) -> tuple[bytearray, bytes]:
        """A fresh data key made by KMS and the same key wrapped under ``key_id`` and
        bound to ``context``; the caller zeroes the bytearray after use."""
        answer = self._call("GenerateDataKey", key_id, EncryptionFailure, KeyId=key_id,
                            KeySpec="AES_256", EncryptionContext=context)
        data_key = bytearray(answer.pop("Plaintext"))
        if len(data_key) != DATA_KEY_SIZE:
            data_key[:] = bytes(len(data_key))
            raise EncryptionFailure(f"KMS key {key_id} returned a data key of the wrong size.")
        return data_key, answer["CiphertextBlob"]

    def wrap(self, key_id: str, data_key: bytes, context: dict[str, str]) -> bytes:
        answer = self._call("Encrypt", key_id, EncryptionFailure, KeyId=key_id,
                            Plaintext=bytes(data_key), EncryptionContext=context)
        return answer["CiphertextBlob"]

    def unwrap(self, key_id: str, wrapped: bytes, context: dict[str, str]) -> bytearray:
        """The data key, in a bytearray the caller should zero after use. KeyId is given,
        so KMS refuses a blob wrapped under any other key."""
        answer = self._call("Decrypt", key_id, DecryptionFailure, KeyId=key_id,
                            CiphertextBlob=bytes(wrapped), EncryptionContext=context)
        return bytearray(answer.pop("Plaintext"))

    # --- the key verbs -------------------------------------------------------------------

    def create_key(self, *, alias: str | None, description: str | None = None) -> dict:
        """A new symmetric KMS key with this alias (CreateKey, then CreateAlias)."""
        if alias is not None:
            _validate_alias(alias)
            if self._alias_target(alias) is not None:
                raise ResourceExistsException(f"An alias with the name {alias} already exists.")
        params = {"KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT",
                  "Tags": [_CREATED_BY_TAG]}
        if description is not None:
            params["Description"] = description
        meta = self._call("CreateKey", None, InvalidParameterException, **params)["KeyMetadata"]
        key_id = meta["KeyId"]
        if alias is not None:
            try:
                self._call("CreateAlias", alias, InvalidParameterException, AliasName=alias,
                           TargetKeyId=key_id)
            except SecretsManagerError:
                self._discard(key_id)
                raise
        self._arns[key_id] = meta["Arn"]
        return self._summary(meta, [] if alias is None else [alias])

    def list_keys(self) -> list[dict]:
        """The account's customer managed symmetric encryption keys in this region (those
        a secret may name), oldest first, with their aliases and state."""
        aliases: dict[str, list[str]] = {}
        for page in self._pages("ListAliases", "Aliases"):
            for entry in page:
                if entry.get("TargetKeyId"):
                    aliases.setdefault(entry["TargetKeyId"], []).append(entry["AliasName"])
        found = []
        for page in self._pages("ListKeys", "Keys"):
            for entry in page:
                meta = self._describe_key(entry["KeyId"], check_state=False)
                if meta.get("KeyManager") == "CUSTOMER" and _symmetric(meta):
                    found.append(self._summary(meta, sorted(aliases.get(meta["KeyId"], []))))
        return sorted(found, key=lambda key: key["CreationDate"])

    def status(self) -> dict:
        """What `secretfs status` shows of this provider (no KMS call)."""
        return {"Kind": "kms", "Source": f"KMS {self.endpoint}",
                "Path": f"default key {self.default_key}", "Keys": len(self._arns)}

    # --- internals -------------------------------------------------------------------------

    def _describe_key(self, ref: str, *, check_state: bool = True) -> dict:
        meta = self._call("DescribeKey", ref, InvalidParameterException, KeyId=ref)["KeyMetadata"]
        self._arns[meta["KeyId"]] = meta["Arn"]
        if not check_state:
            return meta
        if meta.get("KeyState") != "Enabled":
            raise KMSInvalidStateException(
                f"KMS key {meta['KeyId']} is {meta.get('KeyState', 'not enabled')}.")
        if not _symmetric(meta):
            raise InvalidParameterException(
                f"KMS key {meta['KeyId']} is not a symmetric encryption key.")
        return meta

    def _alias_target(self, alias: str) -> str | None:
        try:
            return self._call("DescribeKey", alias, InvalidParameterException,
                              KeyId=alias)["KeyMetadata"]["KeyId"]
        except InvalidParameterException:
            return None

    def _discard(self, key_id: str) -> None:
        """Schedule the deletion of a key made for an alias that could not be made."""
        try:
            self._call("ScheduleKeyDeletion", key_id, InvalidParameterException,
                       KeyId=key_id, PendingWindowInDays=_ORPHAN_DELETION_DAYS)
        except SecretsManagerError as error:
            log.warning("KMS key %s was created without its alias and could not be "
                        "scheduled for deletion: %s", key_id, error.message)

    def _pages(self, operation: str, member: str):
        token: str | None = None
        while True:
            answer = self._call(operation, None, InvalidParameterException,
                                **({"Marker": token} if token else {}))
            yield answer.get(member, [])
            token = answer.get("NextMarker") if answer.get("Truncated") else None
            if not token:
                return

    def _summary(self, meta: dict, aliases: list[str]) -> dict:
        return {"KeyId": meta["KeyId"], "Arn": meta["Arn"], "Aliases": aliases,
                "Description": meta.get("Description") or None,
                "CreationDate": meta["CreationDate"], "KeyState": meta.get("KeyState")}

    def _call(self, operation: str, key: str | None, refused: type[SecretsManagerError],
              **params) -> dict:
        """One KMS call about `key` (None: about no one key); its failure as the Secrets
        Manager error AWS would return, with `refused` for a key KMS won't use this way."""
        method = getattr(self._client, xform_name(operation))
        try:
            answer = method(**params)
        except ParamValidationError:
            raise refused(f"KMS can't take these parameters for {operation}"
                          f"{_about(key)}.") from None
        except ClientError as error:
            raise self._refusal(error, operation, key, refused) from None
        except BotoCoreError as error:
            # Unreachable, timed out, or no credentials: KMS never answered.
            raise self._outage(operation, key, _one_line(str(error))) from None
        if self._unreachable:
            with self._lock:
                if self._unreachable:
                    self._unreachable = False
                    log.info("KMS at %s answers again", self.endpoint)
        return answer

    def _refusal(self, error: ClientError, operation: str, key: str | None,
                 refused: type[SecretsManagerError]) -> SecretsManagerError:
        found = error.response.get("Error", {})
        code = found.get("Code", "")
        said = _one_line(found.get("Message") or code)
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _UNAVAILABLE_CODES or status >= 500:
            return self._outage(operation, key, f"{code}: {said}")
        if code == "AccessDeniedException":
            return AccessDeniedException(
                f"Access to KMS is not allowed: {operation}{_about(key)} was refused "
                f"({said}).")
        if code in _STATE_CODES:
            return KMSInvalidStateException(
                f"KMS key {_shown(key)} can't be used in its current state: {said}")
        if code == "NotFoundException" and key is not None:
            return refused(f"KMS key {_shown(key)} not found.")
        return refused(f"KMS refused {operation}{_about(key)}: {code}: {said}")

    def _outage(self, operation: str, key: str | None, reason: str) -> SecretsManagerError:
        message = (f"KMS at {self.endpoint} can't be reached or can't answer now "
                   f"({operation}{_about(key)}): {reason}")
        with self._lock:
            first, self._unreachable = not self._unreachable, True
        if first:
            log.warning("%s; values not decrypted yet can't be read until KMS answers",
                        message)
        return InternalServiceError(message)


def _names_default(key_ref: object) -> bool:
    """alias/aws/secretsmanager, by name or alias ARN: what Secrets Manager calls the key of
    secrets without one of their own, which here is the default key."""
    return isinstance(key_ref, str) and (
        key_ref == DEFAULT_ALIAS
        or (key_ref.startswith("arn:") and key_ref.endswith(f":{DEFAULT_ALIAS}")))


def _symmetric(meta: dict) -> bool:
    """A symmetric encryption key, as far as KeyMetadata says (a field it leaves out is
    left to KMS, which refuses the use itself)."""
    return (meta.get("KeyUsage", "ENCRYPT_DECRYPT") == "ENCRYPT_DECRYPT"
            and meta.get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT")


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX] + "..."


def _about(key: str | None) -> str:
    return "" if key is None else f" for KMS key {_shown(key)}"


def _shown(value: object) -> str:
    return _one_line(value if isinstance(value, str) else repr(value))
