"""Rotation in a fleet: of the hosts sharing one PostgreSQL store, the one holding a
secret's lease rotates it, each step once; a host killed mid-rotation is taken over
at the step the store records.

Tier 1 runs two services on one store in this process (each with its own connections,
catalog and runner, as two hosts have): exactly-once under a race for the leases, no
second rotation from a due list gone stale, and a runner that waits out a lease held
elsewhere without spinning. Tier 2 runs the real thing: two daemons with their own
mounts (tests/_fleet.py) and a rotation function that records which host ran each
step (tests/rotation_functions/fleet_recorder.py), one of them SIGKILLed mid-step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from conftest import wait_for

from secretfs.identity import SYSTEM
from secretfs.rotation import rotators
from secretfs.rotation.runner import FLEET_POLL, LEASE_POLL, STEPS, RotationRunner
from secretfs.service import SecretsManagerService
from secretfs.store.postgres import LEASE_CLASS, PostgresStore

pytest_plugins = ["_service_fixtures", "_fleet"]

FUNCTIONS = Path(__file__).parent / "rotation_functions"
HANDLER = "python:fleet_recorder:lambda_handler"
VALUE = json.dumps({"username": "app", "password": "p0"})


# --- tier 1: two services on one store ------------------------------------------------------


@pytest.fixture
def hosts(env, postgres_cluster) -> Iterator[list[SecretsManagerService]]:
    """Two services on one new PostgreSQL store, as hosts a and b run them: their own
    connections, catalogs and mutation locks; the same keys and clock."""
    url = postgres_cluster.url(postgres_cluster.create_database())
    PostgresStore.create(url).close()
    stores = [PostgresStore(url) for _ in range(2)]
    service = env.service
    yield [SecretsManagerService(store, service.keys, region=service.region,
                                 account_id=service.account_id, clock=env.clock)
           for store in stores]
    for store in stores:
        store.close()


class Recording:
    """random-password, recording (host, secret ARN, step) as each step starts; a step
    takes `seconds`, so runners on two hosts overlap."""

    def __init__(self, host: str, record: list, seconds: float = 0.0):
        self.host, self.record, self.seconds = host, record, seconds

    def run(self, event, client):
        self.record.append((self.host, event["SecretId"], event["Step"]))
        time.sleep(self.seconds)
        rotators.RandomPassword().run(event, client)


def runner_on(host: str, service: SecretsManagerService, record: list, *,
              seconds: float = 0.0, **options) -> RotationRunner:
    return RotationRunner(service, rotators=lambda name: Recording(host, record, seconds),
                          **options)


def rotating(service: SecretsManagerService, name: str, **rules) -> str:
    """A new secret with a rotation configured (and, by default, started): its ARN."""
    service.call("CreateSecret", {"Name": name, "SecretString": VALUE}, SYSTEM)
    return service.call("RotateSecret", {
        "SecretId": name, "RotationLambdaARN": "secretfs:random-password", **rules},
        SYSTEM)["ARN"]


def stages(service: SecretsManagerService, name: str) -> dict[str, list[str]]:
    return service.call("DescribeSecret", {"SecretId": name}, SYSTEM)["VersionIdsToStages"]


def test_two_hosts_rotate_each_due_secret_exactly_once(hosts):
    """Both runners start at once and find the same six rotations due: every step of
    every rotation runs once, all four on the host that won the secret's lease, and
    each secret gets exactly one new AWSCURRENT."""
    a, b = hosts
    names = [f"app/{n}" for n in range(6)]
    arns = {rotating(a, name): name for name in names}
    record: list[tuple[str, str, str]] = []
    runners = [runner_on(host, service, record, seconds=0.05)
               for host, service in zip("ab", hosts, strict=True)]

    async def rotate_all():
        async with trio.open_nursery() as nursery:
            for runner in runners:
                await nursery.start(runner.run)
            with trio.fail_after(60):
                while await trio.to_thread.run_sync(a.rotations_due):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(rotate_all)
    assert Counter((arn, step) for _, arn, step in record) == {
        (arn, step): 1 for arn in arns for step in STEPS}
    by_secret = {arn: {host for host, rotated, _ in record if rotated == arn} for arn in arns}
    assert all(len(ran_on) == 1 for ran_on in by_secret.values()), by_secret
    assert set().union(*by_secret.values()) == {"a", "b"}, "both hosts won leases"
    a.reload()  # a's catalog learns what b committed (no change feed runs here)
    for name in names:
        labels = stages(a, name)
        assert len(labels) == 2 and sorted(labels.values()) == [["AWSCURRENT"], ["AWSPREVIOUS"]]
        assert json.loads(a.call("GetSecretValue", {"SecretId": name}, SYSTEM)[
            "SecretString"])["password"] != "p0"


def test_a_rotation_another_host_just_finished_is_not_started_again(hosts, env):
    """Host b found the secret due (by its schedule), then host a rotated it: b acting
    on its list, with the lease now free, opens nothing, because open_rotation decides
    under the lease, from the store, that the rotation is no longer due."""
    a, b = hosts
    rotating(a, "app", RotationRules={"AutomaticallyAfterDays": 30}, RotateImmediately=False)
    env.clock.advance(days=31)
    secret_id = a.catalog.id_by_name("app")
    assert b.rotations_due() == [secret_id]
    record: list = []
    assert trio.run(runner_on("a", a, record).rotate, secret_id)
    assert not trio.run(runner_on("b", b, record).rotate, secret_id)
    assert b.open_rotation(secret_id) is None
    assert [(host, step) for host, _, step in record] == [("a", step) for step in STEPS]
    assert len(stages(b, "app")) == 2
    described = b.call("DescribeSecret", {"SecretId": "app"}, SYSTEM)
    assert "RotationInProgress" not in described
    assert described["NextRotationDate"] > env.clock.now


async def test_a_lease_held_elsewhere_is_asked_for_again_each_lease_poll(
        hosts, monkeypatch, autojump_clock):
    """While host a holds the lease, host b's runner asks again every LEASE_POLL
    seconds (never in a loop, though the secret stays due) and runs nothing; once a
    lets go, b rotates within one LEASE_POLL."""
    a, b = hosts
    arn = rotating(a, "app")
    secret_id = a.catalog.id_by_name("app")
    asked: list[float] = []
    lease = b.rotation_lease

    def counted(secret_id: int):
        asked.append(trio.current_time())
        if len(asked) > 100:  # a spinning runner: stop it, the assertions say why
            nursery.cancel_scope.cancel()
        return lease(secret_id)

    monkeypatch.setattr(b, "rotation_lease", counted)

    async def inline(function, *args, limiter=None):
        return function(*args)

    record: list = []
    runner = runner_on("b", b, record, in_thread=inline)
    async with trio.open_nursery() as nursery:
        with a.rotation_lease(secret_id) as held:
            assert held
            await nursery.start(runner.run)
            await trio.sleep(20 * LEASE_POLL - LEASE_POLL / 2)
            assert record == []
            assert len(asked) == 20, asked
            assert all(later - earlier == LEASE_POLL
                       for earlier, later in zip(asked, asked[1:], strict=False))
        released = trio.current_time()
        with trio.fail_after(LEASE_POLL + 1):
            while len(record) < len(STEPS):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert asked[-1] - released <= LEASE_POLL
    assert record == [("b", arn, step) for step in STEPS]


# --- tier 2: two daemons, one store --------------------------------------------------------


class StepLog:
    """The rotation function's files: the step log it appends to, and the hold it makes
    at HOLD_AT (HOLD_FILE says which host and process holds; RELEASE_FILE ends it)."""

    def __init__(self, directory: Path):
        self.log = directory / "steps.log"
        self.hold_file = directory / "held"
        self.release_file = directory / "release"

    def tags(self, **settings: str) -> str:
        settings = {"PYTHONPATH": str(FUNCTIONS), "STEP_LOG": str(self.log),
                    "HOLD_FILE": str(self.hold_file),
                    "RELEASE_FILE": str(self.release_file), **settings}
        return json.dumps([{"Key": f"secretfs:rotation:{name}", "Value": value}
                           for name, value in settings.items()])

    def ran(self) -> list[tuple[str, str, str]]:
        """(host, step, token) for each step started, in order."""
        if not self.log.exists():
            return []
        return [tuple(line.split()) for line in self.log.read_text().splitlines()]

    def held(self) -> tuple[str, int] | None:
        """The host and the process holding the step, once the hold has begun."""
        try:
            host, pid = self.hold_file.read_text().split()
        except (OSError, ValueError):
            return None
        return host, int(pid)


def create(host, name: str, steps: StepLog, **settings: str) -> dict:
    return host.call("create-secret", "--name", name, "--secret-string", VALUE,
                     "--tags", steps.tags(**settings))


def rotate(host, name: str) -> str:
    return host.call("rotate-secret", "--secret-id", name,
                     "--rotation-lambda-arn", HANDLER)["VersionId"]


def current_target(host, name: str) -> str | None:
    """Where AWSCURRENT points on the host's mount (None while the name isn't there)."""
    try:
        return os.readlink(host.path(name, "AWSCURRENT"))
    except OSError:
        return None


def store_labels(fleet, name: str) -> dict[str, str]:
    """The secret's labels as the store holds them, label -> version id."""
    with psycopg.connect(fleet.url) as connection:
        return dict(connection.execute(
            "SELECT l.label, l.version_id FROM labels l JOIN secrets s ON s.id = l.secret_id"
            " WHERE s.name = %s", (name,)).fetchall())


def leases_held(fleet) -> list[int]:
    """The secret ids whose lease some host holds, from the server's lock table."""
    with psycopg.connect(fleet.url) as connection:
        return [row[0] for row in connection.execute(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objsubid = 2 AND database = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())", (LEASE_CLASS,))]


def secret_id_of(fleet, name: str) -> int:
    with psycopg.connect(fleet.url) as connection:
        return connection.execute("SELECT id FROM secrets WHERE name = %s",
                                  (name,)).fetchone()[0]


def cpu_seconds(pid: int) -> float:
    """User and system time the process (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_rotated_once(host, name: str, first: str, token: str) -> None:
    """On this host's mount and API: one new version, current; the first, previous."""
    assert current_target(host, name) == f"versions/{token}"
    assert json.loads(host.path(name, "AWSCURRENT").read_bytes())["password"] != "p0"
    assert host.path(name, "AWSPREVIOUS").read_bytes() == VALUE.encode()
    assert not host.path(name, "AWSPENDING").exists()
    versions = host.call("list-secret-version-ids", "--secret-id", name,
                         "--include-deprecated")["Versions"]
    assert sorted(version["VersionId"] for version in versions) == sorted([first, token])


@pytest.mark.mount
@pytest.mark.slow
def test_with_both_hosts_running_each_rotation_runs_once(fleet, tmp_path):
    """Three rotations asked of either host, each step taking a second so that the
    other host's runner finds them due (and their leases held) while they run: each
    step of each runs once, on one host, and leaves one new AWSCURRENT. Nor does a host
    start them again once they are done."""
    fleet.start()
    steps = StepLog(tmp_path)
    names = ["fleet/one", "fleet/two", "fleet/three"]
    first = {name: create(fleet.a, name, steps, STEP_SECONDS="1")["VersionId"]
             for name in names}
    fleet.b.cli("refresh")  # b knows a's new secrets before it is asked to rotate one
    tokens = {name: rotate(host, name) for host, name in zip(
        (fleet.a, fleet.b, fleet.a), names, strict=True)}
    assert wait_for(lambda: all(store_labels(fleet, name).get("AWSCURRENT") == token
                                for name, token in tokens.items()), 90)
    # A host with a stale due list would start a second rotation after a FLEET_POLL.
    time.sleep(FLEET_POLL + LEASE_POLL)
    ran = steps.ran()
    assert Counter((token, step) for _, step, token in ran) == {
        (token, step): 1 for token in tokens.values() for step in STEPS}
    hosts_of = {token: {host for host, _, ran_token in ran if ran_token == token}
                for token in tokens.values()}
    assert all(len(ran_on) == 1 for ran_on in hosts_of.values()), hosts_of
    assert leases_held(fleet) == []
    for host in fleet.hosts:
        host.cli("refresh")
        for name in names:
            assert_rotated_once(host, name, first[name], tokens[name])


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("step", ["setSecret", "finishSecret"])
def test_a_host_killed_mid_rotation_is_taken_over_by_the_other(fleet, tmp_path, step):
    """The host running a rotation is SIGKILLed while a step runs. Its lease ends with
    its database connection, and the other host resumes the rotation with the same
    token at the step the store records: the steps done before are not run again, the
    killed one is, and the rotation ends once, with AWSCURRENT promoted on the
    survivor's mount. Until then the survivor waits for the lease without spinning."""
    fleet.start()
    steps = StepLog(tmp_path)
    try:
        first = create(fleet.a, "fleet/db", steps, HOLD_AT=step)["VersionId"]
        token = rotate(fleet.a, "fleet/db")
        assert wait_for(steps.held, 60)
        holder_name, rotator_pid = steps.held()
        holder, survivor = (fleet.a, fleet.b) if holder_name == "a" else (fleet.b, fleet.a)
        survivor_name = "b" if holder_name == "a" else "a"
        assert leases_held(fleet) == [secret_id_of(fleet, "fleet/db")]
        # The survivor finds the rotation due and its lease held, and waits its turn.
        survivor_pid = survivor.pid()
        before = cpu_seconds(survivor_pid)
        time.sleep(FLEET_POLL + LEASE_POLL)
        waiting = cpu_seconds(survivor_pid) - before
        print(f"the survivor used {waiting:.2f} s of CPU in {FLEET_POLL + LEASE_POLL:g} s")
        assert waiting < 0.5
        assert steps.ran()[-1] == (holder_name, step, token)

        os.kill(holder.pid(), signal.SIGKILL)
        os.kill(rotator_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: current_target(survivor, "fleet/db") == f"versions/{token}", 60)
        print(f"taken over and promoted {time.monotonic() - killed:.1f} s after the kill")
    finally:
        steps.release_file.touch()  # a hold the test didn't get to end ends now
    held_at = STEPS.index(step)
    assert steps.ran() == [(holder_name, done, token) for done in STEPS[:held_at + 1]] + [
        (survivor_name, left, token) for left in STEPS[held_at:]]
    assert_rotated_once(survivor, "fleet/db", first, token)
    assert leases_held(fleet) == []
    # The killed host comes back to the rotated secret, and rotates nothing again (its
    # runner looks for due rotations as it starts).
    holder.start()
    assert_rotated_once(holder, "fleet/db", first, token)
    time.sleep(LEASE_POLL)
    assert len(steps.ran()) == len(STEPS) + 1
    assert store_labels(fleet, "fleet/db") == {"AWSCURRENT": token, "AWSPREVIOUS": first}
