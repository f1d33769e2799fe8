"""A model-checked run of the service: hypothesis drives random sequences of create,
put, label moves, delete, restore, purge, rotate, run-the-rotation and cancel against
a small reference of AWS's rules, and checks every response and, after every step, what
the API and the filesystem's layout show of the secret it touched.

The reference is written from AWS's documented behaviour and README: a label is on at
most one version; moving AWSCURRENT leaves AWSPREVIOUS on the version it left; the
first version always gets AWSCURRENT; a ClientRequestToken is the version id
(repeating it with the same value changes nothing, with another value is an error); a
secret scheduled for deletion refuses reads and writes with InvalidRequestException
and leaves the tree until restored; RotateSecret opens an empty AWSPENDING version that
the rotator fills and finishSecret promotes; names-as-directories collisions are
InvalidParameterException. The rotations run through RotationRunner with the
random-password rotator, as the daemon runs them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import trio
from _reliability import AWSCURRENT, entry_name, files_below, path_of, plaintext_in
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from secretfs import model
from secretfs.fs import layout as L
from secretfs.identity import SYSTEM
from secretfs.rotation.runner import STEPS, RotationRunner

pytest_plugins = ["_service_fixtures"]
pytestmark = [pytest.mark.reliability]

AWSPREVIOUS, AWSPENDING = "AWSPREVIOUS", "AWSPENDING"
AWS_LABELS = (AWSCURRENT, AWSPREVIOUS, AWSPENDING)
ROTATOR = "secretfs:random-password"
# `gamma/delta` lives in `gamma`'s directory, where a label `delta` would collide.
NAMES = ("alpha", "beta", "gamma", "gamma/delta")
LABELS = ("BLUE", "delta", *AWS_LABELS)
STAGES = ([AWSCURRENT], ["BLUE"], [AWSPENDING], ["BLUE", AWSCURRENT], [AWSPREVIOUS],
          ["delta"], [AWSCURRENT, AWSPREVIOUS], None)
SHAPES = ("plain", "json", "binary")
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
RESERVED = {"versions", "keys", *AWS_LABELS}


# --- the reference ---------------------------------------------------------------------

@dataclass
class Rotation:
    arn: str
    enabled: bool = True
    pending: str | None = None  # the open rotation's token
    step: str | None = None  # the last step it completed
    failed: bool = False  # its last attempt failed
    rotated: bool = False  # one has completed
    attempts: int = 0  # failed attempts of the open rotation
    retry_at: datetime | None = None  # after a failure: when the runner tries again


@dataclass
class Secret:
    name: str
    versions: dict[str, str | bytes | None] = field(default_factory=dict)  # None: no value yet
    labels: dict[str, str] = field(default_factory=dict)
    deleted: datetime | None = None
    rotation: Rotation | None = None

    def stages(self) -> dict[str, list[str]]:
        mapping: dict[str, list[str]] = {}
        for label, version_id in sorted(self.labels.items()):
            mapping.setdefault(version_id, []).append(label)
        return mapping


class Refused(Exception):
    """What the reference says the service must answer instead: an error code."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _document(value: str | bytes) -> dict | None:
    """The JSON object a value holds, if it is one (its keys are files in the mount)."""
    try:
        document = json.loads(value)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _value_of(answer: dict) -> str | bytes:
    return answer["SecretBinary"] if "SecretBinary" in answer else answer["SecretString"]


class Reference:
    def __init__(self) -> None:
        self.secrets: dict[str, Secret] = {}

    def get(self, name: str) -> Secret:
        if name not in self.secrets:
            raise Refused("ResourceNotFoundException")
        return self.secrets[name]

    def live(self, name: str) -> Secret:
        secret = self.get(name)
        if secret.deleted is not None:
            raise Refused("InvalidRequestException")
        return secret

    def child_dirs(self, name: str) -> set[str]:
        """Segments below a secret's directory taken by other secrets (any state)."""
        prefix = path_of(name) + "/"
        return {path_of(other)[len(prefix):].split("/")[0] for other in self.secrets
                if path_of(other).startswith(prefix)}

    def check_create(self, name: str) -> None:
        if name in self.secrets:
            raise Refused("InvalidRequestException" if self.secrets[name].deleted
                          else "ResourceExistsException")
        segments = path_of(name).split("/")
        for depth in range(1, len(segments)):
            holder = next((secret for other, secret in self.secrets.items()
                           if path_of(other) == "/".join(segments[:depth])), None)
            if holder is not None and (segments[depth] in RESERVED or segments[depth] in {
                    entry_name(label) for label in holder.labels}):
                raise Refused("InvalidParameterException")
        if self.child_dirs(name) & RESERVED:
            raise Refused("InvalidParameterException")

    def attach(self, secret: Secret, version_id: str, stages: list[str]) -> None:
        """Labels onto a version, as AWS moves them; checks first, changes after."""
        for label in stages:
            if label not in AWS_LABELS and label not in secret.labels and (
                    entry_name(label) in ("versions", "keys")
                    or entry_name(label) in self.child_dirs(secret.name)):
                raise Refused("InvalidParameterException")
        before = dict(secret.labels)
        for label in stages:
            previous = secret.labels.get(label)
            if previous == version_id:
                continue
            secret.labels[label] = version_id
            if label == AWSCURRENT and previous is not None and AWSPREVIOUS not in stages:
                secret.labels[AWSPREVIOUS] = previous
        rotation = secret.rotation
        if AWSCURRENT in stages and rotation is not None and rotation.pending == version_id:
            if before.get(AWSPENDING) == version_id:
                del secret.labels[AWSPENDING]
            rotation.pending, rotation.step, rotation.failed = None, None, False
            rotation.rotated = True


# --- the machine -----------------------------------------------------------------------

class ServiceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        from _service_fixtures import Clock, make_service  # this module's plugin

        self.directory = Path(tempfile.mkdtemp(prefix="sfs-stateful-", dir=SCRATCH))
        self.clock = Clock()
        self.store, self.service = make_service(self.directory, self.clock)
        self.ref = Reference()
        self.values: list[str | bytes] = []  # every value stored, for the plaintext scan

    # --- calling the service, and comparing its answer with the reference's ---

    def call(self, action: str, **params) -> dict | None:
        self.clock.advance(seconds=1)
        try:
            return self.service.call(action, params, SYSTEM)
        except model.SecretsManagerError as error:
            return {"__error": error.code}

    def expect(self, answer: dict, refused: Refused | None, what: str) -> bool:
        """Whether the call succeeded; fails the test when that isn't the reference's
        answer, or the error code differs."""
        got = answer.get("__error")
        wanted = refused.code if refused else None
        assert got == wanted, f"{what}: the service answered {got}, the reference {wanted}"
        return got is None

    def new_value(self, shape: str) -> str | bytes:
        token = f"sfs-sm-{secrets.token_hex(12)}"
        value: str | bytes = {"plain": token, "binary": token.encode(),
                              "json": json.dumps({"user": "app", "password": token})}[shape]
        self.values.append(token)
        return value

    @staticmethod
    def member(value: str | bytes) -> dict:
        return {"SecretBinary": value} if isinstance(value, bytes) else {"SecretString": value}

    # --- rules ---

    @initialize(shapes=st.lists(st.sampled_from(SHAPES), min_size=3, max_size=3))
    def secrets_to_begin_with(self, shapes):
        """Most steps find secrets to work on: alpha, beta and gamma exist."""
        for name, shape in zip(NAMES, shapes, strict=False):
            self.create(name, shape, with_value=True, tokened=False)

    @rule(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES),
          with_value=st.booleans(), tokened=st.booleans())
    def create(self, name, shape, with_value, tokened):
        value = self.new_value(shape) if with_value else None
        token = str(uuid.uuid4()) if tokened else None
        params = {"Name": name, **(self.member(value) if value is not None else {})}
        if token:
            params["ClientRequestToken"] = token
        try:
            self.ref.check_create(name)
            refused = None
        except Refused as error:
            refused = error
        answer = self.call("CreateSecret", **params)
        if self.expect(answer, refused, f"CreateSecret {name}"):
            secret = Secret(name)
            if value is not None:
                assert answer["VersionId"] == (token or answer["VersionId"])
                secret.versions[answer["VersionId"]] = value
                secret.labels[AWSCURRENT] = answer["VersionId"]
            else:
                assert "VersionId" not in answer
            self.ref.secrets[name] = secret
        self.check(name)

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def repeat_create(self, name, data):
        """CreateSecret again with a version's token: the same value changes nothing."""
        secret = self.ref.secrets.get(name)
        if secret is None or not any(value is not None for value in secret.versions.values()):
            return
        version_id = data.draw(st.sampled_from(
            [vid for vid, value in secret.versions.items() if value is not None]))
        same = data.draw(st.booleans())
        value = secret.versions[version_id] if same else self.new_value("plain")
        answer = self.call("CreateSecret", Name=name, ClientRequestToken=version_id,
                           **self.member(value))
        refused = (Refused("InvalidRequestException") if secret.deleted
                   else None if same else Refused("ResourceExistsException"))
        if self.expect(answer, refused, f"CreateSecret {name} again"):
            assert answer["VersionId"] == version_id
        self.check(name)

    @rule(name=st.sampled_from(NAMES), shape=st.sampled_from(SHAPES),
          stages=st.sampled_from(STAGES), token=st.sampled_from(["new", "none", "existing"]),
          data=st.data())
    def put(self, name, shape, stages, token, data):
        value = self.new_value(shape)
        version_id = None
        secret = self.ref.secrets.get(name)
        if token == "new":
            version_id = str(uuid.uuid4())
        elif token == "existing" and secret is not None and secret.versions:
            version_id = data.draw(st.sampled_from(list(secret.versions)))
            if secret.versions[version_id] is not None and data.draw(st.booleans()):
                value = secret.versions[version_id]  # a retry with the same value
        params = {"SecretId": name, **self.member(value)}
        if version_id:
            params["ClientRequestToken"] = version_id
        if stages is not None:
            params["VersionStages"] = stages
        try:
            secret = self.ref.live(name)
            existing = secret.versions.get(version_id) if version_id else None
            if existing is not None:
                if existing != value:
                    raise Refused("ResourceExistsException")
                refused, change = None, None  # an idempotent retry
            else:
                wanted = list(stages or [AWSCURRENT])
                if AWSCURRENT not in secret.labels and AWSCURRENT not in wanted and (
                        version_id not in secret.versions):
                    wanted.append(AWSCURRENT)  # the first version always gets AWSCURRENT
                trial = self.copy(secret)
                self.ref.attach(trial, version_id or "new", wanted)
                refused, change = None, wanted
        except Refused as error:
            refused, change = error, None
        answer = self.call("PutSecretValue", **params)
        if self.expect(answer, refused, f"PutSecretValue {name} {stages}"):
            got = answer["VersionId"]
            assert got == (version_id or got)
            if change is not None:
                secret.versions[got] = value
                self.ref.attach(secret, got, change)
            assert answer["VersionStages"] == secret.stages().get(got, [])
        self.check(name)

    @staticmethod
    def copy(secret: Secret) -> Secret:
        rotation = None if secret.rotation is None else Rotation(**vars(secret.rotation))
        return Secret(secret.name, dict(secret.versions), dict(secret.labels), secret.deleted,
                      rotation)

    @rule(name=st.sampled_from(NAMES), label=st.sampled_from(LABELS), data=st.data())
    def move(self, name, label, data):
        secret = self.ref.secrets.get(name)
        known = list(secret.versions) if secret else []  # by age: ids are random
        unknown = str(uuid.uuid4())
        to = data.draw(st.sampled_from([*known, unknown, None]))
        holder = secret.labels.get(label) if secret else None
        remove = data.draw(st.sampled_from([holder, None, unknown, *known[:2]]))
        params = {"SecretId": name, "VersionStage": label}
        if to is not None:
            params["MoveToVersionId"] = to
        if remove is not None:
            params["RemoveFromVersionId"] = remove
        try:
            self.ref.get(name)
            if to is None and remove is None:
                raise Refused("InvalidParameterException")
            secret = self.ref.live(name)
            if remove is not None and (remove not in secret.versions or holder != remove):
                raise Refused("InvalidParameterException")
            if to is None:
                if label == AWSCURRENT:
                    raise Refused("InvalidParameterException")
                change = "remove"
            else:
                if to not in secret.versions:
                    raise Refused("ResourceNotFoundException")
                if holder is not None and holder not in (to, remove):
                    raise Refused("InvalidParameterException")
                if label == AWSCURRENT and secret.versions[to] is None:
                    raise Refused("InvalidRequestException")
                self.ref.attach(self.copy(secret), to, [label])
                change = "move"
            refused = None
        except Refused as error:
            refused, change = error, None
        answer = self.call("UpdateSecretVersionStage", **params)
        if self.expect(answer, refused, f"UpdateSecretVersionStage {name} {label}"):
            if change == "remove":
                del secret.labels[label]
            else:
                self.ref.attach(secret, to, [label])
        self.check(name)

    @rule(name=st.sampled_from(NAMES), force=st.booleans(), days=st.sampled_from([7, 30]))
    def delete(self, name, force, days):
        params = {"SecretId": name}
        params.update({"ForceDeleteWithoutRecovery": True} if force else
                      {"RecoveryWindowInDays": days})
        try:
            secret = self.ref.get(name)
            if not force and secret.deleted is not None:
                raise Refused("InvalidRequestException")
            refused = None
        except Refused as error:
            refused = error
        answer = self.call("DeleteSecret", **params)
        if self.expect(answer, refused, f"DeleteSecret {name}"):
            if force:
                del self.ref.secrets[name]
            else:
                secret.deleted = self.clock.now + timedelta(days=days)
                assert answer["DeletionDate"] == secret.deleted
        self.check(name)

    @rule(name=st.sampled_from(NAMES))
    def restore(self, name):
        try:
            secret = self.ref.get(name)
            if secret.deleted is None:
                raise Refused("InvalidRequestException")
            refused = None
        except Refused as error:
            refused = error
        if self.expect(self.call("RestoreSecret", SecretId=name), refused,
                       f"RestoreSecret {name}"):
            secret.deleted = None
        self.check(name)

    @rule(days=st.sampled_from([6, 31]))
    def purge(self, days):
        """Time passes and the daemon's housekeeping purges what is past its window."""
        self.clock.advance(days=days)
        due = [name for name, secret in self.ref.secrets.items()
               if secret.deleted is not None and secret.deleted <= self.clock.now]
        assert self.service.purge_expired() == len(due)
        for name in due:
            del self.ref.secrets[name]
            self.check(name)

    @rule(name=st.sampled_from(NAMES), immediately=st.booleans(), named=st.booleans(),
          token=st.sampled_from(["none", "new", "existing"]), data=st.data())
    def rotate(self, name, immediately, named, token, data):
        secret = self.ref.secrets.get(name)
        params = {"SecretId": name}
        if named:
            params["RotationLambdaARN"] = ROTATOR
        if not immediately:
            params.update(RotateImmediately=False,
                          RotationRules={"AutomaticallyAfterDays": 30})
        version_id = None
        if token == "new":
            version_id = str(uuid.uuid4())
        elif token == "existing" and secret is not None and secret.versions:
            version_id = data.draw(st.sampled_from(list(secret.versions)))
        if version_id:
            params["ClientRequestToken"] = version_id
        opened = None
        try:
            secret = self.ref.live(name)
            if not named and secret.rotation is None:
                raise Refused("InvalidRequestException")
            if immediately:
                opened = self.open(secret, version_id)
            refused = None
        except Refused as error:
            refused = error
        answer = self.call("RotateSecret", **params)
        if self.expect(answer, refused, f"RotateSecret {name}"):
            rotation = secret.rotation or Rotation(ROTATOR)
            rotation.enabled = True
            secret.rotation = rotation
            if opened == "repeat":
                assert answer["VersionId"] == version_id
            elif opened == "new":
                self.start(secret, answer["VersionId"])
                assert answer["VersionId"] == (version_id or answer["VersionId"])
            else:
                assert "VersionId" not in answer
        self.check(name)

    @staticmethod
    def open(secret: Secret, token: str | None) -> str:
        """Whether a rotation can start now ("new"), or this is its repeat ("repeat")."""
        pending, current = secret.labels.get(AWSPENDING), secret.labels.get(AWSCURRENT)
        if pending is not None and pending != current:
            if token is not None and pending == token:
                return "repeat"
            raise Refused("InvalidRequestException")
        if current is None:
            raise Refused("InvalidRequestException")
        if token is not None and token in secret.versions:
            raise Refused("ResourceExistsException")
        return "new"

    @staticmethod
    def start(secret: Secret, version_id: str) -> None:
        secret.versions[version_id] = None
        secret.labels[AWSPENDING] = version_id
        secret.rotation.pending, secret.rotation.step = version_id, None
        secret.rotation.failed = False
        secret.rotation.attempts, secret.rotation.retry_at = 0, None

    @rule(name=st.sampled_from(NAMES))
    def cancel(self, name):
        try:
            secret = self.ref.live(name)
            rotation = secret.rotation
            if rotation is None or (not rotation.enabled and rotation.pending is None):
                raise Refused("InvalidRequestException")
            refused = None
        except Refused as error:
            refused = error
        answer = self.call("CancelRotateSecret", SecretId=name)
        if self.expect(answer, refused, f"CancelRotateSecret {name}"):
            assert answer.get("VersionId") == rotation.pending
            rotation.enabled, rotation.pending, rotation.step = False, None, None
            rotation.failed = False
        self.check(name)

    @precondition(lambda self: self.ref.secrets)
    @rule(data=st.data())
    def run_rotation(self, data):
        """The runner's turn for one secret: its four steps, as the daemon runs them."""
        rotating = sorted(name for name, secret in self.ref.secrets.items()
                          if secret.rotation and secret.rotation.pending)
        name = data.draw(st.sampled_from(rotating if rotating and data.draw(st.booleans())
                                         else sorted(self.ref.secrets)))
        secret = self.ref.secrets[name]
        rotation = secret.rotation
        plan = "nothing"
        self.clock.advance(seconds=1)
        if secret.deleted is None and rotation is not None and self.due(secret):
            if rotation.pending is not None:
                plan = "resume"
            elif rotation.enabled:
                try:
                    self.open(secret, None)
                    plan = "open"
                except Refused:
                    plan = "nothing"  # the runner can't open it: logged, nothing changes
        known = set(secret.versions)
        finished = trio.run(RotationRunner(self.service).rotate,
                            self.service.catalog.id_by_name(name))
        outcome = "nothing"
        if plan == "open":  # the runner drew the token: learn it
            drawn = [version["VersionId"] for version in self.call(
                "ListSecretVersionIds", SecretId=name, IncludeDeprecated=True)["Versions"]
                if version["VersionId"] not in known]
            assert len(drawn) == 1, drawn
            self.start(secret, drawn[0])
        if plan != "nothing":
            outcome = self.steps(secret)
        assert finished == (outcome == "finished"), (name, plan, outcome)
        self.check(name)

    def steps(self, secret: Secret) -> str:
        """RotationRunner's steps with the random-password rotator, on the reference."""
        rotation = secret.rotation
        token = rotation.pending
        done = STEPS.index(rotation.step) + 1 if rotation.step in STEPS else 0
        for step in STEPS[done:]:
            try:
                if step in ("createSecret", "testSecret"):
                    # The rotator asks for the version under AWSPENDING.
                    if secret.labels.get(AWSPENDING) != token:
                        raise Refused("InvalidRequestException")
                    if secret.versions[token] is None:
                        if step == "testSecret":
                            raise Refused("ResourceNotFoundException")
                        secret.versions[token] = self.learn_password(secret, token)
                elif step == "finishSecret":
                    current = secret.labels[AWSCURRENT]
                    if current != token:
                        self.ref.attach(secret, token, [AWSCURRENT])
            except Refused:
                if rotation.pending == token:
                    rotation.failed = True
                    # The service's backoff: a minute, doubling, at most an hour.
                    rotation.attempts += 1
                    rotation.retry_at = self.clock() + timedelta(seconds=min(
                        self.service.ROTATION_RETRY_MIN * 2 ** (rotation.attempts - 1),
                        self.service.ROTATION_RETRY_MAX))
                return "failed"
            if rotation.pending == token:
                rotation.step, rotation.failed = step, False
                rotation.retry_at = None
        return "finished"

    def due(self, secret: Secret) -> bool:
        """Whether the runner's turn runs this secret's rotation: an open one unless it
        waits out a failure's backoff; else one the published schedule (DescribeSecret's
        NextRotationDate) says is due. A runner never starts one that isn't due: in a
        fleet, another host may have just finished it."""
        rotation = secret.rotation
        if rotation.pending is not None:
            return rotation.retry_at is None or rotation.retry_at <= self.clock()
        described = self.call("DescribeSecret", SecretId=secret.name)
        due = described.get("NextRotationDate")
        return due is not None and due <= self.clock()

    def learn_password(self, secret: Secret, token: str) -> str:
        """The value createSecret stored: a new 32-character password, in place of the
        current value's `password` when that is a JSON object."""
        stored = self.service.call("GetSecretValue", {"SecretId": secret.name,
                                                      "VersionId": token}, SYSTEM)
        value = stored["SecretString"]
        current = secret.versions[secret.labels[AWSCURRENT]]
        document = _document(current) if isinstance(current, str) else None
        if document is not None:
            password = json.loads(value)["password"]
            assert json.loads(value) == {**document, "password": password}
        else:
            password = value
        assert len(password) == 32 and password != document
        self.values.append(password)
        return value

    # --- what the service shows, against the reference ---

    @invariant()
    def listed(self):
        names = sorted(entry["Name"] for entry in self.call("ListSecrets")["SecretList"])
        assert names == sorted(name for name, secret in self.ref.secrets.items()
                               if secret.deleted is None)
        every = self.call("ListSecrets", IncludePlannedDeletion=True)["SecretList"]
        assert sorted(entry["Name"] for entry in every) == sorted(self.ref.secrets)

    def check(self, name: str, service=None) -> None:
        """The API's and the layout's view of one secret is the reference's."""
        service = service or self.service

        def call(action, **params):
            try:
                return service.call(action, params, SYSTEM)
            except model.SecretsManagerError as error:
                return {"__error": error.code}

        secret = self.ref.secrets.get(name)
        described = call("DescribeSecret", SecretId=name)
        if secret is None:
            assert described == {"__error": "ResourceNotFoundException"}
            self.check_tree(name, None, service)
            return
        assert described["VersionIdsToStages"] == secret.stages(), name
        assert described.get("DeletedDate") == secret.deleted
        rotation = secret.rotation
        assert described.get("RotationEnabled") == (rotation and rotation.enabled)
        assert described.get("RotationLambdaARN") == (rotation and rotation.arn)
        assert ("LastRotatedDate" in described) == bool(rotation and rotation.rotated)
        progress = described.get("RotationInProgress")
        if rotation is None or rotation.pending is None:
            assert progress is None, progress
        else:
            assert progress["VersionId"] == rotation.pending
            assert progress.get("LastCompletedStep") == rotation.step
            assert ("LastError" in progress) == rotation.failed
        versions = call("ListSecretVersionIds", SecretId=name, IncludeDeprecated=True)
        assert {version["VersionId"] for version in versions["Versions"]} == set(
            secret.versions)
        labelled = call("ListSecretVersionIds", SecretId=name)
        assert {version["VersionId"] for version in labelled["Versions"]} == set(
            secret.labels.values())
        if secret.deleted is not None:
            assert call("GetSecretValue", SecretId=name) == {
                "__error": "InvalidRequestException"}
        else:
            for version_id, value in secret.versions.items():
                got = call("GetSecretValue", SecretId=name, VersionId=version_id)
                if value is None:
                    assert got == {"__error": "ResourceNotFoundException"}
                else:
                    assert _value_of(got) == value, (name, version_id)
                    assert got["VersionStages"] == secret.stages().get(version_id, [])
            current = call("GetSecretValue", SecretId=name)
            if AWSCURRENT in secret.labels:
                assert current["VersionId"] == secret.labels[AWSCURRENT]
            else:
                assert current == {"__error": "ResourceNotFoundException"}
        self.check_tree(name, secret, service)

    def check_tree(self, name: str, secret: Secret | None, service) -> None:
        """The secret's directory in the filesystem's layout."""
        layout = L.Layout(service)
        path = path_of(name)
        try:
            node = L.ROOT
            for segment in path.split("/"):
                node = layout.lookup(node, segment)
        except L.NotFound:
            node = None
        if node is not None and node != (L.DIR, path):
            node = None  # the path names something else: `gamma/delta` may be a label link
        live = secret is not None and secret.deleted is None
        children = sorted(self.ref.child_dirs(name) & {
            path_of(other)[len(path) + 1:].split("/")[0] for other, below in
            self.ref.secrets.items() if below.deleted is None})
        if not live:
            if children:  # still a directory: of the secrets below it, and nothing else
                assert sorted(entry for entry, _ in layout.children(node)) == children
            else:
                assert node is None, f"{name} is still in the tree"
            return
        filled = {vid: value for vid, value in secret.versions.items() if value is not None}
        entries = {entry for entry, _ in layout.children(node)}
        assert entries == {entry_name(label) for label in secret.labels} | {
            "keys", "versions"} | set(children), name
        versions = layout.lookup(node, "versions")
        assert {entry for entry, _ in layout.children(versions)} == set(filled)
        for label, version_id in secret.labels.items():
            link = layout.lookup(node, entry_name(label))
            assert layout.readlink(link) == f"versions/{version_id}"
            key_link = layout.lookup(layout.lookup(node, "keys"), entry_name(label))
            assert layout.readlink(key_link) == f".by-version/{version_id}"
        for version_id, value in filled.items():
            content = layout.content(layout.lookup(versions, version_id))
            assert content == (value if isinstance(value, bytes) else value.encode())
            by_version = layout.lookup(layout.lookup(layout.lookup(node, "keys"), ".by-version"),
                                       version_id)
            keys = {entry for entry, _ in layout.children(by_version)}
            document = _document(value)
            assert keys == set(document or ())
            if document:
                password = layout.lookup(by_version, "password")
                assert layout.content(password) == document["password"].encode()

    def teardown(self):
        try:
            # Everything again, also through a second service over the same files, as a
            # restarted daemon would see it.
            from secretfs.crypto import LocalKeyProvider
            from secretfs.service import SecretsManagerService
            from secretfs.store.sqlite import SqliteStore

            for name in NAMES:
                self.check(name)
            store = SqliteStore(self.directory / "secrets.db")
            try:
                keys = LocalKeyProvider.load(self.directory / "keys.json",
                                             region=self.service.region,
                                             account_id=self.service.account_id)
                reopened = SecretsManagerService(store, keys, region=self.service.region,
                                                 account_id=self.service.account_id,
                                                 clock=self.clock)
                for name in NAMES:
                    self.check(name, reopened)
            finally:
                store.close()
            assert plaintext_in(files_below(self.directory), self.values) == []
        finally:
            self.store.close()
            shutil.rmtree(self.directory, ignore_errors=True)


ServiceMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_service_follows_the_reference = ServiceMachine.TestCase
