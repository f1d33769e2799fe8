"""The rotation runner: the four steps in order, persisted, resumed, retried, scheduled.

The service runs on a clock that follows trio's: under the autojump clock a
simulated year of schedules passes in well under a second.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import wait_for

from secretfs.model import AccessDeniedException
from secretfs.rotation import rotators
from secretfs.rotation.runner import STEPS, RotationRunner

pytest_plugins = ["_service_fixtures"]

TOKEN = "11111111-2222-3333-4444-555555555555"


def stages(call, name: str) -> dict:
    return call("DescribeSecret", SecretId=name)["VersionIdsToStages"]


class Recording:
    """A rotator that does what random-password does, records each step it runs, and
    fails at one step while `fail_at` says so."""

    def __init__(self, fail_at: str | None = None):
        self.fail_at = fail_at
        self.steps: list[str] = []

    def run(self, event, client):
        self.steps.append(event["Step"])
        if event["Step"] == self.fail_at:
            raise RuntimeError(f"{self.fail_at} refused")
        rotators.RandomPassword().run(event, client)


def test_a_rotation_runs_the_four_steps_and_promotes(env, call):
    old = call("CreateSecret", Name="app", SecretString='{"user": "app", "password": "p0"}')
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    recording = Recording()
    runner = RotationRunner(env.service, rotators=lambda name: recording)
    assert trio.run(runner.rotate, env.service.catalog.id_by_name("app"))
    assert recording.steps == list(STEPS)
    assert stages(call, "app") == {TOKEN: ["AWSCURRENT"], old["VersionId"]: ["AWSPREVIOUS"]}
    value = json.loads(call("GetSecretValue", SecretId="app")["SecretString"])
    assert value["user"] == "app" and value["password"] != "p0" and len(value["password"]) == 32


def test_random_password_follows_the_secrets_settings(env, call):
    """GetRandomPassword's rules per secret, from its secretfs:rotation:* tags; a bad
    setting fails the step with the reason and changes nothing."""
    tags = [{"Key": "secretfs:rotation:PASSWORD_LENGTH", "Value": "12"},
            {"Key": "secretfs:rotation:EXCLUDE_PUNCTUATION", "Value": "true"},
            {"Key": "secretfs:rotation:EXCLUDE_CHARACTERS", "Value": "0123456789"}]
    call("CreateSecret", Name="app", SecretString="p0", Tags=tags)
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    secret_id = env.service.catalog.id_by_name("app")
    assert trio.run(RotationRunner(env.service).rotate, secret_id)
    password = call("GetSecretValue", SecretId="app")["SecretString"]
    assert len(password) == 12 and password.isalpha()
    call("TagResource", SecretId="app", Tags=[
        {"Key": "secretfs:rotation:PASSWORD_LENGTH", "Value": "twelve"}])
    call("RotateSecret", SecretId="app", ClientRequestToken=TOKEN.replace("1", "2"))
    assert not trio.run(RotationRunner(env.service).rotate, secret_id)
    assert env.service.catalog.get(secret_id).rotation["Pending"]["Error"] == (
        "createSecret: InvalidParameterException: Rotation setting PASSWORD_LENGTH must be "
        "a whole number, not 'twelve'.")
    assert call("GetSecretValue", SecretId="app")["SecretString"] == password


def test_a_failing_step_keeps_awscurrent_records_the_error_and_retries(env, call):
    old = call("CreateSecret", Name="app", SecretString="p0")["VersionId"]
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    service = env.service
    secret_id = service.catalog.id_by_name("app")
    failing = Recording(fail_at="testSecret")
    assert not trio.run(RotationRunner(service, rotators=lambda name: failing).rotate, secret_id)
    assert failing.steps == ["createSecret", "setSecret", "testSecret"]
    assert call("GetSecretValue", SecretId="app")["SecretString"] == "p0"
    assert stages(call, "app") == {old: ["AWSCURRENT"], TOKEN: ["AWSPENDING"]}
    pending = service.catalog.get(secret_id).rotation["Pending"]
    assert pending["Error"] == "testSecret: RuntimeError: testSecret refused"
    assert pending["Step"] == "setSecret" and pending["Attempts"] == 1
    shown = call("DescribeSecret", SecretId="app")["RotationInProgress"]
    assert shown == {"VersionId": TOKEN, "LastCompletedStep": "setSecret",
                     "LastError": "testSecret: RuntimeError: testSecret refused",
                     "Attempts": 1, "NextAttemptDate": env.clock.now + timedelta(
                         seconds=service.ROTATION_RETRY_MIN)}
    # The retry waits its backoff, then resumes at the failed step with the same token.
    assert service.rotations_due() == []
    env.clock.advance(seconds=service.ROTATION_RETRY_MIN)
    assert service.rotations_due() == [secret_id]
    working = Recording()
    assert trio.run(RotationRunner(service, rotators=lambda name: working).rotate, secret_id)
    assert working.steps == ["testSecret", "finishSecret"]
    assert stages(call, "app") == {TOKEN: ["AWSCURRENT"], old: ["AWSPREVIOUS"]}


def test_a_restart_resumes_the_rotation_where_it_stood(env, call):
    """The steps done are in the store: a new service over the same files (a restarted
    daemon) goes on from there, with the token the rotation began with."""
    old = call("CreateSecret", Name="app", SecretString="p0")["VersionId"]
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    secret_id = env.service.catalog.id_by_name("app")
    # "Killed" during setSecret: createSecret's outcome was persisted, nothing after.
    crashed = Recording(fail_at="setSecret")
    trio.run(RotationRunner(env.service, rotators=lambda name: crashed).rotate, secret_id)
    env.clock.advance(hours=2)
    restarted = env.reopen()
    resumed = Recording()
    assert trio.run(RotationRunner(restarted, rotators=lambda name: resumed).rotate, secret_id)
    assert resumed.steps == ["setSecret", "testSecret", "finishSecret"]
    described = restarted.call("DescribeSecret", {"SecretId": "app"},
                               caller=_root())["VersionIdsToStages"]
    assert described == {TOKEN: ["AWSCURRENT"], old: ["AWSPREVIOUS"]}
    assert len(restarted.call("ListSecretVersionIds", {"SecretId": "app",
                                                       "IncludeDeprecated": True},
                              _root())["Versions"]) == 2  # exactly one new version


class ReadsAnother(Recording):
    """A rotator that, at createSecret, also reads another secret (as alternating-users
    rotators read the master secret)."""

    def __init__(self, other: str):
        super().__init__()
        self.other = other

    def run(self, event, client):
        if event["Step"] == "createSecret":
            client("GetSecretValue", {"SecretId": self.other})
        super().run(event, client)


def _policy(effect: str, action: str, resource: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": effect, "Action": f"secretsmanager:{action}", "Resource": resource}]})


def test_a_rotator_acts_as_its_own_principal_and_policies_govern_it(env, call):
    """Not as root: its own secret's rotation needs no policy, anything else does, and
    an explicit Deny stops even what rotation needs."""
    master = call("CreateSecret", Name="master", SecretString="m")["ARN"]
    call("CreateSecret", Name="app", SecretString="p0")
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    secret_id = env.service.catalog.id_by_name("app")
    reader = ReadsAnother("master")
    runner = RotationRunner(env.service, rotators=lambda name: reader)
    assert not trio.run(runner.rotate, secret_id)
    error = env.service.catalog.get(secret_id).rotation["Pending"]["Error"]
    assert error.startswith("createSecret: AccessDeniedException: rotator "
                            "secretfs:random-password is not authorized to perform: "
                            "secretsmanager:GetSecretValue on resource: " + master)
    # A policy for the rotator's principal grants what its own rotation does not.
    call("PutIdentityPolicy", Principal="rotator:secretfs:random-*", PolicyName="master",
         PolicyDocument=_policy("Allow", "GetSecretValue", master))
    env.clock.advance(hours=1)
    assert trio.run(runner.rotate, secret_id)
    assert stages(call, "app")[TOKEN] == ["AWSCURRENT"]
    # A Unix principal's grant is not the rotator's, and an explicit Deny wins over the
    # rotation's own grant: the next rotation can't write its pending value.
    call("PutIdentityPolicy", Principal="rotator:*", PolicyName="frozen",
         PolicyDocument=_policy("Deny", "PutSecretValue", "*"))
    call("RotateSecret", SecretId="app", ClientRequestToken=TOKEN.replace("1", "9"))
    assert not trio.run(runner.rotate, secret_id)
    error = env.service.catalog.get(secret_id).rotation["Pending"]["Error"]
    assert "secretsmanager:PutSecretValue" in error
    assert "identity-policy rotator:*/frozen" in error


def test_a_rotation_token_stands_for_the_rotator_only_while_its_step_runs(env, call):
    """PutSecretValue's RotationToken: the call is made as the rotation's principal
    (AWS validates the identity with it), so even root is held to that secret."""
    call("CreateSecret", Name="app", SecretString="p0")
    call("CreateSecret", Name="other", SecretString="o0")
    call("RotateSecret", SecretId="app", RotationLambdaARN="secretfs:random-password",
         ClientRequestToken=TOKEN)
    seen = {}

    class UsesToken(Recording):
        def run(self, event, client):
            token = event["RotationToken"]
            seen["token"] = token
            if event["Step"] == "createSecret":
                with pytest.raises(AccessDeniedException, match="rotator secretfs:random"):
                    call("PutSecretValue", SecretId="other", SecretString="x",
                         RotationToken=token)
                call("PutSecretValue", SecretId="app", ClientRequestToken=TOKEN,
                     SecretString="via-token", VersionStages=["AWSPENDING"],
                     RotationToken=token)
            super().run(event, client)

    runner = RotationRunner(env.service, rotators=lambda name: UsesToken())
    assert trio.run(runner.rotate, env.service.catalog.id_by_name("app"))
    assert call("GetSecretValue", SecretId="app")["SecretString"] == "via-token"
    assert call("GetSecretValue", SecretId="other")["SecretString"] == "o0"
    with pytest.raises(AccessDeniedException, match="RotationToken"):
        call("PutSecretValue", SecretId="app", SecretString="late",
             RotationToken=seen["token"])


def _root():
    from secretfs.identity import SYSTEM
    return SYSTEM


@pytest.mark.parametrize(("rules", "expected"), [
    ({"ScheduleExpression": "rate(10 days)"}, (36, 37)),
    ({"ScheduleExpression": "cron(0 16 1,15 * ? *)"}, (24, 24)),
])
async def test_the_scheduler_rotates_on_time_over_a_simulated_year(env, rules, expected,
                                                                   autojump_clock):
    base = env.clock.now
    service = env.service
    # The service's clock follows trio's from here on.
    service.now = lambda: base + timedelta(seconds=autojump_clock.current_time())
    service.call("CreateSecret", {"Name": "app", "SecretString": "p0"}, _root())
    service.call("RotateSecret", {"SecretId": "app", "RotationLambdaARN":
                                  "secretfs:random-password", "RotationRules": rules,
                                  "RotateImmediately": False}, _root())
    async def inline(function, *args, limiter=None):
        return function(*args)

    runner = RotationRunner(service, in_thread=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await trio.sleep(365 * 86400)
        nursery.cancel_scope.cancel()
    versions = service.call("ListSecretVersionIds", {"SecretId": "app",
                                                     "IncludeDeprecated": True},
                            _root())["Versions"]
    rotations = len(versions) - 1
    assert expected[0] <= rotations <= expected[1]
    described = service.call("DescribeSecret", {"SecretId": "app"}, _root())
    assert described["NextRotationDate"] > service.now()


@pytest.mark.mount
def test_the_daemon_rotates_and_the_mount_shows_the_new_value(daemon):
    """RotateSecret through the CLI: the daemon's runner carries the rotation out, and
    AWSCURRENT on the mount flips to the new password in one step."""

    created = daemon.call("create-secret", "--name", "app/db",
                          "--secret-string", '{"username": "app", "password": "p0"}')
    before = daemon.path("app/db/AWSCURRENT").read_bytes()
    started = daemon.call("rotate-secret", "--secret-id", "app/db",
                          "--rotation-lambda-arn", "secretfs:random-password",
                          "--rotation-rules", "AutomaticallyAfterDays=30")
    wait_for(lambda: os.readlink(daemon.path("app/db/AWSCURRENT"))
             == "versions/" + started["VersionId"], 10)
    after = json.loads(daemon.path("app/db/AWSCURRENT").read_bytes())
    assert after["username"] == "app" and after["password"] != "p0"
    assert daemon.path("app/db/AWSPREVIOUS").read_bytes() == before
    assert not daemon.path("app/db/AWSPENDING").exists()
    assert daemon.path("app/db/keys/AWSCURRENT/password").read_text() == after["password"]
    described = daemon.call("describe-secret", "--secret-id", "app/db")
    assert described["VersionIdsToStages"] == {started["VersionId"]: ["AWSCURRENT"],
                                               created["VersionId"]: ["AWSPREVIOUS"]}
    assert "LastRotatedDate" in described and "NextRotationDate" in described




ROTATOR_SCRIPT = '''#!{python}
"""A rotator in the exec protocol: the event on stdin, the secretfs command for I/O.
It logs each step, may fail at one step, and may (once) wait at one to be killed."""
import json, os, subprocess, sys, time

event = json.load(sys.stdin)
step, secret, token = event["Step"], event["SecretId"], event["ClientRequestToken"]
with open({log!r}, "a") as log:
    log.write(step + "\\n")
if step == {fail!r}:
    sys.exit(3)
if step == {pause!r} and not os.path.exists({paused!r}):
    open({paused!r}, "w").close()
    time.sleep(60)

def cli(*args):
    out = subprocess.run([{python!r}, "-m", "secretfs.cli", *args], check=True,
                         capture_output=True).stdout
    return json.loads(out or b"{{}}")

if step == "createSecret":
    try:
        cli("get-secret-value", "--secret-id", secret, "--version-id", token,
            "--version-stage", "AWSPENDING")
    except subprocess.CalledProcessError:
        cli("put-secret-value", "--secret-id", secret, "--client-request-token", token,
            "--secret-string", {value!r}.format(token=token), "--version-stages", "AWSPENDING")
elif step == "finishSecret":
    stages = cli("describe-secret", "--secret-id", secret)["VersionIdsToStages"]
    current = next(v for v, s in stages.items() if "AWSCURRENT" in s)
    if current != token:
        cli("update-secret-version-stage", "--secret-id", secret, "--version-stage",
            "AWSCURRENT", "--move-to-version-id", token, "--remove-from-version-id", current)
'''


def _exec_rotator(tmp_path, *, fail: str | None = None, pause: str | None = None,
                  value: str = "rotated-by-exec"):
    """The rotator program, its step log, and the file it touches when it pauses."""
    import sys

    program, log, paused = tmp_path / "rotate.py", tmp_path / "steps.log", tmp_path / "paused"
    program.write_text(ROTATOR_SCRIPT.format(python=sys.executable, log=str(log), fail=fail,
                                             pause=pause, paused=str(paused), value=value))
    program.chmod(0o755)
    return program, log, paused


@pytest.mark.mount
def test_an_exec_rotator_rotates_through_the_control_socket(daemon, tmp_path):
    program, log, _ = _exec_rotator(tmp_path)
    daemon.call("create-secret", "--name", "svc/token", "--secret-string", "before")
    started = daemon.call("rotate-secret", "--secret-id", "svc/token",
                          "--rotation-lambda-arn", f"exec:{program}")
    assert wait_for(lambda: daemon.path("svc/token/AWSCURRENT").read_bytes()
                     == b"rotated-by-exec")
    assert os.readlink(daemon.path("svc/token/AWSCURRENT")) == (
        "versions/" + started["VersionId"])
    assert log.read_text().split() == list(STEPS)
    # Its calls through the socket were made as its principal, not as its Unix uid.
    records = daemon.audit_records()
    puts = [record for record in records if record["eventName"] == "PutSecretValue"
            and record["decision"] == "allow" and not record.get("mutation")]
    assert puts and all(record["userIdentity"] == {"rotator": f"exec:{program}"}
                        and record["decidedBy"] == "rotation-session" for record in puts)
    # A token that belongs to no step in progress is refused, not taken for the uid.
    refused = subprocess.run([sys.executable, "-m", "secretfs.cli", "list-secrets"],
                             capture_output=True, env=dict(
                                 os.environ, SECRETFS_STATE_DIR=str(daemon.state_dir),
                                 SECRETFS_ROTATION_TOKEN="not-a-token"))
    assert refused.returncode == 254
    assert b"UnrecognizedClientException" in refused.stderr


@pytest.mark.mount
def test_an_exec_rotator_failing_at_test_secret_leaves_awscurrent(daemon, tmp_path):
    program, log, _ = _exec_rotator(tmp_path, fail="testSecret")
    daemon.call("create-secret", "--name", "svc/token", "--secret-string", "before")
    started = daemon.call("rotate-secret", "--secret-id", "svc/token",
                          "--rotation-lambda-arn", f"exec:{program}")
    assert wait_for(lambda: log.exists() and "testSecret" in log.read_text().split())
    assert wait_for(lambda: any(
        record.get("eventName") == "RotationStepFailed" for record in
        daemon.audit_records()), 5)
    assert daemon.path("svc/token/AWSCURRENT").read_bytes() == b"before"
    assert os.readlink(daemon.path("svc/token/AWSPENDING")) == (
        "versions/" + started["VersionId"])
    assert daemon.path("svc/token/AWSPENDING").read_bytes() == b"rotated-by-exec"
    # A second RotateSecret while this one waits for its retry fails as in AWS.
    failed = daemon.cli("rotate-secret", "--secret-id", "svc/token", check=False)
    assert failed.returncode != 0 and b"InvalidRequestException" in failed.stderr




@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_a_daemon_killed_during_each_step_completes_the_rotation_after_restart(
        daemon, tmp_path, step):
    """SIGKILL while a step runs: after the restart the rotation resumes with the same
    token and ends with exactly one new version, labelled where AWS would put them."""
    import signal
    import subprocess

    program, log, paused = _exec_rotator(tmp_path, pause=step, value="after-{token}")
    first = daemon.call("create-secret", "--name", "crash/me", "--secret-string", "before")
    started = daemon.call("rotate-secret", "--secret-id", "crash/me",
                          "--rotation-lambda-arn", f"exec:{program}")
    token = started["VersionId"]
    assert wait_for(paused.exists)
    os.kill(daemon.pid(), signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", str(program)], check=False)
    daemon.start()  # clears the stale mount; the runner resumes at the step it reached
    assert wait_for(lambda: os.readlink(daemon.path("crash/me/AWSCURRENT"))
                     == f"versions/{token}")
    assert daemon.path("crash/me/AWSCURRENT").read_text() == f"after-{token}"
    assert daemon.path("crash/me/AWSPREVIOUS").read_text() == "before"
    assert not daemon.path("crash/me/AWSPENDING").exists()
    versions = daemon.call("list-secret-version-ids", "--secret-id", "crash/me",
                           "--include-deprecated")["Versions"]
    assert sorted(version["VersionId"] for version in versions) == sorted(
        [first["VersionId"], token])
    ran = log.read_text().split()
    # Steps before the killed one ran once; the killed one ran again after the restart.
    assert ran[:STEPS.index(step) + 1] == list(STEPS[:STEPS.index(step) + 1])
    assert ran[STEPS.index(step) + 1:] == list(STEPS[STEPS.index(step):])


_ROTATION_READER = r"""
import errno, json, os, sys
os.nice(5)
paths, stop = sys.argv[1:3], sys.argv[3]
seen = {path: set() for path in paths}
errors, reads, first = {}, 0, True
while first or not os.path.exists(stop):
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as file:
                seen[path].add(file.read().decode("latin-1"))
            reads += 1
        except OSError as error:
            key = errno.errorcode.get(error.errno, str(error))
            errors[key] = errors.get(key, 0) + 1
    if first:
        first = False
        print("ready", flush=True)
print(json.dumps({"reads": reads, "errors": errors,
                  "seen": {path: sorted(values) for path, values in seen.items()}}))
"""


@pytest.mark.mount
@pytest.mark.slow
def test_readers_never_see_a_partial_or_missing_value_during_rotations(daemon, tmp_path):
    import subprocess
    import sys

    from secretfs.api.client import Client
    from secretfs.state import StateDir

    client = Client(StateDir(daemon.state_dir).socket)
    client.call("CreateSecret", {"Name": "hot/db",
                                 "SecretString": json.dumps({"user": "app", "password": "p0"})})
    whole = str(daemon.path("hot/db/AWSCURRENT"))
    key = str(daemon.path("hot/db/keys/AWSCURRENT/password"))
    stop = tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", _ROTATION_READER, whole, key, str(stop)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    rotations = 20
    try:
        for reader in readers:
            assert reader.stdout.readline().strip() == b"ready"
        for _ in range(rotations):
            token = client.call("RotateSecret", {
                "SecretId": "hot/db", "RotationLambdaARN": "secretfs:random-password"})[
                "VersionId"]
            assert wait_for(lambda token=token: os.readlink(whole) == f"versions/{token}")
    finally:
        stop.touch()
        outputs = [reader.communicate(timeout=60) for reader in readers]
    versions = client.call("ListSecretVersionIds", {"SecretId": "hot/db",
                                                    "IncludeDeprecated": True})["Versions"]
    values = {client.call("GetSecretValue", {"SecretId": "hot/db",
                                             "VersionId": version["VersionId"]})["SecretString"]
              for version in versions}
    assert len(values) == rotations + 1
    passwords = {json.loads(value)["password"] for value in values}
    for reader, (out, err) in zip(readers, outputs, strict=True):
        assert reader.returncode == 0, err.decode(errors="replace")
        result = json.loads(out.decode().splitlines()[-1])
        assert result["errors"] == {}, result["errors"]
        assert set(result["seen"][whole]) <= values  # only whole, known versions
        assert set(result["seen"][key]) <= passwords
        assert len(result["seen"][whole]) > 1  # the rotations were visible


def test_a_rotator_that_cannot_start_fails_its_step_and_harms_nothing(env, call):
    """A python: rotator whose module isn't there fails at createSecret like any failing
    step, with the exception's class (never its message) as the error."""
    call("CreateSecret", Name="app", SecretString="p0")
    call("RotateSecret", SecretId="app", RotationLambdaARN="python:no_such.handler:main",
         ClientRequestToken=TOKEN)
    secret_id = env.service.catalog.id_by_name("app")
    assert not trio.run(RotationRunner(env.service).rotate, secret_id)
    pending = env.service.catalog.get(secret_id).rotation["Pending"]
    assert pending["Error"] == ("createSecret: RuntimeError: no_such.handler:main raised "
                                "ModuleNotFoundError at createSecret")
    assert pending["Attempts"] == 1
    assert call("GetSecretValue", SecretId="app")["SecretString"] == "p0"


FUNCTIONS = Path(__file__).parent / "rotation_functions"


def _settings(**settings: str) -> str:
    """A secret's rotation settings, as the tags that carry them."""
    return json.dumps([{"Key": f"secretfs:rotation:{name}", "Value": value}
                       for name, value in settings.items()])


@pytest.mark.mount
def test_a_rotation_function_written_for_aws_lambda_runs_unmodified(daemon):
    """boto3 inside the handler reaches the daemon as the rotator's principal, and the
    secret's settings are the handler's environment (EXCLUDE_CHARACTERS as AWS's
    templates read it)."""
    handler = "python:aws_style:lambda_handler"
    daemon.call("create-secret", "--name", "svc/api", "--secret-string",
                json.dumps({"username": "svc", "password": "old"}), "--tags", _settings(
                    PYTHONPATH=str(FUNCTIONS), EXCLUDE_CHARACTERS=string.ascii_letters,
                    PASSWORD_LENGTH="40"))
    token = daemon.call("rotate-secret", "--secret-id", "svc/api",
                        "--rotation-lambda-arn", handler)["VersionId"]
    assert wait_for(lambda: os.readlink(daemon.path("svc/api/AWSCURRENT"))
                     == f"versions/{token}")
    value = json.loads(daemon.path("svc/api/AWSCURRENT").read_bytes())
    assert value["username"] == "svc" and len(value["password"]) == 40
    assert not set(value["password"]) & set(string.ascii_letters)
    assert json.loads(daemon.path("svc/api/AWSPREVIOUS").read_bytes())["password"] == "old"
    described = daemon.call("describe-secret", "--secret-id", "svc/api")
    assert "RotationInProgress" not in described and described["RotationEnabled"]
    records = daemon.audit_records()
    assert {record["userIdentity"].get("rotator") for record in records
            if record["eventName"] == "PutSecretValue"} == {handler}


@pytest.mark.mount
def test_a_failing_rotation_function_records_only_its_exception_class(daemon):
    daemon.call("create-secret", "--name", "svc/api", "--secret-string",
                json.dumps({"username": "svc", "password": "old"}),
                "--tags", _settings(PYTHONPATH=str(FUNCTIONS), FAIL_AT="testSecret"))
    token = daemon.call("rotate-secret", "--secret-id", "svc/api", "--rotation-lambda-arn",
                        "python:aws_style:lambda_handler")["VersionId"]

    def failed():
        shown = daemon.call("describe-secret", "--secret-id", "svc/api")
        return shown.get("RotationInProgress", {}).get("LastError")

    assert wait_for(failed)
    assert failed() == ("testSecret: RuntimeError: aws_style:lambda_handler raised "
                        "ConnectionRefusedError at testSecret")
    assert json.loads(daemon.path("svc/api/AWSCURRENT").read_bytes())["password"] == "old"
    assert os.readlink(daemon.path("svc/api/AWSPENDING")) == f"versions/{token}"
    # What the handler said (it quotes a password) reached no file the daemon writes.
    leaked = subprocess.run(["grep", "-rl", "hunter2", str(daemon.state_dir)],
                            capture_output=True)
    assert leaked.returncode == 1, leaked.stdout
