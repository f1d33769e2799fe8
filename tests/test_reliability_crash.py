"""SIGKILL at random points under read and write load, 50 times over.

Writer threads change secrets through the control socket (new versions, label moves,
rollbacks, new secrets), each one call at a time, and remember what was acknowledged.
Reader processes re-read label and JSON-key files through the mount throughout the
load, the kill and the restart (they rest only while the store is being checked).
The daemon is killed at a random moment of each round (every fourth round after the
audit log's one-second flush) and restarted; then the store must open and pass
SQLite's checks, the audit log must verify (before the restart and after), every
acknowledged write must be there with its value and labels, and the call in flight
when the daemon died must be wholly there or wholly absent. Every read, at any moment,
is a complete version; reads fail only while the daemon is down.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from _reliability import (
    AWSCURRENT,
    PlaintextWatch,
    all_version_ids,
    api_client,
    api_value,
    assert_intact,
    assert_stale,
    kill_daemon,
    read_file,
    stages_of,
    start_readers,
    stop_readers,
    wait_ready,
)
from conftest import Daemon

from secretfs import audit, model
from secretfs.api.client import Client, ClientConnectionError
from secretfs.daemon import mount as start_daemon
from secretfs.state import StateDir

pytestmark = [pytest.mark.mount, pytest.mark.reliability, pytest.mark.slow]

KILLS = 50
WRITERS = 3
READERS = 3
CUSTOM_LABELS = ("BLUE", "GREEN")
# Only these fail reads, and only while the daemon is down: a connection aborted by
# the kill, the stale mount, and the empty mountpoint between unmount and mount.
DOWN_ERRNOS = {"ENOTCONN", "ECONNABORTED", "ENOENT"}


# --- values that prove themselves whole -------------------------------------------------

def _seal(token: str) -> str:
    """A value a reader can check without knowing it: a torn or mixed read fails."""
    return f"{token}.{hashlib.sha256(token.encode()).hexdigest()[:12]}"


def _document(password: str, rng: random.Random) -> str:
    # A size that differs from version to version, so a read of the wrong length shows.
    return json.dumps({"user": "app", "password": password, "pad": "p" * rng.randrange(3000)})


_READER = r"""
import errno, hashlib, json, os, re, sys, time
os.nice(5)  # readers yield the CPU to the daemon and the writers
paths, stop, pause = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
SEALED = re.compile(rb"(sfs-crash-[0-9a-f]{32})\.([0-9a-f]{12})")

def sealed(data):
    match = SEALED.fullmatch(data)
    return match is not None and hashlib.sha256(match[1]).hexdigest()[:12].encode() == match[2]

def whole(path, data):
    if path.endswith("/password"):
        return sealed(data)
    try:
        document = json.loads(data)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("password"), str) \
        and sealed(document["password"].encode())

reads, errors, bad = 0, [], []
print("ready", flush=True)
while not os.path.exists(stop):
    if os.path.exists(pause):
        time.sleep(0.005)
        continue
    for path in paths:
        started = time.monotonic()
        try:
            with open(path, "rb", buffering=0) as file:
                data = file.read()
        except OSError as error:
            if len(errors) < 50000:
                errors.append([path, errno.errorcode.get(error.errno, str(error.errno)),
                               started, time.monotonic()])
            time.sleep(0.005)
            continue
        reads += 1
        if not whole(path, data) and len(bad) < 20:
            bad.append({"path": path, "length": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()[:16]})
    time.sleep(0.002)  # steady load, not saturation: the daemon has writers to answer
print(json.dumps({"reads": reads, "errors": errors, "bad": bad}))
"""


# --- what a writer was told -------------------------------------------------------------

@dataclass
class Family:
    """One writer's secret as acknowledged so far, and the secrets it created."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)  # label -> version id
    values: dict[str, str] = field(default_factory=dict)  # version id -> value
    created: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (id, value)


def _applied(family: Family, op: tuple) -> Family:
    """The family after one more operation, by AWS's rules for labels."""
    after = copy.deepcopy(family)
    kind = op[0]
    if kind == "put":
        _, token, value, stages = op
        after.values[token] = value
        for label in stages:
            previous = after.labels.get(label)
            after.labels[label] = token
            if label == AWSCURRENT and previous not in (None, token):
                after.labels["AWSPREVIOUS"] = previous
    elif kind == "move":
        _, label, target, _ = op
        previous = after.labels.get(label)
        after.labels[label] = target
        if label == AWSCURRENT and previous not in (None, target):
            after.labels["AWSPREVIOUS"] = previous
    else:  # create
        _, name, token, value = op
        after.created[name] = (token, value)
    return after


def _perform(client: Client, family: Family, op: tuple) -> None:
    kind = op[0]
    if kind == "put":
        _, token, value, stages = op
        answer = client.call("PutSecretValue", {
            "SecretId": family.name, "SecretString": value, "ClientRequestToken": token,
            "VersionStages": list(stages)})
        assert answer["VersionId"] == token
    elif kind == "move":
        _, label, target, holder = op
        params = {"SecretId": family.name, "VersionStage": label, "MoveToVersionId": target}
        if holder is not None:
            params["RemoveFromVersionId"] = holder
        client.call("UpdateSecretVersionStage", params)
    else:
        _, name, token, value = op
        client.call("CreateSecret", {"Name": name, "SecretString": value,
                                     "ClientRequestToken": token})


class Writer(threading.Thread):
    """Changes its family's secrets one call at a time until a call fails."""

    def __init__(self, client: Client, family: Family, rng: random.Random,
                 watch: PlaintextWatch):
        super().__init__(daemon=True)
        self.client, self.family, self.rng, self.watch = client, family, rng, watch
        self.in_flight: tuple | None = None  # the call made and not yet answered
        self.acknowledged = 0
        self.ended_by: Exception | None = None

    def _value(self) -> str:
        return _document(_seal(self.watch.token("crash")), self.rng)

    def _next(self) -> tuple:
        family, rng = self.family, self.rng
        current = family.labels[AWSCURRENT]
        roll = rng.random()
        if roll < 0.5:
            return ("put", str(uuid.uuid4()), self._value(), (AWSCURRENT,))
        if roll < 0.65:
            return ("put", str(uuid.uuid4()), self._value(), (rng.choice(CUSTOM_LABELS),))
        if roll < 0.8 and len(family.values) > 1:
            target = rng.choice(sorted(set(family.values) - {current}))
            return ("move", AWSCURRENT, target, current)
        if roll < 0.92:
            label = rng.choice(CUSTOM_LABELS)
            return ("move", label, rng.choice(sorted(family.values)), family.labels.get(label))
        name = f"crash/new/{family.name.rpartition('/')[2]}-{len(family.created)}"
        return ("create", name, str(uuid.uuid4()), self._value())

    def run(self) -> None:
        while True:
            op = self._next()
            self.in_flight = op
            try:
                _perform(self.client, self.family, op)
            except Exception as error:  # reported by the test
                self.ended_by = error
                return
            self.family = _applied(self.family, op)
            self.in_flight = None
            self.acknowledged += 1


def _observed(client: Client, family: Family) -> tuple[dict[str, str], set[str]]:
    labels = {label: version_id for version_id, stages in stages_of(client, family.name).items()
              for label in stages}
    return labels, all_version_ids(client, family.name)


def _exists(client: Client, name: str) -> bool:
    try:
        client.call("DescribeSecret", {"SecretId": name})
    except model.ResourceNotFoundException:
        return False
    return True


def _settle(client: Client, writer: Writer, where: str) -> Family:
    """What the store holds for a writer after a restart: everything acknowledged, and
    the call in flight either wholly or not at all. Returns it as acknowledged now."""
    family, op = writer.family, writer.in_flight
    labels, versions = _observed(client, family)
    created = op[1] if op is not None and op[0] == "create" else None
    options = [(family, False)] + ([(_applied(family, op), True)] if op is not None else [])
    for candidate, with_flight in options:
        if (candidate.labels == labels and set(candidate.values) == versions
                and (created is None or _exists(client, created) == with_flight)):
            return candidate
    lost = sorted(set(family.values) - versions)
    raise AssertionError(
        f"{where}: {family.name} is neither the acknowledged state nor that plus the call in "
        f"flight ({op[0] if op else 'none'}): labels {labels} (acknowledged "
        f"{family.labels}), {len(lost)} acknowledged versions missing {lost}, "
        f"{len(versions - set(family.values))} unknown versions")


def _check_values(client: Client, daemon: Daemon, family: Family, version_ids,
                  created, where: str) -> None:
    for version_id in version_ids:
        value = family.values[version_id].encode()
        assert api_value(client, family.name, VersionId=version_id) == value, where
    for name in created:
        version_id, value = family.created[name]
        assert api_value(client, name) == value.encode(), where
        assert read_file(daemon.path(*name.split("/"), AWSCURRENT)) == value.encode(), where
    current = family.labels[AWSCURRENT]
    segments = family.name.split("/")
    assert os.readlink(daemon.path(*segments, AWSCURRENT)) == f"versions/{current}", where
    document = family.values[current]
    assert read_file(daemon.path(*segments, AWSCURRENT)) == document.encode(), where
    assert read_file(daemon.path(*segments, "keys", AWSCURRENT, "password")) == json.loads(
        document)["password"].encode(), where


def _unexcused(errors: list, windows: list[tuple[float, float]]) -> list:
    """Read errors outside the moments the daemon was down, or of an unexpected kind."""
    return [[path, code] for path, code, started, ended in errors
            if code not in DOWN_ERRNOS
            or not any(started <= up and ended >= down for down, up in windows)]


def test_acknowledged_writes_survive_50_sigkills_under_load(daemon, tmp_path, plaintext_watch):
    watch = plaintext_watch
    watch.watch(daemon.state_dir)
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    client = api_client(daemon)
    state = StateDir(daemon.state_dir)
    families = []
    for number in range(WRITERS):
        family = Family(f"crash/w{number}")
        value = _document(_seal(watch.token("crash")), rng)
        token = str(uuid.uuid4())
        client.call("CreateSecret", {"Name": family.name, "SecretString": value,
                                     "ClientRequestToken": token})
        families.append(_applied(family, ("put", token, value, (AWSCURRENT,))))

    paths = [str(daemon.path(*family.name.split("/"), *tail)) for family in families
             for tail in ((AWSCURRENT,), ("keys", AWSCURRENT, "password"))]
    stop, pause = tmp_path / "stop", tmp_path / "pause"
    readers = start_readers(_READER, READERS, json.dumps(paths), str(stop), str(pause))
    windows: list[tuple[float, float]] = []  # (killed, serving again), monotonic
    totals = {"acknowledged": 0, "in flight and kept": 0, "in flight and gone": 0}
    chain: list[int] = []  # records in the audit log after each kill
    try:
        wait_ready(readers)
        for round_ in range(KILLS):
            where = f"seed {seed}, round {round_}"
            writers = [Writer(client, family, random.Random(rng.random()), watch)
                       for family in families]
            for writer in writers:
                writer.start()
            deadline = time.monotonic() + 20
            while (any(writer.acknowledged == 0 and writer.is_alive() for writer in writers)
                   and time.monotonic() < deadline):
                time.sleep(0.002)
            assert all(writer.acknowledged for writer in writers), (
                f"{where}: writers stalled: {[repr(writer.ended_by) for writer in writers]}")
            # Mostly soon; every fourth round past the audit log's flush (each second),
            # so kills also land in and after flushes and there is a chain to verify.
            time.sleep(rng.uniform(0.0, 0.3) if round_ % 4 else rng.uniform(0.9, 1.5))

            down = time.monotonic()
            pid = kill_daemon(daemon)
            for writer in writers:
                writer.join(timeout=30)
                assert not writer.is_alive(), f"{where}: a writer hangs on a dead daemon"
                assert isinstance(writer.ended_by, ClientConnectionError), (
                    f"{where}: writer ended by {writer.ended_by!r}")
            assert_stale(daemon.mountpoint)
            # What a crash leaves verifies as it is: a torn last record is never one
            # that was acknowledged.
            crashed = audit.verify(state.audit_dir)
            assert crashed.ok, f"{where}: audit log after SIGKILL: {crashed.problem}"
            chain.append(crashed.records)

            # The restart clears the stale mount itself. Through the CLI now and then;
            # otherwise as the CLI does it, without its start-up.
            if round_ % 10 == 0:
                daemon.start()
            else:
                start_daemon(daemon.mountpoint, daemon.state_dir, foreground=False)
                assert os.path.ismount(daemon.mountpoint)
            windows.append((down, time.monotonic()))
            # The readers read through the kill and the restart, and rest while the
            # store is checked (the daemon then answers the checks at once).
            pause.touch()
            assert daemon.pid() != pid
            assert_intact(daemon.state_dir)
            if round_ % 10 == 9:
                assert b"audit log OK" in daemon.cli("audit", "verify").stdout

            for index, writer in enumerate(writers):
                before = families[index]
                after = _settle(client, writer, where)
                kept = after is not writer.family
                if writer.in_flight is not None:
                    totals["in flight and kept" if kept else "in flight and gone"] += 1
                totals["acknowledged"] += writer.acknowledged
                _check_values(client, daemon, after, set(after.values) - set(before.values),
                              set(after.created) - set(before.created), where)
                families[index] = after
            pause.unlink()
        time.sleep(0.3)  # the readers read the final state too
    finally:
        results = stop_readers(readers, stop)

    for family in families:  # everything, once more, through the mount and the API
        _check_values(client, daemon, family, family.values, family.created, "at the end")
        for version_id, value in family.values.items():
            assert read_file(daemon.path(*family.name.split("/"), "versions", version_id)) == (
                value.encode())
    reads = sum(result["reads"] for result in results)
    summary = (f"seed {seed}: {KILLS} kills, {reads} reads, {chain[-1]} audit records, "
               + ", ".join(f"{count} {what}" for what, count in totals.items()))
    bad = [item for result in results for item in result["bad"]]
    assert not bad, f"{summary}: reads that are no complete version: {bad}"
    unexcused = [error for result in results for error in _unexcused(result["errors"], windows)]
    assert not unexcused, f"{summary}: reads failed while the daemon served: {unexcused[:20]}"
    assert all(result["reads"] > KILLS for result in results), summary
    assert len(set(chain)) > KILLS // 8, f"{summary}: the audit log hardly grew: {chain}"
    print(summary)
