"""The Secrets Manager domain: limits, validation and the error hierarchy.

Nothing here does I/O. Every error carries the AWS error code the API returns,
the HTTP status it travels with, and the errno the filesystem answers with, so
each adapter translates an error in exactly one place.
"""

from __future__ import annotations

import errno
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime

# --- AWS limits (botocore's service model and the Secrets Manager quotas) ---
NAME_MAX = 512
DESCRIPTION_MAX = 2048
VALUE_MAX = 65536  # bytes: of SecretBinary, and of SecretString encoded as UTF-8
TOKEN_MIN, TOKEN_MAX = 32, 64
LABEL_MAX = 256
LABELS_PER_VERSION = 20
TAGS_MAX = 50
TAG_KEY_MAX, TAG_VALUE_MAX = 128, 256
# Secrets Manager prunes deprecated (unlabelled) versions once a secret has more
# than this many, but never one created in the last 24 hours.
VERSIONS_KEPT = 100
DEPRECATED_MIN_AGE_SECONDS = 24 * 3600
# Versions that are younger than a day pile up under rapid writes; past this
# hard cap a new version is refused with LimitExceededException.
VERSIONS_MAX = 1000
RECOVERY_WINDOW_MIN, RECOVERY_WINDOW_MAX, RECOVERY_WINDOW_DEFAULT = 7, 30, 30
LIST_MAX_RESULTS = 100
BATCH_MAX_IDS = 20

AWSCURRENT = "AWSCURRENT"
AWSPREVIOUS = "AWSPREVIOUS"
AWSPENDING = "AWSPENDING"
AWS_LABELS = (AWSCURRENT, AWSPREVIOUS, AWSPENDING)

# Entries of a secret's directory that belong to the secret itself: a child
# secret's name segment directly below a secret may not be one of these, nor
# one of the secret's staging labels (see docs in README, "Name rules").
RESERVED_SEGMENTS = frozenset({"versions", "keys"}) | frozenset(AWS_LABELS)

_NAME_RE = re.compile(r"^[A-Za-z0-9/_+=.@-]+$")
_ARN_SUFFIX_RE = re.compile(r"-[A-Za-z0-9]{6}$")
_TAG_RE = re.compile(r"^[\w\s+=.:/@-]*$", re.UNICODE)


class SecretsManagerError(Exception):
    """Base of every error the service reports; never carries a secret value."""

    code = "InternalServiceError"
    status = 500
    errno = errno.EIO

    def __init__(self, message: str = ""):
        super().__init__(message or self.__doc__)
        self.message = message or (self.__doc__ or "").strip()


class ResourceNotFoundException(SecretsManagerError):
    """Secrets Manager can't find the resource that you asked for."""

    code, status, errno = "ResourceNotFoundException", 400, errno.ENOENT


class ResourceExistsException(SecretsManagerError):
    """A resource with the ID you requested already exists."""

    code, status, errno = "ResourceExistsException", 400, errno.EEXIST


class InvalidParameterException(SecretsManagerError):
    """The parameter name or value is invalid."""

    code, status, errno = "InvalidParameterException", 400, errno.EINVAL


class InvalidRequestException(SecretsManagerError):
    """A parameter value is not valid for the current state of the resource."""

    code, status, errno = "InvalidRequestException", 400, errno.EINVAL


class InvalidNextTokenException(SecretsManagerError):
    """The NextToken value is invalid."""

    code, status, errno = "InvalidNextTokenException", 400, errno.EINVAL


class LimitExceededException(SecretsManagerError):
    """The request failed because it would exceed one of the Secrets Manager quotas."""

    code, status, errno = "LimitExceededException", 400, errno.ENOSPC


class DecryptionFailure(SecretsManagerError):
    """Secrets Manager can't decrypt the protected secret text using the provided KMS key."""

    code, status, errno = "DecryptionFailure", 400, errno.EIO


class EncryptionFailure(SecretsManagerError):
    """Secrets Manager can't encrypt the protected secret text using the provided KMS key."""

    code, status, errno = "EncryptionFailure", 400, errno.EIO


class KMSInvalidStateException(SecretsManagerError):
    """The KMS key that protects the secret is not in a state that allows its use
    (disabled, pending deletion, unavailable)."""

    code, status, errno = "KMSInvalidStateException", 400, errno.EIO


class AccessDeniedException(SecretsManagerError):
    """You don't have permission to perform this action."""

    code, status, errno = "AccessDeniedException", 400, errno.EACCES


class UnrecognizedClientException(SecretsManagerError):
    """The credentials in the request (a key, a token) stand for no one."""

    code, status, errno = "UnrecognizedClientException", 400, errno.EACCES


class ValidationException(SecretsManagerError):
    """The request does not satisfy the constraints of the API."""

    code, status, errno = "ValidationException", 400, errno.EINVAL


class SerializationException(SecretsManagerError):
    """The request body could not be parsed."""

    code, status, errno = "SerializationException", 400, errno.EINVAL


class UnknownOperationException(SecretsManagerError):
    """The action named in X-Amz-Target does not exist."""

    code, status, errno = "UnknownOperationException", 400, errno.ENOSYS


class InternalServiceError(SecretsManagerError):
    """An error occurred on the server side."""


class ServiceUnavailable(SecretsManagerError):
    """The store cannot accept writes right now (disk full or read-only)."""

    code, status, errno = "InternalServiceError", 500, errno.EIO


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        ResourceNotFoundException, ResourceExistsException, InvalidParameterException,
        InvalidRequestException, InvalidNextTokenException, LimitExceededException,
        DecryptionFailure, EncryptionFailure, KMSInvalidStateException, AccessDeniedException,
        ValidationException, SerializationException, UnknownOperationException,
        InternalServiceError,
    )
}


# --- the domain's records -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Version:
    """One immutable version of a secret's value (metadata only, never plaintext)."""

    version_id: str
    created: datetime
    size: int | None  # plaintext length; None while a version holds no value yet
    is_binary: bool
    key_id: str | None
    last_accessed: datetime | None = None


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret's metadata with its versions and labels, as one consistent snapshot."""

    secret_id: int
    name: str
    arn: str
    path: str  # the secret's directory below the mountpoint, '/'-joined segments
    description: str | None
    kms_key_id: str | None
    created: datetime
    changed: datetime
    accessed: datetime | None
    deleted: datetime | None  # the deletion date when scheduled for deletion
    rotation: dict | None
    tags: tuple[tuple[str, str], ...]
    versions: dict[str, Version] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # label -> version id

    @property
    def is_deleted(self) -> bool:
        return self.deleted is not None

    def stages_of(self, version_id: str) -> list[str]:
        return sorted(label for label, vid in self.labels.items() if vid == version_id)


# --- validation -----------------------------------------------------------------

def name_segments(name: str) -> list[str]:
    """The directory path of a secret: its name split at '/', empty segments dropped."""
    return [segment for segment in name.split("/") if segment]


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidParameterException("You must provide a secret name.")
    # AWS answers a malformed name with ValidationException.
    if len(name) > NAME_MAX:
        raise ValidationException(
            f"Invalid name. The secret name can be at most {NAME_MAX} characters long.")
    if not _NAME_RE.fullmatch(name):  # not match(): `$` also matches before a final "\n"
        raise ValidationException(
            "Invalid name. Must be a valid name containing alphanumeric characters, "
            "or any of the following: -/_+=.@!")
    segments = name_segments(name)
    if not segments:
        raise InvalidParameterException(
            "Invalid name. A secret name needs at least one character other than '/'.")
    for segment in segments:
        if segment in (".", ".."):
            raise InvalidParameterException(
                f"Invalid name. The segment {segment!r} can't be shown as a directory.")
    return name


def validate_token(token: object) -> str:
    if not isinstance(token, str) or not TOKEN_MIN <= len(token) <= TOKEN_MAX:
        raise InvalidParameterException(
            f"ClientRequestToken must be {TOKEN_MIN} to {TOKEN_MAX} characters long.")
    if any(not ch.isprintable() or ch == "/" for ch in token):
        raise InvalidParameterException(
            "ClientRequestToken may only contain printable characters other than '/'.")
    return token


def new_token() -> str:
    return str(uuid.uuid4())


def validate_label(label: object) -> str:
    if not isinstance(label, str) or not 1 <= len(label) <= LABEL_MAX:
        raise InvalidParameterException(
            f"A staging label must be 1 to {LABEL_MAX} characters long.")
    if any(not ch.isprintable() for ch in label):
        raise InvalidParameterException("A staging label may only contain printable characters.")
    return label


def validate_tags(tags: object) -> list[tuple[str, str]]:
    if not isinstance(tags, list):
        raise InvalidParameterException("Tags must be a list of {Key, Value} pairs.")
    pairs = []
    for tag in tags:
        if not isinstance(tag, dict) or not isinstance(tag.get("Key"), str):
            raise InvalidParameterException("Each tag needs a string Key.")
        key, value = tag["Key"], tag.get("Value", "")
        if not isinstance(value, str):
            raise InvalidParameterException(f"The value of tag {key!r} must be a string.")
        validate_tag_key(key)
        if len(value) > TAG_VALUE_MAX or not _TAG_RE.match(value):
            raise InvalidParameterException(
                f"Invalid tag value for key {key!r}: at most {TAG_VALUE_MAX} characters of "
                "letters, digits, spaces and _.:/=+-@.")
        pairs.append((key, value))
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise InvalidParameterException("Tag keys must be unique.")
    return pairs


def validate_tag_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= TAG_KEY_MAX or not _TAG_RE.match(key):
        raise InvalidParameterException(
            f"Invalid tag key {key!r}: 1 to {TAG_KEY_MAX} characters of letters, digits, "
            "spaces and _.:/=+-@.")
    if key.lower().startswith("aws:"):
        raise InvalidParameterException("Tag keys starting with 'aws:' are reserved.")
    return key


def looks_like_arn(secret_id: str) -> bool:
    return secret_id.startswith("arn:")


def arn_suffix_stripped(name: str) -> str | None:
    """The name without a trailing '-XXXXXX' ARN suffix, if it has one."""
    if _ARN_SUFFIX_RE.search(name):
        return name[:-7]
    return None


def file_name(text: str) -> str:
    """How a label, version id or JSON key appears as one file name in the mount.

    '%' and '/' are percent-encoded, as is a leading '.', so the result is never
    '.', '..', hidden, or a path; NUL can't appear in AWS strings we accept.
    """
    encoded = text.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    return encoded
