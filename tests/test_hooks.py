"""Tier 2: change hooks, inotify on the mount, and `secretfs wait`, through the real daemon.

Hooks are files in `<state-dir>/hooks.d/`, read at start and by `secretfs refresh`;
each test adds its own, on secrets of its own, and removes them afterwards.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SECRETFS, Daemon, reachable_directory, serving_daemon, wait_for

from secretfs.api.client import Client
from secretfs.hooks import HOOK_PATH, references
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

TEMPLATE_TAG = [{"Key": "secretfs:template", "Value": "jinja2"}]


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    with serving_daemon(prefix="secretfs-hooks-") as running:
        yield running


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(StateDir(served.state_dir).socket, timeout=30.0)


@pytest.fixture
def add_hook(served):
    """add_hook(name, **fields): write hooks.d/NAME.json (root's, 0600) and load it."""
    directory = StateDir(served.state_dir).hooks_dir
    directory.mkdir(mode=0o700, exist_ok=True)
    written: list[Path] = []

    def add(name: str, *, mode: int = 0o600, **fields) -> str:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(fields))
        path.chmod(mode)
        written.append(path)
        return served.cli("refresh").stdout.decode()

    yield add
    for path in written:
        path.unlink(missing_ok=True)
    served.cli("refresh")


def marker(path: Path) -> list[str]:
    """A hook command appending one line per run: event, secret, version, all secrets."""
    return ["/bin/sh", "-c", 'echo "$SECRETFS_EVENT $SECRETFS_SECRET $SECRETFS_VERSION_ID '
            f'$SECRETFS_SECRETS" >> {path}']


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def settled(path: Path, count: int, quiet: float = 1.0) -> list[str]:
    """The marker's lines once it has `count` and no more arrive for `quiet` seconds."""
    assert wait_for(lambda: len(lines(path)) >= count), lines(path)
    time.sleep(quiet)
    return lines(path)


def hook_status(served: Daemon, name: str) -> dict:
    status = served.call("status", "--output", "json")
    return next(hook for hook in status["Hooks"] if hook["Name"] == name)


# --- secret hooks --------------------------------------------------------------------

def test_a_hook_runs_when_awscurrent_moves_through_put_secret_value(served, client, add_hook,
                                                                    tmp_path):
    runs = tmp_path / "runs"
    client.call("CreateSecret", {"Name": "hooks/put", "SecretString": "v1"})
    add_hook("put", Secret="hooks/put", Command=marker(runs), Debounce=0.2)
    assert lines(runs) == []  # a new hook starts from what is there: no run
    second = served.call("put-secret-value", "--secret-id", "hooks/put",
                         "--secret-string", "v2")["VersionId"]
    assert settled(runs, 1) == [f"current hooks/put {second} hooks/put"]
    # A version staged elsewhere than AWSCURRENT is no change for the hook...
    pending = served.call("put-secret-value", "--secret-id", "hooks/put", "--secret-string",
                          "v3", "--version-stages", "AWSPENDING")["VersionId"]
    time.sleep(1.0)
    assert len(lines(runs)) == 1
    # ...until it is promoted.
    served.call("update-secret-version-stage", "--secret-id", "hooks/put", "--version-stage",
                "AWSCURRENT", "--move-to-version-id", pending, "--remove-from-version-id",
                second)
    assert settled(runs, 2)[1] == f"current hooks/put {pending} hooks/put"


def test_a_hook_runs_when_a_rotation_moves_awscurrent(served, client, add_hook, tmp_path):
    runs = tmp_path / "runs"
    client.call("CreateSecret", {"Name": "hooks/rotated", "SecretString": '{"password": "a"}'})
    add_hook("rotated", Secret="hooks/rot*", Command=marker(runs), Debounce=0.2)
    token = served.call("rotate-secret", "--secret-id", "hooks/rotated",
                        "--rotation-lambda-arn", "secretfs:random-password")["VersionId"]
    assert wait_for(lambda: os.readlink(served.path("hooks/rotated/AWSCURRENT"))
                    == f"versions/{token}")
    # One run, for the promotion: the pending version it made first moved nothing.
    assert settled(runs, 1) == [f"current hooks/rotated {token} hooks/rotated"]


def test_a_burst_of_puts_is_coalesced_by_the_debounce(served, client, add_hook, tmp_path):
    runs = tmp_path / "runs"
    client.call("CreateSecret", {"Name": "hooks/burst", "SecretString": "0"})
    add_hook("burst", Secret="hooks/burst", Command=marker(runs), Debounce=1.0)
    versions = [client.call("PutSecretValue", {"SecretId": "hooks/burst",
                                               "SecretString": str(count)})["VersionId"]
                for count in range(1, 11)]
    found = settled(runs, 1, quiet=2.0)
    assert 1 <= len(found) <= 2, found
    assert found[-1] == f"current hooks/burst {versions[-1]} hooks/burst"
    assert hook_status(served, "burst")["Runs"] == len(found)


def test_a_glob_hook_hears_new_and_deleted_secrets_in_one_run_each(served, client, add_hook,
                                                                   tmp_path):
    runs = tmp_path / "runs"
    add_hook("glob", Secret="hooks/glob/*", Command=marker(runs), Debounce=0.5)
    first = client.call("CreateSecret", {"Name": "hooks/glob/a", "SecretString": "a"})
    client.call("CreateSecret", {"Name": "hooks/glob/b", "SecretString": "b"})
    client.call("CreateSecret", {"Name": "hooks/other", "SecretString": "c"})  # no match
    found = settled(runs, 1)
    assert found == [f"current hooks/glob/a {first['VersionId']} hooks/glob/a hooks/glob/b"]
    client.call("DeleteSecret", {"SecretId": "hooks/glob/a"})
    assert settled(runs, 2)[1] == "deleted hooks/glob/a  hooks/glob/a"


# --- template hooks ----------------------------------------------------------------

def test_a_template_hook_fires_when_a_secret_it_reads_changes(served, client, add_hook,
                                                            tmp_path):
    runs = tmp_path / "runs"
    client.call("CreateSecret", {"Name": "hooks/tdb", "SecretString": '{"password": "p1"}'})
    client.call("CreateSecret", {"Name": "hooks/unread", "SecretString": "x"})
    template = client.call("CreateSecret", {
        "Name": "hooks/app.conf", "SecretString": "pw={{ secret('hooks/tdb').password }}\n",
        "Tags": TEMPLATE_TAG})["VersionId"]
    add_hook("conf", Template="hooks/app.conf", Command=marker(runs), Debounce=0.2)
    client.call("PutSecretValue", {"SecretId": "hooks/tdb", "SecretString": '{"password": "p2"}'})
    assert settled(runs, 1) == [f"template hooks/app.conf {template} hooks/app.conf"]
    assert served.path("~templates/hooks/app.conf").read_text() == "pw=p2\n"
    # A secret it doesn't read, or a label of one it reads that it doesn't: no run.
    client.call("PutSecretValue", {"SecretId": "hooks/unread", "SecretString": "y"})
    client.call("PutSecretValue", {"SecretId": "hooks/tdb", "SecretString": '{"password": "p3"}',
                                   "VersionStages": ["AWSPENDING"]})
    time.sleep(1.0)
    assert len(lines(runs)) == 1
    # A new version of the template itself changes its output.
    newer = client.call("PutSecretValue", {"SecretId": "hooks/app.conf",
                                           "SecretString": "pw2={{ secret('hooks/tdb')['password'] }}\n"}
                        )["VersionId"]
    assert settled(runs, 2)[1] == f"template hooks/app.conf {newer} hooks/app.conf"


def test_what_a_template_reads_is_found_in_its_syntax_tree():
    assert references("{{ secret('a').x }} {{ secret('b', stage='AWSPREVIOUS') }}"
                      "{{ secret(name='c', version_id='v') }}") == frozenset(
        {("a", "AWSCURRENT"), ("b", "AWSPREVIOUS"), ("c", "*")})
    assert references("{{ secret('a', stage=s) }}") == frozenset({("a", "*")})
    # A computed name, or `secret` passed around: any secret may matter.
    assert references("{% for n in ['a', 'b'] %}{{ secret(n) }}{% endfor %}") is None
    assert references("{% set s = secret %}{{ s('a') }}") is None
    assert references("{{ secret(*names) }}") is None
    assert references("{{ oops") == frozenset()


# --- failures ------------------------------------------------------------------------

def test_failing_and_hanging_hooks_are_logged_audited_and_never_stop_the_mount(
        served, client, add_hook, tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    client.call("CreateSecret", {"Name": "hooks/fails", "SecretString": "a"})
    client.call("CreateSecret", {"Name": "hooks/hangs", "SecretString": "a"})
    add_hook("fails", Secret="hooks/fails", Command=["/bin/sh", "-c", "exit 3"], Debounce=0)
    # The sleeper is the hook's child, and ignores SIGTERM: the timeout kills the hook's
    # whole process group, not only the process it started.
    add_hook("hangs", Secret="hooks/hangs", Debounce=0, Timeout=1.5, Command=[
        "/bin/sh", "-c", f"(trap '' TERM; exec sleep 300) & echo $! > {pid_file}; wait"])
    client.call("PutSecretValue", {"SecretId": "hooks/fails", "SecretString": "b"})
    client.call("PutSecretValue", {"SecretId": "hooks/hangs", "SecretString": "b"})
    assert wait_for(pid_file.exists)
    sleeper = int(pid_file.read_text())
    # While the hook hangs, the mount and the API answer as ever.
    started = time.monotonic()
    for _ in range(20):
        assert served.path("hooks/hangs/AWSCURRENT").read_text() == "b"
    client.call("DescribeSecret", {"SecretId": "hooks/hangs"})
    assert time.monotonic() - started < 1.0
    assert wait_for(lambda: hook_status(served, "hangs")["Failures"] == 1)
    assert wait_for(lambda: not os.path.exists(f"/proc/{sleeper}"), 5)
    assert hook_status(served, "fails")["LastError"] == "exited with status 3"
    assert hook_status(served, "hangs")["LastError"].startswith("timed out after 1.5 s")

    def run_records(secret: str) -> list[dict]:
        return [record for record in served.audit_records("--secret", secret)
                if record["eventName"] == "RunHook"]

    assert wait_for(lambda: run_records("hooks/fails") and run_records("hooks/hangs"))
    failed, hung = run_records("hooks/fails")[0], run_records("hooks/hangs")[0]
    assert failed["errorCode"] == hung["errorCode"] == "HookFailed"
    assert failed["errorMessage"] == "exited with status 3"
    assert failed["hook"]["exitCode"] == 3 and failed["hook"]["command"] == "/bin/sh"
    assert failed["resources"]["name"] == "hooks/fails"
    assert "timed out" in hung["errorMessage"]
    log = (served.state_dir / "daemon.log").read_text()
    assert "hook fails for hooks/fails exited with status 3" in log
    assert "hook hangs for hooks/hangs timed out after 1.5 s" in log


def test_a_hook_gets_names_and_versions_never_a_value(served, client, add_hook, tmp_path):
    dump = tmp_path / "env"
    value = "hunter2-never-in-a-hook"
    client.call("CreateSecret", {"Name": "hooks/env", "SecretString": "first"})
    add_hook("env", Secret="hooks/env", Command=["/bin/sh", "-c", f"env > {dump}"], Debounce=0)
    version = client.call("PutSecretValue", {"SecretId": "hooks/env",
                                             "SecretString": value})["VersionId"]
    assert wait_for(lambda: dump.exists() and dump.read_text().endswith("\n"))
    environment = dict(line.split("=", 1) for line in dump.read_text().splitlines())
    assert value not in dump.read_text()
    assert {key: item for key, item in environment.items() if key.startswith("SECRETFS_")} == {
        "SECRETFS_HOOK": "env", "SECRETFS_EVENT": "current", "SECRETFS_SECRET": "hooks/env",
        "SECRETFS_VERSION_ID": version, "SECRETFS_SECRETS": "hooks/env",
        "SECRETFS_PATH": str(served.path("hooks/env/AWSCURRENT")),
        "SECRETFS_MOUNTPOINT": str(served.mountpoint),
        "SECRETFS_STATE_DIR": str(served.state_dir)}
    assert environment["PATH"] == HOOK_PATH and environment["HOME"] == "/"
    # Nothing of the daemon's own environment (a credentials directory, say).
    assert not {"CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "PYTHONPATH"} & environment.keys()


def test_a_hook_runs_as_its_user(served, client, add_hook, make_user):
    user = make_user()
    out = reachable_directory("secretfs-hook-user-")
    out.chmod(0o777)
    client.call("CreateSecret", {"Name": "hooks/as-user", "SecretString": "a"})
    add_hook("as-user", Secret="hooks/as-user", User=user.pw_name, Debounce=0,
             Command=["/bin/sh", "-c", f"id -u > {out}/id; echo $HOME >> {out}/id"])
    client.call("PutSecretValue", {"SecretId": "hooks/as-user", "SecretString": "b"})
    assert wait_for(lambda: len(lines(out / "id")) == 2)
    assert lines(out / "id") == [str(user.pw_uid), user.pw_dir]
    assert (out / "id").stat().st_uid == user.pw_uid


def test_hook_files_anyone_but_root_could_write_are_refused(served, client, add_hook, tmp_path):
    runs = tmp_path / "runs"
    client.call("CreateSecret", {"Name": "hooks/unsafe", "SecretString": "a"})
    out = add_hook("unsafe", Secret="hooks/unsafe", Command=marker(runs), mode=0o622)
    assert "hook refused: " in out and "unsafe.json: not a regular file owned by root" in out
    out = add_hook("relative", Secret="hooks/unsafe", Command=["touch", str(runs)])
    assert "must start with an absolute path" in out
    out = add_hook("typo", Secrets="hooks/unsafe", Command=marker(runs))
    assert "unknown field 'Secrets'" in out
    problems = served.call("status", "--output", "json")["HookProblems"]
    assert len(problems) == 3
    client.call("PutSecretValue", {"SecretId": "hooks/unsafe", "SecretString": "b"})
    time.sleep(1.5)
    assert not runs.exists()


# --- inotify -------------------------------------------------------------------------

IN_ALL_EVENTS, IN_DONT_FOLLOW = 0xFFF, 0x02000000
IN_EVENTS = {0x1: "ACCESS", 0x2: "MODIFY", 0x4: "ATTRIB", 0x8: "CLOSE_WRITE",
             0x10: "CLOSE_NOWRITE", 0x20: "OPEN", 0x40: "MOVED_FROM", 0x80: "MOVED_TO",
             0x100: "CREATE", 0x200: "DELETE", 0x400: "DELETE_SELF", 0x800: "MOVE_SELF",
             0x8000: "IGNORED"}


class Inotify:
    """inotify(7) through libc: watches by label, and the events they report."""

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.labels: dict[int, str] = {}

    def watch(self, label: str, path: Path, flags: int = 0) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ALL_EVENTS | flags)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.labels[wd] = label

    def events(self, wait: float = 1.0) -> list[tuple[str, str]]:
        found = []
        while select.select([self.fd], [], [], wait)[0]:
            data, offset = os.read(self.fd, 65536), 0
            while offset < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, offset)
                found += [(self.labels[wd], name) for bit, name in IN_EVENTS.items()
                          if mask & bit]
                offset += 16 + size
            wait = 0.3
        return found

    def close(self) -> None:
        os.close(self.fd)


def test_inotify_on_a_label_reports_each_promotion_as_delete_self(served, client):
    """What the kernel delivers (measured on kernel 6.x): FUSE sends no inotify event of
    its own for a change the daemon makes; the daemon forgets the label's entry and the
    version it pointed to as deleted, which gives IN_DELETE_SELF (then IN_IGNORED) to a
    watch on the label itself (IN_DONT_FOLLOW) and to a watch through it (on the version
    file). A watch on the secret's directory hears nothing of it."""
    directory = served.path("hooks/watched")
    client.call("CreateSecret", {"Name": "hooks/watched", "SecretString": "v0"})
    for round_ in range(1, 4):
        assert (directory / "AWSCURRENT").read_text() == f"v{round_ - 1}"
        inotify = Inotify()
        try:  # re-armed each round: a watch ends with its IN_DELETE_SELF
            inotify.watch("through", directory / "AWSCURRENT")
            inotify.watch("link", directory / "AWSCURRENT", IN_DONT_FOLLOW)
            inotify.watch("directory", directory)
            assert inotify.events(0.2) == []
            client.call("PutSecretValue", {"SecretId": "hooks/watched",
                                           "SecretString": f"v{round_}"})
            found = inotify.events()
        finally:
            inotify.close()
        assert sorted(found) == [("link", "DELETE_SELF"), ("link", "IGNORED"),
                                 ("through", "DELETE_SELF"), ("through", "IGNORED")]
    assert (directory / "AWSCURRENT").read_text() == "v3"


READER = textwrap.dedent("""
    import json, os, sys
    path, stop, expected = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3]))
    reads, errors, torn = 0, [], []
    while not os.path.exists(stop):
        for label in ("AWSCURRENT", "AWSPREVIOUS"):
            try:
                with open(os.path.join(path, label)) as handle:
                    data = handle.read()
            except OSError as error:
                errors.append(f"{label}: {error.strerror}")
                continue
            reads += 1
            if data not in expected:
                torn.append(data)
    print(json.dumps({"reads": reads, "errors": errors[:10], "torn": torn[:10]}))
""")


def test_readers_never_see_enoent_while_labels_are_forgotten_as_deleted(served, client):
    """Invariant 3 with the inotify invalidation: four processes read AWSCURRENT and
    AWSPREVIOUS through the mount while 150 promotions happen; every read is a whole
    value, none fails."""
    values = [f"value-{count:03d}-" + "x" * (count % 7) * 100 for count in range(151)]
    client.call("CreateSecret", {"Name": "hooks/busy", "SecretString": values[0]})
    client.call("PutSecretValue", {"SecretId": "hooks/busy", "SecretString": values[1]})
    stop = Path(served.state_dir.parent / "stop-readers")
    readers = [subprocess.Popen(
        [sys.executable, "-c", READER, str(served.path("hooks/busy")), str(stop),
         json.dumps(values)], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for value in values[2:]:
            client.call("PutSecretValue", {"SecretId": "hooks/busy", "SecretString": value})
    finally:
        stop.touch()
    results = [json.loads(reader.communicate(timeout=30)[0]) for reader in readers]
    stop.unlink()
    assert all(result["reads"] > 0 for result in results), results
    assert [result["errors"] for result in results] == [[]] * 4
    assert [result["torn"] for result in results] == [[]] * 4
    assert served.path("hooks/busy/AWSCURRENT").read_text() == values[-1]


# --- secretfs wait -------------------------------------------------------------------

def wait_command(served: Daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, SECRETFS_STATE_DIR=str(served.state_dir))
    return subprocess.run([*SECRETFS, "wait", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_wait_returns_the_new_version_when_the_label_moves(served, client):
    client.call("CreateSecret", {"Name": "hooks/awaited", "SecretString": "a"})
    moved = []

    def promote() -> None:
        time.sleep(1.5)
        moved.append(client.call("PutSecretValue", {"SecretId": "hooks/awaited",
                                                    "SecretString": "b"})["VersionId"])

    promoter = threading.Thread(target=promote)
    promoter.start()
    started = time.monotonic()
    result = wait_command(served, "hooks/awaited", "--interval", "0.2", "--timeout", "20")
    promoter.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{moved[0]}\n"
    assert 1.4 < time.monotonic() - started < 10


def test_wait_with_the_version_read_returns_at_once_if_it_moved_meanwhile(served, client):
    old = client.call("CreateSecret", {"Name": "hooks/raced", "SecretString": "a"})["VersionId"]
    new = client.call("PutSecretValue", {"SecretId": "hooks/raced",
                                         "SecretString": "b"})["VersionId"]
    result = wait_command(served, "hooks/raced", "--version-id", old, "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, f"{new}\n")
    # Another label: AWSPREVIOUS is now on the old version.
    result = wait_command(served, "hooks/raced", "--stage", "AWSPREVIOUS", "--version-id",
                          new, "--timeout", "5")
    assert (result.returncode, result.stdout) == (0, f"{old}\n")


def test_wait_times_out_with_exit_status_124(served, client):
    current = client.call("CreateSecret", {"Name": "hooks/still",
                                           "SecretString": "a"})["VersionId"]
    started = time.monotonic()
    result = wait_command(served, "hooks/still", "--timeout", "1", "--interval", "0.2")
    assert result.returncode == 124
    assert result.stdout == ""
    assert result.stderr == (f"secretfs wait: hooks/still AWSCURRENT is still on {current} "
                             "after 1 s\n")
    assert 0.9 < time.monotonic() - started < 5
    missing = wait_command(served, "hooks/never-created", "--timeout", "1")
    assert missing.returncode == 254
    assert missing.stderr.startswith("An error occurred (ResourceNotFoundException)")

