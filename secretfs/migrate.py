"""Migration into secretfs: secrets read elsewhere, created through the daemon's API.

Owns the import sources — AWS Secrets Manager, a directory of files, Kubernetes Secret
manifests, docker secrets and `.env` files — and the import plan. A source only reads;
`plan()` compares what it read with what the daemon holds, through the control socket
every client verb uses, and refuses bad input before the first write; `apply()` then
makes the calls. Nothing here opens the store or the keys.

An import is idempotent because it only adds what the local secret lacks, and never
moves a label of a version the local secret already has:

- From AWS a version keeps its VersionId (sent as ClientRequestToken), so a version
  imported before is known by its id; one whose id is here with another value is a
  conflict, refused before anything is written. New versions arrive with their staging
  labels (the AWSCURRENT one first, so AWSPREVIOUS falls where AWS has it), and a
  version AWS keeps without a label (deprecated) is written under a transient label
  that is removed at once: PutSecretValue needs one.
- Every other source gives a secret one value. It becomes a new AWSCURRENT version
  unless a version of the secret already holds exactly that value, so an import run
  again writes nothing, and one run after a local rotation doesn't roll it back.

Names are prefixed with --name-prefix, as given. Descriptions and tags come from AWS
(tags under the reserved `aws:` prefix stay behind); KMS keys, rotation settings and
resource policies don't: they name AWS resources that have no meaning here.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secretfs import model
from secretfs.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SERVICE_ERROR,
    EXIT_USAGE,
    _one_line,
)
from secretfs.model import AWSCURRENT, SecretsManagerError

# The label a deprecated AWS version carries for the moment between its PutSecretValue
# and its removal. No secret name holds ':', so no child secret's directory can
# collide with its file.
IMPORT_LABEL = "secretfs:importing"
DOCKER_SECRETS = Path("/run/secrets")


class MigrationError(Exception):
    """The source can't be imported as it is (unreadable, malformed, an invalid name or
    value, a conflict with a local secret); nothing was written. str() is one line and
    never holds a value."""


class ImportStopped(Exception):
    """The daemon refused a call part-way through; the import can be run again."""

    def __init__(self, name: str, done: int, total: int, error: SecretsManagerError):
        super().__init__(
            f"An error occurred ({error.code}) when importing {name}: "
            f"{' '.join(error.message.split())} ({done} of {total} secrets were imported "
            "before it; run the import again once this is fixed)")
        self.error = error


# --- what a source gives ------------------------------------------------------------

@dataclass(frozen=True)
class Value:
    """A secret value: text (SecretString) or bytes (SecretBinary)."""

    data: bytes = field(repr=False)
    is_binary: bool = False

    @classmethod
    def of(cls, data: bytes) -> Value:
        """UTF-8 text becomes a SecretString, anything else a SecretBinary."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return cls(data, True)
        return cls(data, False)

    def params(self) -> dict:
        if self.is_binary:
            return {"SecretBinary": self.data}
        return {"SecretString": self.data.decode("utf-8")}

    def same_as(self, other: Value | None) -> bool:
        return (other is not None and other.is_binary == self.is_binary
                and hmac.compare_digest(other.data, self.data))


@dataclass(frozen=True)
class SourceVersion:
    value: Value
    version_id: str | None = None  # AWS's, kept; None lets the daemon choose one
    stages: tuple[str, ...] = (AWSCURRENT,)


@dataclass(frozen=True)
class SourceSecret:
    name: str
    origin: str  # where it was read, for messages: "file /x/y", "Secret default/db"
    versions: tuple[SourceVersion, ...]  # in the order they are written
    description: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


def _one_value(name: str, origin: str, data: bytes) -> SourceSecret:
    return SourceSecret(name, origin, (SourceVersion(Value.of(data)),))


def _json_value(name: str, origin: str, values: dict[str, str]) -> SourceSecret:
    # Sorted keys: the same keys and values always give the same bytes, so a re-import
    # recognises them whatever order the source lists them in.
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _one_value(name, origin, text.encode("utf-8"))


# --- sources ------------------------------------------------------------------------

def read_aws(*, endpoint_url: str | None = None, region: str | None = None,
             profile: str | None = None, prefix: str = "",
             name_prefix: str = "") -> list[SourceSecret]:
    """Every secret (not scheduled for deletion) whose name starts with `prefix`, with
    every version, through botocore's client: the credentials, profiles and regions
    the AWS CLI and boto3 use (boto3 is a thin layer over the same client)."""
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        session = botocore.session.Session(profile=profile)
        client = session.create_client("secretsmanager", region_name=region,
                                       endpoint_url=endpoint_url)
        return [_aws_secret(client, entry, name_prefix)
                for entry in _aws_entries(client, prefix)]
    except ClientError as error:
        detail = error.response.get("Error", {})
        raise MigrationError(f"AWS Secrets Manager: ({detail.get('Code')}) "
                             f"{_one_line(detail.get('Message', ''))}") from None
    except BotoCoreError as error:
        raise MigrationError(f"AWS Secrets Manager: {_one_line(str(error))}") from None


def _aws_entries(client, prefix: str) -> Iterator[dict]:
    filters = [{"Key": "name", "Values": [prefix]}] if prefix else []
    for page in client.get_paginator("list_secrets").paginate(Filters=filters):
        for entry in page.get("SecretList", []):
            # AWS's name filter also matches words inside names: keep true prefixes.
            if entry["Name"].startswith(prefix):
                yield entry


def _aws_secret(client, entry: dict, name_prefix: str) -> SourceSecret:
    arn, origin = entry["ARN"], f"AWS secret {entry['Name']}"
    listed = []
    params = {"SecretId": arn, "IncludeDeprecated": True}
    while True:
        page = client.list_secret_version_ids(**params)
        listed += page.get("Versions", [])
        if not page.get("NextToken"):
            break
        params["NextToken"] = page["NextToken"]
    versions = []
    for entry_version in _aws_write_order(listed):
        answer = client.get_secret_value(SecretId=arn, VersionId=entry_version["VersionId"])
        if "SecretBinary" in answer:
            value = Value(bytes(answer["SecretBinary"]), True)
        else:
            value = Value(answer.get("SecretString", "").encode("utf-8"), False)
        versions.append(SourceVersion(value, entry_version["VersionId"],
                                      tuple(entry_version.get("VersionStages") or ())))
    tags = tuple((tag["Key"], tag.get("Value", "")) for tag in entry.get("Tags") or ()
                 if not tag["Key"].lower().startswith("aws:"))
    return SourceSecret(name_prefix + entry["Name"], origin, tuple(versions),
                        entry.get("Description"), tags)


def _aws_write_order(versions: list[dict]) -> list[dict]:
    """AWSCURRENT's version first (so the version it replaces here becomes AWSPREVIOUS
    before the source's own AWSPREVIOUS lands), then labelled versions, then
    deprecated ones, each oldest first."""
    def rank(item: tuple[int, dict]) -> tuple:
        index, version = item
        stages = version.get("VersionStages") or ()
        created = version.get("CreatedDate")
        return (0 if AWSCURRENT in stages else 1 if stages else 2,
                created.timestamp() if created is not None else 0.0, index)

    return [version for _, version in sorted(enumerate(versions), key=rank)]


def read_directory(root: Path, *, name_prefix: str = "") -> list[SourceSecret]:
    """One secret per regular file below `root`, named by its path relative to `root`.

    Names starting with '.' are skipped (a Kubernetes volume's `..data` links, editor
    files); symbolic links to files are followed, links to directories are not. A
    file's bytes are the value as they are, a trailing newline included."""
    root = Path(root)
    if not root.is_dir():
        raise MigrationError(f"{root}: not a directory")

    def refuse(error: OSError) -> None:
        raise MigrationError(f"{error.filename}: {error.strerror}")

    found = []
    for directory, subdirectories, files in os.walk(root, onerror=refuse):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for file_name in sorted(files):
            path = Path(directory) / file_name
            if file_name.startswith(".") or not path.is_file():
                continue  # sockets, fifos and dangling links hold no secret
            name = name_prefix + path.relative_to(root).as_posix()
            found.append(_one_value(name, f"file {path}", _read_bytes(path)))
    if not found:
        raise MigrationError(f"{root}: no files to import")
    return found


def read_docker(path: Path = DOCKER_SECRETS, *, name_prefix: str = "") -> list[SourceSecret]:
    """Docker secrets: a directory as containers see it (`/run/secrets`, one file per
    secret), or a compose file whose top-level `secrets:` name files or environment
    variables."""
    path = Path(path)
    if path.is_dir():
        return read_directory(path, name_prefix=name_prefix)
    documents = _yaml_documents(path)
    compose = documents[0] if len(documents) == 1 else None
    if not isinstance(compose, dict) or not isinstance(compose.get("secrets"), dict):
        raise MigrationError(f"{path}: not a directory, nor a compose file with a "
                             "top-level 'secrets:' mapping")
    found = []
    for key, spec in compose["secrets"].items():
        origin = f"compose secret {key} in {path}"
        found.append(_one_value(name_prefix + str(key), origin,
                                _compose_secret(path, origin, spec)))
    if not found:
        raise MigrationError(f"{path}: its 'secrets:' is empty")
    return found


def _compose_secret(compose: Path, origin: str, spec: object) -> bytes:
    if not isinstance(spec, dict):
        raise MigrationError(f"{origin}: expected a mapping with 'file' or 'environment'")
    if spec.get("file") is not None:
        return _read_bytes(compose.parent / str(spec["file"]))
    if spec.get("environment") is not None:
        variable = str(spec["environment"])
        if variable not in os.environ:
            raise MigrationError(f"{origin}: the environment variable {variable} is not set")
        return os.environ[variable].encode("utf-8")
    if spec.get("external"):
        raise MigrationError(f"{origin}: an external secret lives in the engine, which "
                             "doesn't give values back; import its source file instead")
    raise MigrationError(f"{origin}: expected 'file' or 'environment'")


def read_kubernetes(path: Path, *, name_prefix: str = "",
                    per_key: bool = False) -> list[SourceSecret]:
    """Kubernetes Secrets (`kind: Secret`, or a `List`/`SecretList` of them, in one or
    more YAML documents; other kinds are skipped), as `kubectl get secret -o yaml`
    writes them. `data` is base64 and `stringData` text, which wins as in the API.

    A Secret becomes the secret `<namespace>/<name>` whose value is a JSON object of
    its keys, so the mount shows each key under `keys/` as a volume would; with
    `per_key`, each key becomes the secret `<namespace>/<name>/<key>` (raw bytes,
    for binary keys)."""
    found = []
    for secret in _kubernetes_secrets(_yaml_documents(path)):
        namespace, name, values = _kubernetes_values(secret, path)
        origin = f"Secret {namespace}/{name} in {path}"
        base = f"{name_prefix}{namespace}/{name}"
        if per_key:
            found += [_one_value(f"{base}/{key}", f"{origin}, key {key}", data)
                      for key, data in values.items()]
            continue
        text = {}
        for key, data in values.items():
            try:
                text[key] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise MigrationError(f"{origin}: key {key} is not UTF-8 text, so it can't "
                                     "sit in a JSON value; import with --per-key") from None
        found.append(_json_value(base, origin, text))
    if not found:
        raise MigrationError(f"{path}: no Secret with keys to import")
    return found


def _kubernetes_secrets(documents: list) -> Iterator[dict]:
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict):
            raise MigrationError("a YAML document is not a Kubernetes object (a mapping)")
        kind = document.get("kind")
        if kind == "Secret":
            yield document
        elif isinstance(kind, str) and kind.endswith("List"):
            yield from _kubernetes_secrets(document.get("items") or [])


def _kubernetes_values(secret: dict, path: Path) -> tuple[str, str, dict[str, bytes]]:
    metadata = secret.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        raise MigrationError(f"{path}: a Secret has no metadata.name")
    namespace = metadata.get("namespace") or "default"
    origin = f"Secret {namespace}/{name} in {path}"
    values: dict[str, bytes] = {}
    for member, decode in (("data", _base64_value), ("stringData", _text_value)):
        entries = secret.get(member) or {}
        if not isinstance(entries, dict):
            raise MigrationError(f"{origin}: {member} is not a mapping")
        for key, raw in entries.items():
            values[str(key)] = decode(raw, f"{origin}: {member}.{key}")
    return str(namespace), name, values


def _base64_value(raw: object, where: str) -> bytes:
    try:
        return base64.b64decode("".join(str(raw).split()), validate=True)
    except (binascii.Error, ValueError):
        raise MigrationError(f"{where} is not valid base64") from None


def _text_value(raw: object, where: str) -> bytes:
    if not isinstance(raw, str):
        # YAML reads `port: 5432` as a number; the API takes only strings here.
        raise MigrationError(f"{where} is not a string (quote it)")
    return raw.encode("utf-8")


def read_env(path: Path, *, name: str | None = None, name_prefix: str = "",
             per_key: bool = False) -> list[SourceSecret]:
    """A `.env` file (see `parse_env`): by default one secret whose value is a JSON
    object of its variables, named `name` (else the file's name without its leading
    dots: `.env` gives `env`); with `per_key`, one secret per variable, named by it."""
    variables = parse_env(_read_text(path), str(path))
    if not variables:
        raise MigrationError(f"{path}: no variables to import")
    if per_key:
        return [_one_value(name_prefix + key, f"variable {key} in {path}", value.encode())
                for key, value in variables.items()]
    if name is None:
        name = "" if str(path) == "-" else Path(path).name.lstrip(".")
    if not name:
        raise MigrationError("give the secret's name with --name")
    return [_json_value(name_prefix + name, f"env file {path}", variables)]


_ENV_ASSIGNMENT = re.compile(r"(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*")
_ENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def parse_env(text: str, where: str = ".env") -> dict[str, str]:
    """KEY=VALUE lines, as docker compose and python-dotenv read them, without
    interpolation (a `$` is kept): blank lines and `#` comments are skipped; an
    `export ` prefix is allowed; an unquoted value ends at the line's end or at a `#`
    after whitespace and is stripped; 'single quotes' are literal; "double quotes"
    know \\n \\t \\r \\" \\\\ \\$; quoted values may span lines. A later KEY wins.
    Errors name the line, never a value."""
    values: dict[str, str] = {}
    position = 0
    while True:
        position = _skip_blank_and_comments(text, position)
        if position >= len(text):
            return values
        line = text.count("\n", 0, position) + 1
        match = _ENV_ASSIGNMENT.match(text, position)
        if match is None:
            raise MigrationError(f"{where}: line {line}: expected KEY=VALUE")
        key, position = match[1], match.end()
        value, position = _env_value(text, position, f"{where}: line {line}: {key}")
        values[key] = value


def _skip_blank_and_comments(text: str, position: int) -> int:
    while position < len(text):
        if text[position].isspace():
            position += 1
        elif text[position] == "#":
            end = text.find("\n", position)
            position = len(text) if end < 0 else end
        else:
            break
    return position


def _env_value(text: str, position: int, where: str) -> tuple[str, int]:
    end_of_line = text.find("\n", position)
    end_of_line = len(text) if end_of_line < 0 else end_of_line
    quote = text[position] if position < len(text) else ""
    if quote not in ("'", '"'):
        raw = text[position:end_of_line]
        comment = re.search(r"\s#", raw)
        return (raw[:comment.start()] if comment else raw).strip(), end_of_line
    chars, index = [], position + 1
    while index < len(text) and text[index] != quote:
        if quote == '"' and text[index] == "\\" and index + 1 < len(text):
            escaped = text[index + 1]
            chars.append(_ENV_ESCAPES.get(escaped, "\\" + escaped))
            index += 2
        else:
            chars.append(text[index])
            index += 1
    if index >= len(text):
        raise MigrationError(f"{where}: the quoted value has no closing {quote}")
    rest_end = text.find("\n", index)
    rest = text[index + 1:len(text) if rest_end < 0 else rest_end]
    if rest.strip() and not rest.strip().startswith("#"):
        raise MigrationError(f"{where}: unexpected text after the closing {quote}")
    return "".join(chars), index + 1 + len(rest)


def _read_bytes(path: Path) -> bytes:
    try:
        if str(path) == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as error:
        raise MigrationError(f"{path}: {error.strerror or error}") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise MigrationError(f"{path}: not UTF-8 text") from None


def _yaml_documents(path: Path) -> list:
    import yaml

    try:
        return list(yaml.safe_load_all(_read_text(path)))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed"
        raise MigrationError(f"{path}: invalid YAML{where}: {problem}") from None


# --- the plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One daemon call of the plan; its parameters may hold a value, so never shown."""

    action: str
    params: dict = field(repr=False)


@dataclass(frozen=True)
class Change:
    name: str
    kind: str  # "create", "update" or "unchanged"
    detail: str
    calls: tuple[Call, ...] = ()


@dataclass(frozen=True)
class Plan:
    source: str
    changes: tuple[Change, ...]

    def count(self, kind: str) -> int:
        return sum(change.kind == kind for change in self.changes)

    def summary(self, *, dry_run: bool) -> str:
        counts = (f"{self.count('create')} created, {self.count('update')} updated, "
                  f"{self.count('unchanged')} unchanged")
        if dry_run:
            counts = counts.replace("created", "to create").replace("updated", "to update")
            return (f"dry run, nothing written: {len(self.changes)} secrets from "
                    f"{self.source}: {counts}")
        return f"imported {len(self.changes)} secrets from {self.source}: {counts}"

    def lines(self) -> list[str]:
        """What the import does, one line per secret (names and counts, no values)."""
        return ["\t".join(filter(None, (change.kind, change.name, change.detail)))
                for change in self.changes]


class LocalSecrets:
    """What the daemon holds, read through its API (each read is authorized and
    audited like any other)."""

    def __init__(self, client):
        self.client = client

    def _pages(self, action: str, params: dict, results: str) -> list[dict]:
        found, params = [], dict(params)
        while True:
            page = self.client.call(action, params)
            found += page.get(results, [])
            if not page.get("NextToken"):
                return found
            params["NextToken"] = page["NextToken"]

    def secrets(self) -> dict[str, dict]:
        """Every secret by name, those scheduled for deletion included."""
        return {entry["Name"]: entry for entry in self._pages(
            "ListSecrets", {"IncludePlannedDeletion": True}, "SecretList")}

    def versions(self, name: str) -> list[str]:
        return [entry["VersionId"] for entry in self._pages(
            "ListSecretVersionIds", {"SecretId": name, "IncludeDeprecated": True}, "Versions")]

    def value(self, name: str, version_id: str) -> Value | None:
        try:
            answer = self.client.call("GetSecretValue",
                                      {"SecretId": name, "VersionId": version_id})
        except model.ResourceNotFoundException:
            return None  # a version a rotation created, still without a value
        if "SecretBinary" in answer:
            return Value(answer["SecretBinary"], True)
        return Value(answer["SecretString"].encode("utf-8"), False)


def plan(source: str, secrets: list[SourceSecret], local: LocalSecrets) -> Plan:
    """What importing `secrets` changes; MigrationError for anything that would fail."""
    for secret in secrets:
        _validate(secret)
    existing = local.secrets()
    _check_directories(secrets, existing)
    changes = []
    for secret in secrets:
        entry = existing.get(secret.name)
        if entry is None:
            changes.append(_create(secret))
        elif entry.get("DeletedDate") is not None:
            raise MigrationError(
                f"{secret.origin}: the secret {secret.name} is scheduled for deletion "
                "here; restore-secret it (or delete it for good) and import again")
        else:
            changes.append(_update(secret, entry, local))
    return Plan(source, tuple(changes))


def apply(plan: Plan, client) -> None:
    """Make the plan's calls in order; ImportStopped names the call the daemon refused."""
    for done, change in enumerate(plan.changes):
        try:
            for call in change.calls:
                client.call(call.action, call.params)
        except SecretsManagerError as error:
            raise ImportStopped(change.name, done, len(plan.changes), error) from None


def _validate(secret: SourceSecret) -> None:
    def refuse(problem: str) -> MigrationError:
        return MigrationError(f"{secret.origin}: {problem}")

    try:
        model.validate_name(secret.name)
    except SecretsManagerError as error:
        raise refuse(f"invalid secret name {secret.name!r}: {error.message}") from None
    if secret.description is not None and len(secret.description) > model.DESCRIPTION_MAX:
        raise refuse(f"the description is longer than {model.DESCRIPTION_MAX} characters")
    try:
        model.validate_tags([{"Key": key, "Value": value} for key, value in secret.tags])
        if len(secret.tags) > model.TAGS_MAX:
            raise refuse(f"more than {model.TAGS_MAX} tags")
        for version in secret.versions:
            for label in version.stages:
                model.validate_label(label)
            if version.version_id is not None:
                model.validate_token(version.version_id)
    except SecretsManagerError as error:
        raise refuse(error.message) from None
    for version in secret.versions:
        if not version.value.data:
            raise refuse("the value is empty (Secrets Manager stores no empty value)")
        if len(version.value.data) > model.VALUE_MAX:
            raise refuse(f"the value is {len(version.value.data)} bytes; the maximum is "
                         f"{model.VALUE_MAX}")


def _directory(name: str) -> str:
    return "/".join(model.name_segments(name))


def _check_directories(secrets: list[SourceSecret], existing: dict[str, dict]) -> None:
    """The names-as-directories rule (README, "Name rules") over the imported names
    and the daemon's, so a collision is refused before the first write. The daemon
    still decides: it checks every create again."""
    owners: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for name, entry in existing.items():
        owners[_directory(name)] = name
        labels[_directory(name)] = {model.file_name(label) for stages in (
            entry.get("SecretVersionsToStages") or {}).values() for label in stages}
    origins = {}
    for secret in secrets:
        path = _directory(secret.name)
        holder = owners.get(path)
        if secret.name in origins:
            raise MigrationError(f"{secret.origin}: the name {secret.name} is also given by "
                                 f"{origins[secret.name]}")
        if holder is not None and holder != secret.name:
            raise MigrationError(f"{secret.origin}: {secret.name} would share the directory "
                                 f"{path!r} with the secret {holder}")
        owners[path], origins[secret.name] = secret.name, secret.origin
        labels.setdefault(path, set()).update(
            model.file_name(label) for version in secret.versions for label in version.stages)
    for secret in secrets:
        segments = _directory(secret.name).split("/")
        for depth in range(1, len(segments)):
            ancestor = "/".join(segments[:depth])
            child = segments[depth]
            if ancestor in owners and (child in model.RESERVED_SEGMENTS
                                       or child in labels[ancestor]):
                raise MigrationError(
                    f"{secret.origin}: the name segment {child!r} can't be used below the "
                    f"secret {owners[ancestor]}: its directory uses it (versions, keys and "
                    "staging labels are reserved there)")
        below = _directory(secret.name) + "/"
        for path, name in owners.items():
            child = path[len(below):].split("/")[0] if path.startswith(below) else None
            if child is not None and child in labels[_directory(secret.name)] | set(
                    model.RESERVED_SEGMENTS):
                raise MigrationError(
                    f"{secret.origin}: {secret.name} would own the name {child!r}, which "
                    f"the secret {name} uses as a directory")


def _version_calls(name: str, version: SourceVersion) -> list[Call]:
    token = {"ClientRequestToken": version.version_id} if version.version_id else {}
    stages = list(version.stages) or [IMPORT_LABEL]
    calls = [Call("PutSecretValue", {"SecretId": name, **token, "VersionStages": stages,
                                     **version.value.params()})]
    if not version.stages:
        calls.append(Call("UpdateSecretVersionStage", {
            "SecretId": name, "VersionStage": IMPORT_LABEL,
            "RemoveFromVersionId": version.version_id}))
    return calls


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _create(secret: SourceSecret) -> Change:
    params: dict[str, Any] = {"Name": secret.name}
    if secret.description is not None:
        params["Description"] = secret.description
    if secret.tags:
        params["Tags"] = [{"Key": key, "Value": value} for key, value in secret.tags]
    versions = list(secret.versions)
    first = versions[0] if versions else None
    if first is not None and first.version_id is None and first.stages == (AWSCURRENT,):
        # One value and no id to keep: CreateSecret writes it in the same transaction.
        params.update(first.value.params())
        versions = versions[1:]
    calls = [Call("CreateSecret", params)]
    for version in versions:
        calls += _version_calls(secret.name, version)
    return Change(secret.name, "create", _plural(len(secret.versions), "version"),
                  tuple(calls))


def _update(secret: SourceSecret, entry: dict, local: LocalSecrets) -> Change:
    present = local.versions(secret.name)
    calls: list[Call] = []
    if any(version.version_id is None for version in secret.versions):
        held = [local.value(secret.name, version_id) for version_id in present]
        new = [version for version in secret.versions
               if not any(version.value.same_as(value) for value in held)]
    else:
        new = [version for version in secret.versions if version.version_id not in present]
        for version in secret.versions:
            if version.version_id in present and not version.value.same_as(
                    local.value(secret.name, version.version_id)):
                raise MigrationError(
                    f"{secret.origin}: version {version.version_id} of {secret.name} "
                    "exists here with another value")
    for version in new:
        calls += _version_calls(secret.name, version)
    changed = []
    if secret.description is not None and secret.description != entry.get("Description"):
        calls.append(Call("UpdateSecret", {"SecretId": secret.name,
                                           "Description": secret.description}))
        changed.append("description")
    held_tags = {tag["Key"]: tag.get("Value", "") for tag in entry.get("Tags") or ()}
    tags = [{"Key": key, "Value": value} for key, value in secret.tags
            if held_tags.get(key) != value]
    if tags:
        calls.append(Call("TagResource", {"SecretId": secret.name, "Tags": tags}))
        changed.append(_plural(len(tags), "tag"))
    if new:
        changed.insert(0, _plural(len(new), "new version"))
    if not calls:
        return Change(secret.name, "unchanged", "")
    return Change(secret.name, "update", ", ".join(changed), tuple(calls))


# --- the command line ---------------------------------------------------------------

def add_parsers(verbs, add_state_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    """`secretfs import SOURCE ...`, one sub-verb per source."""
    parser = verbs.add_parser(
        "import", allow_abbrev=False,
        help="Import secrets from AWS Secrets Manager, files, Kubernetes, docker or .env.",
        description="Create (or bring up to date) secrets from another source, through "
                    "the daemon. Everything is read and checked before the first write; "
                    "running an import again writes only what changed.")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    def source(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = sources.add_parser(name, help=help_text, description=help_text,
                                 allow_abbrev=False)
        sub.add_argument("--name-prefix", default="", metavar="PREFIX",
                         help="Put this in front of every secret's name (e.g. 'legacy/').")
        sub.add_argument("--dry-run", action="store_true",
                         help="List what would be created or updated; write nothing.")
        add_state_dir(sub)
        sub.set_defaults(run=_run_import)
        return sub

    sub = source("aws", "Every secret of an AWS Secrets Manager account, all versions with "
                        "their staging labels, descriptions and tags.")
    sub.add_argument("--endpoint-url", metavar="URL", help="Another endpoint (e.g. moto).")
    sub.add_argument("--region", help="The AWS region (default: the AWS CLI's).")
    sub.add_argument("--profile", help="A profile of the AWS CLI's configuration.")
    sub.add_argument("--prefix", default="", help="Only secrets whose name starts with this.")
    sub = source("dir", "One secret per file below a directory, named by its relative path.")
    sub.add_argument("path", type=Path, metavar="DIR")
    sub = source("kubernetes", "Kubernetes Secrets from YAML ('-': stdin): one secret "
                               "<namespace>/<name> whose value is a JSON object of its keys.")
    sub.add_argument("path", type=Path, metavar="FILE")
    sub.add_argument("--per-key", action="store_true",
                     help="One secret per key instead, <namespace>/<name>/<key>.")
    sub = source("docker", "Docker secrets: a directory like /run/secrets (one file per "
                           "secret), or a compose file's top-level secrets.")
    sub.add_argument("path", type=Path, metavar="DIR|COMPOSE-FILE", nargs="?",
                     default=DOCKER_SECRETS)
    sub = source("env", "A .env file ('-': stdin): one secret whose value is a JSON object "
                        "of its variables.")
    sub.add_argument("path", type=Path, metavar="FILE")
    sub.add_argument("--name", help="The secret's name (default: the file's name without "
                                    "leading dots).")
    sub.add_argument("--per-key", action="store_true",
                     help="One secret per variable instead, named by the variable.")


def read_source(args: argparse.Namespace) -> list[SourceSecret]:
    if args.source == "aws":
        return read_aws(endpoint_url=args.endpoint_url, region=args.region,
                        profile=args.profile, prefix=args.prefix, name_prefix=args.name_prefix)
    if args.source == "dir":
        return read_directory(args.path, name_prefix=args.name_prefix)
    if args.source == "kubernetes":
        return read_kubernetes(args.path, name_prefix=args.name_prefix, per_key=args.per_key)
    if args.source == "docker":
        return read_docker(args.path, name_prefix=args.name_prefix)
    return read_env(args.path, name=args.name, name_prefix=args.name_prefix,
                    per_key=args.per_key)


def _source_label(args: argparse.Namespace) -> str:
    if args.source == "aws":
        return "AWS Secrets Manager" + (f" ({args.endpoint_url})" if args.endpoint_url else "")
    return f"{args.source} {args.path}"


def _run_import(args: argparse.Namespace) -> int:
    """Errors are printed here, as one line, rather than raised as cli.py's: run as
    `python -m secretfs.cli`, that module's classes are __main__'s, not these."""
    from secretfs.api.client import Client, ClientConnectionError
    from secretfs.state import StateDir, resolve_state_dir

    if args.source == "env" and args.per_key and args.name:
        return fail("secretfs import env: --name names the one JSON secret; with --per-key "
                    "each variable names its own", EXIT_USAGE)
    client = Client(StateDir(resolve_state_dir(args.state_dir)).socket)
    try:
        secrets = read_source(args)
        the_plan = plan(_source_label(args), secrets, LocalSecrets(client))
        if args.dry_run:
            for line in the_plan.lines():
                print(line)
        else:
            apply(the_plan, client)
    except (MigrationError, ClientConnectionError) as error:
        return fail(str(error), EXIT_FAILURE)
    except SecretsManagerError as error:  # a read of the plan refused (AccessDenied, ...)
        return fail(f"An error occurred ({error.code}) when reading the daemon's secrets: "
                    f"{error.message}", EXIT_SERVICE_ERROR)
    except ImportStopped as error:
        return fail(str(error), EXIT_SERVICE_ERROR)
    print(the_plan.summary(dry_run=args.dry_run))
    return EXIT_OK


def fail(message: str, code: int) -> int:
    """Print one line on stderr; the exit code."""
    print(_one_line(message), file=sys.stderr)
    return code
