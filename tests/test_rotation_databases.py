"""The database rotators against real servers: a throw-away PostgreSQL and MariaDB
(tests/_databases.py), driven by the rotation runner in this process, and by the real
daemon on a real FUSE mount where the issue asks for the real thing.

No secret value is ever printed: credentials are `Login`s, whose repr hides the
password, checked by logging in or by methods that answer yes or no. The figures of
the daemon tests are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from conftest import wait_for

from secretfs.api.client import Client
from secretfs.rotation.databases import DatabaseError, regranted
from secretfs.rotation.runner import STEPS, RotationRunner
from secretfs.state import StateDir

pytest_plugins = ["_service_fixtures", "_databases"]

ENGINES = ("postgresql", "mariadb")
SINGLE, ALTERNATING = "single-user", "alternating-users"
QUOTES = "'\"\\"


@pytest.fixture(params=ENGINES)
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def _settled(predicate, seconds: float = 20.0, interval: float = 0.01) -> bool:
    """wait_for, asked every 10 ms unless told: these tests time windows of tens of
    milliseconds."""
    return wait_for(predicate, seconds, interval)


# --- secrets, for the service in this process and for the daemon alike ----------------
# `send(action, params)` calls the service: env.call's or the daemon's control socket.

def _service_sender(env):
    return lambda action, params: env.call(action, **params)


def _daemon_sender(daemon):
    client = Client(StateDir(daemon.state_dir).socket)
    return lambda action, params: client.call(action, params,
                                              extension=action == "PutIdentityPolicy")


def login_at(send, server, name: str, stage: str):
    return server.login(send("GetSecretValue", {"SecretId": name,
                                                "VersionStage": stage})["SecretString"])


def allow_rotator_to_read_master(send, rotator: str, master_arn: str) -> None:
    """The alternating-users rotator acts as its own principal, `rotator:<its name>`,
    which may read the master secret only where a policy says so."""
    send("PutIdentityPolicy", {
        "Principal": f"rotator:{rotator}", "PolicyName": "master",
        "PolicyDocument": json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
            "Resource": master_arn}]})})


def database_secret(send, server, name: str, scheme: str, *, user=None, tags=()):
    """A secret for a new database user (or `user`), rotated by `scheme`; for
    alternating users also the master secret, readable by the rotator. The user."""
    user = user or server.new_user()
    extra = {}
    if scheme == ALTERNATING:
        master = send("CreateSecret", {"Name": f"{name}-master",
                                       "SecretString": server.secret(server.admin)})
        allow_rotator_to_read_master(send, server.rotator(ALTERNATING), master["ARN"])
        extra["masterarn"] = master["ARN"]
    send("CreateSecret", {"Name": name, "SecretString": server.secret(user, **extra),
                          "Tags": [{"Key": key, "Value": value} for key, value in tags]})
    return user


def rotate(env, name: str, rotator: str) -> bool:
    """One rotation through the runner, in this thread; True when it finished."""
    env.call("RotateSecret", SecretId=name, RotationLambdaARN=rotator)
    runner = RotationRunner(env.service)
    return trio.run(runner.rotate, env.service.catalog.id_by_name(name))


def stages(send, name: str) -> dict:
    return send("DescribeSecret", {"SecretId": name})["VersionIdsToStages"]


# --- in this process: the runner and the service, against the real servers -------------

def test_single_user_rotation_changes_the_real_password(env, server):
    send = _service_sender(env)
    before = database_secret(send, server, "db/app", SINGLE)
    assert rotate(env, "db/app", server.rotator(SINGLE))
    current = login_at(send, server, "db/app", "AWSCURRENT")
    assert current.username == before.username and not current.matches(before)
    assert server.logs_in(current)
    assert not server.logs_in(before)
    assert login_at(send, server, "db/app", "AWSPREVIOUS").matches(before)
    assert not current.has_any_of("/@" + QUOTES)  # AWS's templates exclude these


def test_alternating_users_take_turns_and_the_previous_user_keeps_working(env, server):
    send = _service_sender(env)
    base = database_secret(send, server, "db/app", ALTERNATING)
    rotator = server.rotator(ALTERNATING)

    assert rotate(env, "db/app", rotator)
    clone = login_at(send, server, "db/app", "AWSCURRENT")
    assert clone.username == f"{base.username}_clone"
    assert server.logs_in(clone)
    assert server.reads_table_of(clone, base.username)  # the base user's privileges
    assert login_at(send, server, "db/app", "AWSPREVIOUS").matches(base)
    assert server.logs_in(base)  # AWSPREVIOUS keeps working until the next rotation

    assert rotate(env, "db/app", rotator)
    second = login_at(send, server, "db/app", "AWSCURRENT")
    assert second.username == base.username and not second.matches(base)
    assert server.logs_in(second) and server.reads_table_of(second, base.username)
    assert not server.logs_in(base)  # AWSPREVIOUS two rotations ago
    assert login_at(send, server, "db/app", "AWSPREVIOUS").matches(clone)
    assert server.logs_in(clone)

    assert rotate(env, "db/app", rotator)
    third = login_at(send, server, "db/app", "AWSCURRENT")
    assert third.username == clone.username and server.logs_in(third)
    assert not server.logs_in(clone)
    assert server.logs_in(second)


def test_a_set_secret_that_cannot_log_in_fails_and_keeps_awscurrent(env, server):
    """The password changed behind secretfs' back: setSecret can't log in with AWSCURRENT
    (there is no AWSPREVIOUS yet), the step fails, the error says why, naming no password."""
    send = _service_sender(env)
    before = database_secret(send, server, "db/app", SINGLE)
    changed = dataclasses.replace(before, password="changed-" + before.password)
    server.set_password(before.username, changed.password)
    assert not rotate(env, "db/app", server.rotator(SINGLE))
    assert login_at(send, server, "db/app", "AWSCURRENT").matches(before)
    pending = login_at(send, server, "db/app", "AWSPENDING")
    assert not server.logs_in(pending)
    error = send("DescribeSecret", {"SecretId": "db/app"})["RotationInProgress"]["LastError"]
    assert error.startswith("setSecret: DatabaseError: can't log in to ")
    assert "with AWSCURRENT's credentials" in error and before.username in error
    assert not any(login.appears_in(error) for login in (before, changed, pending))


@pytest.mark.parametrize("scheme", [SINGLE, ALTERNATING])
def test_names_and_passwords_with_quotes_rotate_without_injection(env, server, scheme):
    """A user named with a quote and a space, a password with quotes and backslashes,
    and passwords drawn from every character once a tag empties EXCLUDE_CHARACTERS."""
    send = _service_sender(env)
    before = server.new_user(name=f"o'k `app {secrets.token_hex(3)}",
                             password=f"it's \"quoted\" \\ {secrets.token_hex(4)}")
    database_secret(send, server, "db/app", scheme, user=before, tags=[
        ("secretfs:rotation:EXCLUDE_CHARACTERS", ""),
        ("secretfs:rotation:PASSWORD_LENGTH", "1024")])
    rotator = server.rotator(scheme)
    assert rotate(env, "db/app", rotator)
    current = login_at(send, server, "db/app", "AWSCURRENT")
    assert current.has_each_of(QUOTES)
    assert server.logs_in(current) and server.reads_table_of(current, before.username)
    if scheme == SINGLE:
        assert not server.logs_in(before)
        return
    assert current.username == before.username + "_clone" and server.logs_in(before)
    assert rotate(env, "db/app", rotator)  # the base user's password, set by the master
    again = login_at(send, server, "db/app", "AWSCURRENT")
    assert again.username == before.username and again.has_each_of(QUOTES)
    assert server.logs_in(again) and not server.logs_in(before)


@pytest.mark.parametrize(("rotator", "change", "expected"), [
    ("postgresql", {"port": None}, "AWSCURRENT lacks port; a database secret holds"),
    ("postgresql", {"engine": "mysql"}, "AWSCURRENT is for the engine 'mysql'"),
    ("mysql", {"host": ""}, "AWSCURRENT's host must be a non-empty string"),
    ("postgresql", {"username": "u" * 58}, "user names have at most 63 bytes"),
    ("mysql", {"username": "u" * 27}, "user names have at most 32 characters"),
])
def test_a_secret_that_does_not_fit_fails_with_a_clear_error(env, rotator, change, expected):
    """Checked at createSecret, before any connection: no server needed."""
    send = _service_sender(env)
    document = {"engine": "postgres" if rotator == "postgresql" else "mysql",
                "host": "127.0.0.1", "port": 1, "username": "app", "password": "p0-secret"}
    document.update(change)
    document = {key: value for key, value in document.items() if value is not None}
    send("CreateSecret", {"Name": "db/app", "SecretString": json.dumps(document)})
    assert not rotate(env, "db/app", f"secretfs:{rotator}-{ALTERNATING}")
    error = send("DescribeSecret", {"SecretId": "db/app"})["RotationInProgress"]["LastError"]
    assert error.startswith("createSecret: ValueError: ") and expected in error, error
    assert "p0-secret" not in error


@pytest.mark.parametrize(("line", "expected"), [
    ("GRANT USAGE ON *.* TO `app`@`%` IDENTIFIED BY PASSWORD '*0A1B'",
     "GRANT USAGE ON *.* TO 'app_clone'@'%'"),
    ("GRANT SELECT, INSERT ON `a TO b`.`t` TO `app`@`%` WITH GRANT OPTION",
     "GRANT SELECT, INSERT ON `a TO b`.`t` TO 'app_clone'@'%' WITH GRANT OPTION"),
    ("GRANT `reader` TO `app`@`%` WITH ADMIN OPTION",
     "GRANT `reader` TO 'app_clone'@'%' WITH ADMIN OPTION"),
    ("SET DEFAULT ROLE `reader` FOR `app`@`%`",
     "SET DEFAULT ROLE `reader` FOR 'app_clone'@'%'"),
    ("GRANT PROXY ON ''@'%' TO 'app'@'%'", "GRANT PROXY ON ''@'%' TO 'app_clone'@'%'"),
])
def test_show_grants_lines_grant_the_same_to_the_clone(line, expected):
    assert regranted(line, ("app", "%"), "'app_clone'@'%'") == expected


def test_a_show_grants_line_for_someone_else_is_refused():
    with pytest.raises(DatabaseError):
        regranted("GRANT SELECT ON *.* TO `o``ther`@`%`", ("app", "%"), "'app_clone'@'%'")


# --- the real daemon on a real FUSE mount -------------------------------------------------

def rotate_on_daemon(daemon, send, name: str, rotator: str) -> None:
    token = send("RotateSecret", {"SecretId": name, "RotationLambdaARN": rotator})["VersionId"]
    if not _settled(lambda: os.readlink(daemon.path(name, "AWSCURRENT"))
                     == f"versions/{token}"):
        progress = send("DescribeSecret", {"SecretId": name}).get("RotationInProgress")
        pytest.fail(f"the rotation of {name} did not finish: {progress}")
    # The runner records finishSecret just after the label moved.
    assert _settled(lambda: "RotationInProgress" not in send("DescribeSecret",
                                                              {"SecretId": name}))


class App(threading.Thread):
    """An application that connects again and again, reading AWSCURRENT from the
    mount before every try. With `retry`, a failed try waits for AWSCURRENT to move
    and tries once more with what it holds then."""

    def __init__(self, server, link: Path, *, retry: bool):
        super().__init__(daemon=True)
        self.server, self.link, self.retry = server, link, retry
        self.stop = threading.Event()
        self.tries: list[tuple[float, bool]] = []  # (when the try began, whether it logged in)
        self.retries = 0
        self.usernames: set[str] = set()

    def read(self):
        version = os.readlink(self.link)
        return version, self.server.login((self.link.parent / version).read_text())

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            version, login = self.read()
            connected = self.server.logs_in(login)
            if not connected and self.retry:
                self.retries += 1
                _settled(lambda version=version: os.readlink(self.link) != version,
                          seconds=5, interval=0.002)
                connected = self.server.logs_in(self.read()[1])
            self.tries.append((began, connected))
            self.usernames.add(login.username)

    def failures(self) -> int:
        return sum(not connected for _, connected in self.tries)

    def windows_ms(self) -> list[float]:
        """Each run of failed tries: from the first failure to the next success."""
        windows, opened = [], None
        for began, connected in self.tries:
            if not connected and opened is None:
                opened = began
            elif connected and opened is not None:
                windows.append((began - opened) * 1000)
                opened = None
        return windows


def _running(*apps: App):
    class Running:
        def __enter__(self):
            for app in apps:
                app.start()
            assert _settled(lambda: all(app.tries for app in apps), 10)
            return apps

        def __exit__(self, *exc_info):
            for app in apps:
                app.stop.set()
            for app in apps:
                app.join(30)

    return Running()


@pytest.mark.mount
@pytest.mark.slow
def test_an_app_reading_awscurrent_never_fails_across_50_alternating_rotations(daemon, server):
    send = _daemon_sender(daemon)
    base = database_secret(send, server, "db/app", ALTERNATING)
    rotations = 50
    app = App(server, daemon.path("db/app/AWSCURRENT"), retry=False)
    started = time.monotonic()
    with _running(app):
        for _ in range(rotations):
            rotate_on_daemon(daemon, send, "db/app", server.rotator(ALTERNATING))
    elapsed = time.monotonic() - started
    print(f"\n{server.engine}, alternating users: {rotations} rotations in {elapsed:.1f} s; "
          f"the app connected {len(app.tries)} times, {app.failures()} failed")
    assert app.failures() == 0
    assert len(app.tries) >= 5 * rotations
    assert app.usernames == {base.username, base.username + "_clone"}
    versions = send("ListSecretVersionIds", {"SecretId": "db/app", "IncludeDeprecated": True})
    assert len(versions["Versions"]) == rotations + 1


@pytest.mark.mount
@pytest.mark.slow
def test_single_user_rotation_has_a_short_window_that_one_retry_bridges(daemon, server):
    """Between setSecret and finishSecret the database wants the new password while
    AWSCURRENT still holds the old one: measured by an app that never retries; an
    app that waits for AWSCURRENT to move and retries once always connects."""
    send = _daemon_sender(daemon)
    database_secret(send, server, "db/app", SINGLE)
    rotations = 20
    link = daemon.path("db/app/AWSCURRENT")
    naive, retrying = App(server, link, retry=False), App(server, link, retry=True)
    with _running(naive, retrying):
        for _ in range(rotations):
            rotate_on_daemon(daemon, send, "db/app", server.rotator(SINGLE))
    windows = sorted(naive.windows_ms())
    median, longest = (windows[len(windows) // 2], windows[-1]) if windows else (0.0, 0.0)
    print(f"\n{server.engine}, single user, {rotations} rotations: an app without retry "
          f"failed {naive.failures()} of {len(naive.tries)} connects, in {len(windows)} "
          f"windows, median {median:.1f} ms, the longest {longest:.1f} ms; an app retrying once "
          f"failed {retrying.failures()} of {len(retrying.tries)} "
          f"({retrying.retries} retries)")
    assert retrying.failures() == 0
    assert len(retrying.tries) >= rotations
    assert server.logs_in(login_at(send, server, "db/app", "AWSCURRENT"))


def _start_pausing(daemon, step: str, marker: Path) -> subprocess.Popen:
    """The daemon through tests/_pausing_daemon.py, ready when this returns."""
    read_end, write_end = os.pipe()
    launcher = Path(__file__).with_name("_pausing_daemon.py")
    # The checkout under test, as `python -m secretfs.daemon` from its root would find it.
    checkout = str(launcher.parent.parent)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [checkout, os.environ.get("PYTHONPATH")])))
    with open(daemon.state_dir / "pausing.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, str(launcher), step, str(marker), "secretfs.daemon",
             "--mountpoint", str(daemon.mountpoint), "--state-dir", str(daemon.state_dir),
             "--ready-fd", str(write_end)],
            pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=environment, start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        assert ready.readline().strip() == b"READY"
    return process


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize(("engine", "scheme"), [("postgresql", SINGLE),
                                                ("mariadb", ALTERNATING)])
@pytest.mark.parametrize("step", STEPS)
def test_a_daemon_killed_after_each_step_finishes_the_rotation_after_restart(
        daemon, tmp_path, request, engine, scheme, step):
    server = request.getfixturevalue(f"{engine}_server")
    send = _daemon_sender(daemon)
    before = database_secret(send, server, "db/app", scheme)
    first = login_at(send, server, "db/app", "AWSCURRENT")
    first_version = send("GetSecretValue", {"SecretId": "db/app"})["VersionId"]
    daemon.stop()
    marker = tmp_path / "paused"
    process = _start_pausing(daemon, step, marker)
    try:
        token = send("RotateSecret", {"SecretId": "db/app",
                                      "RotationLambdaARN": server.rotator(scheme)})["VersionId"]
        assert _settled(marker.exists)
        os.kill(daemon.pid(), signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    daemon.start()  # an ordinary daemon: it clears the stale mount, the runner resumes
    assert _settled(lambda: os.readlink(daemon.path("db/app/AWSCURRENT"))
                     == f"versions/{token}")
    assert _settled(lambda: "RotationInProgress" not in send("DescribeSecret",
                                                              {"SecretId": "db/app"}))
    assert stages(send, "db/app") == {token: ["AWSCURRENT"], first_version: ["AWSPREVIOUS"]}
    assert not daemon.path("db/app/AWSPENDING").exists()
    versions = send("ListSecretVersionIds", {"SecretId": "db/app", "IncludeDeprecated": True})
    assert len(versions["Versions"]) == 2
    current = login_at(send, server, "db/app", "AWSCURRENT")
    assert server.logs_in(current)
    assert login_at(send, server, "db/app", "AWSPREVIOUS").matches(first)
    if scheme == SINGLE:
        assert not server.logs_in(before)
    else:
        assert current.username == before.username + "_clone" and server.logs_in(before)
