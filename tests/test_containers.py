"""Tier 2: secrets in containers, without a container engine: what examples/containers/
shows, proven on a real mount.

A container here is what rootless podman makes: bubblewrap started by a throw-away
user, in user, mount, pid, ipc, uts and network namespaces of its own, on a minimal
root (the host's /usr read-only, /proc, /dev, tmpfs /run and /tmp), with the secret's
directory bind-mounted read-only where compose.yaml puts it. Inside, the process is uid
1000 (or 0); the daemon sees the host uid the user namespace maps it to, and the
policy of the example (read-db.json) decides for that uid. The containers run the
examples' own scripts (app.sh, legacy-app.sh), which print fingerprints of what they
read, never values; the tests compare fingerprints.

The last two tests stop a daemon of their own. The restart test mounts it below a
shared directory and reads it from a mount namespace that is a slave of the host's,
with the hostPath volumes a Kubernetes node makes (rslave for `mountPropagation:
HostToContainer`); the umount test shows what a container's bind does to `secretfs
umount`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml  # PyYAML: installed with the test extras (the aws CLI needs it)
from conftest import Daemon, reachable_directory, serving_daemon, wait_for
from test_presentation import throwaway_users

from secretfs.api.client import Client
from secretfs.state import StateDir

pytestmark = pytest.mark.mount

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "containers"
SECRET = "prod/db"
TEMPLATE = "legacy/app.ini"
SECRET_IN_CONTAINER = "/run/secrets/db"     # compose.yaml's and kubernetes.yaml's target
CONFIG_IN_CONTAINER = "/etc/legacy-app"     # where compose.yaml binds the template's directory
INSIDE_UID = 1000                           # compose.yaml's `user:`
DENIED = b"Permission denied"
NOT_CONNECTED = "Transport endpoint is not connected"
CONTAINER_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def fingerprint(value: str | bytes) -> str:
    """What the examples print for a value: `$(cat ...)` drops trailing newlines, then
    the first 16 hex digits of its SHA-256."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data.rstrip(b"\n")).hexdigest()[:16]


def app_line(value: str) -> str:
    """The line app.sh prints for a JSON value of the secret."""
    return (f"AWSCURRENT {fingerprint(value)} "
            f"password {fingerprint(json.loads(value)['password'])}")


def new_value() -> str:
    return json.dumps({"username": "app", "password": secrets.token_urlsafe(12)},
                      separators=(",", ":"))


# --- the scene: one daemon, the examples' secret, template and policy --------------------

@dataclass
class Scene:
    daemon: Daemon
    app: pwd.struct_passwd        # the containers' host uid, which read-db.json allows
    intruder: pwd.struct_passwd   # allowed by no policy
    client: Client

    def current(self) -> tuple[str, str]:
        """The version id and value AWSCURRENT holds now."""
        got = self.client.call("GetSecretValue", {"SecretId": SECRET})
        return got["VersionId"], got["SecretString"]

    def put(self, value: str) -> str:
        """PutSecretValue through the socket (faster than the CLI, for bursts)."""
        return self.client.call("PutSecretValue", {"SecretId": SECRET,
                                                   "SecretString": value})["VersionId"]

    @property
    def secret_dir(self) -> Path:
        return secret_dir(self.daemon)


def secret_dir(daemon: Daemon) -> Path:
    return daemon.path(*SECRET.split("/"))


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is needed")
    with throwaway_users(2) as (app, intruder), \
            serving_daemon(prefix="secretfs-containers-") as daemon:
        unprivileged = run_once(app, {}, "true")
        if unprivileged.returncode != 0:
            pytest.fail("an unprivileged user can't start bwrap in a user namespace here: "
                        + unprivileged.stderr.decode(errors="replace").strip())
        daemon.call("create-secret", "--name", SECRET, "--secret-string", "-",
                    input=new_value().encode())
        daemon.call("create-secret", "--name", TEMPLATE,
                    "--secret-string", f"file://{EXAMPLES / 'app.ini.j2'}",
                    "--tags", "Key=secretfs:template,Value=jinja2")
        allow_app(daemon, app)
        yield Scene(daemon, app, intruder, Client(StateDir(daemon.state_dir).socket))


def allow_app(daemon: Daemon, app: pwd.struct_passwd) -> None:
    """The example's own policy (read-db.json), for the uid the host sees."""
    daemon.call("put-identity-policy", "--principal", f"uid:{app.pw_uid}",
                "--policy-name", "ReadDb",
                "--policy-document", f"file://{EXAMPLES / 'read-db.json'}")


# --- containers ---------------------------------------------------------------------------

def minimal_root() -> list[str]:
    """bwrap arguments for a root of the host's /usr and nothing else of it: the
    top-level bin and lib directories as the host has them (links into /usr, or
    directories bound read-only)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def container(user: pwd.struct_passwd, binds: dict[str, Path], script: str, *,
              inside_uid: int = INSIDE_UID, env: dict[str, str] | None = None) -> list[str]:
    """The command of a rootless container: `user` on the host, `inside_uid` inside;
    each `binds` target is a read-only bind mount of its host source."""
    command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
               "--init-groups", "--",
               "bwrap", "--unshare-user", "--uid", str(inside_uid), "--gid", str(inside_uid),
               "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
               "--die-with-parent", "--new-session", *minimal_root(),
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run"]
    for target, source in binds.items():
        command += ["--ro-bind", str(source), target]
    for name, value in (env or {}).items():
        command += ["--setenv", name, value]
    return [*command, "--chdir", "/", "--", "sh", "-c", script, "container"]


def run_once(user: pwd.struct_passwd, binds: dict[str, Path], script: str,
             **options) -> subprocess.CompletedProcess:
    return subprocess.run(container(user, binds, script, **options), capture_output=True,
                          timeout=30, env=CONTAINER_ENV)


@dataclass
class Running:
    """A long-running container whose standard output and error go to files."""
    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def lines(self) -> list[str]:
        """The complete lines it printed so far."""
        return self.stdout.read_text().split("\n")[:-1]

    def last(self) -> str | None:
        lines = self.lines()
        return lines[-1] if lines else None

    def next_lines(self, count: int = 5) -> list[str]:
        """The next `count` lines (or more) it prints from now on."""
        seen = len(self.lines())
        assert wait_for(lambda: len(self.lines()) >= seen + count), "the container stalled"
        return self.lines()[seen:]

    def wait_for_last(self, expected: str, seconds: float = 15.0) -> bool:
        return wait_for(lambda: self.last() == expected and self.process.poll() is None,
                        seconds)


@contextlib.contextmanager
def running(command: list[str], directory: Path) -> Iterator[Running]:
    stdout, stderr = directory / "stdout", directory / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=CONTAINER_ENV,
                                   start_new_session=True)
    try:
        yield Running(process, stdout, stderr)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


# --- reading through the relative symlinks -------------------------------------------------

def test_a_rootless_container_reads_the_label_and_a_key_through_relative_symlinks(scene):
    version, value = scene.current()
    result = run_once(scene.app, {SECRET_IN_CONTAINER: scene.secret_dir}, f"""
        cd {SECRET_IN_CONTAINER} || exit 9
        id -u
        readlink AWSCURRENT keys/AWSCURRENT
        cat AWSCURRENT | sha256sum | cut -c1-16
        cat keys/AWSCURRENT/password | sha256sum | cut -c1-16
        ls keys/AWSCURRENT
        grep " {SECRET_IN_CONTAINER} " /proc/self/mountinfo | cut -d" " -f4,5,6""")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    # Relative targets: they resolve inside the bind mount, not along the host's path.
    assert lines[:3] == [str(INSIDE_UID), f"versions/{version}", f".by-version/{version}"]
    assert lines[3:5] == [fingerprint(value), fingerprint(json.loads(value)["password"])]
    assert lines[5:7] == ["password", "username"]
    # What is bound is the secret's directory, read-only.
    root, target, options = lines[7].split()
    assert (root, target) == ("/" + SECRET, SECRET_IN_CONTAINER)
    assert "ro" in options.split(",")
    # The daemon decided for the host uid the namespace maps uid 1000 to.
    assert wait_for(lambda: any(
        record["eventName"] == "GetSecretValue" and record["decision"] == "allow"
        and record["resources"]["versionId"] == version
        for record in scene.daemon.audit_records("--uid", str(scene.app.pw_uid))), 5)


# --- promotions and rotations reach a running container -------------------------------------

def test_a_running_container_sees_each_promotion_and_rotation_whole_without_restart(
        scene, tmp_path):
    """app.sh, in one container started once, reads AWSCURRENT and a JSON key every
    50 ms while the host promotes, stages, rolls back, rotates and then promotes 40
    times in a burst: it follows each change, and every read is one whole value."""
    command = container(scene.app, {SECRET_IN_CONTAINER: scene.secret_dir},
                        example("app.sh"),
                        env={"SECRET_DIR": SECRET_IN_CONTAINER, "INTERVAL": "0.05"})
    _, first = scene.current()
    values = [first]
    with running(command, tmp_path) as app:
        assert app.wait_for_last(app_line(first)), "the container never read the secret"
        # put-secret-value, as an operator runs it.
        values.append(new_value())
        scene.daemon.call("put-secret-value", "--secret-id", SECRET, "--secret-string", "-",
                          input=values[-1].encode())
        assert app.wait_for_last(app_line(values[-1]))
        # Staged under AWSPENDING: what the application reads doesn't change...
        previous = scene.current()[0]
        values.append(new_value())
        staged = scene.daemon.call("put-secret-value", "--secret-id", SECRET,
                                   "--secret-string", "-", "--version-stages", "AWSPENDING",
                                   input=values[-1].encode())["VersionId"]
        assert set(app.next_lines()) == {app_line(values[-2])}
        # ... until AWSCURRENT moves onto it (and AWSPENDING leaves it, as a rotation's
        # finishSecret does).
        move = ("update-secret-version-stage", "--secret-id", SECRET, "--version-stage")
        scene.daemon.call(*move, "AWSCURRENT", "--move-to-version-id", staged,
                          "--remove-from-version-id", previous)
        scene.daemon.call(*move, "AWSPENDING", "--remove-from-version-id", staged)
        assert app.wait_for_last(app_line(values[-1]))
        # A rollback.
        scene.daemon.call(*move, "AWSCURRENT", "--move-to-version-id", previous,
                          "--remove-from-version-id", staged)
        assert app.wait_for_last(app_line(values[-2]))
        # A rotation, by the daemon's own random-password rotator.
        started = scene.daemon.call("rotate-secret", "--secret-id", SECRET,
                                    "--rotation-lambda-arn", "secretfs:random-password")
        assert wait_for(lambda: scene.current()[0] == started["VersionId"])
        values.append(scene.current()[1])
        assert app.wait_for_last(app_line(values[-1]))
        # A burst of promotions, several per read.
        for _ in range(40):
            values.append(new_value())
            scene.put(values[-1])
            time.sleep(0.01)
        assert app.wait_for_last(app_line(values[-1]))
        assert app.process.poll() is None  # the same process all along
    # Each read is a whole value (the two files of one line are two opens, which a
    # promotion may fall between: each is checked on its own).
    whole = {fingerprint(value): index for index, value in enumerate(values)}
    keys = {fingerprint(json.loads(value)["password"]): index
            for index, value in enumerate(values)}
    observed = [line.split(" ") for line in app.lines()]
    wrong = [at for at, words in enumerate(observed)
             if len(words) != 4 or words[0] != "AWSCURRENT" or words[1] not in whole
             or words[2] != "password" or words[3] not in keys]
    assert not wrong, f"reads {wrong} of {len(observed)} are not whole values"
    assert app.stderr.read_bytes() == b""  # not one failed open
    assert {0, 1, 2, 3, len(values) - 1} <= {whole[words[1]] for words in observed}


# --- the pitfall: a single-file bind mount pins a version ------------------------------------

PINNED = "/run/secrets/db.json"


def test_a_single_file_bind_pins_the_old_version_while_the_directory_follows(scene, tmp_path):
    """Both halves of examples/containers/README.md's claim, in one container: a bind
    of AWSCURRENT binds the version file it resolves to at mount time, and keeps
    showing that version after promotions; the directory's AWSCURRENT shows each."""
    version, value = scene.current()
    script = f"""grep " {PINNED} " /proc/self/mountinfo | cut -d" " -f4
        while :; do
            file=$(cat {PINNED} | sha256sum | cut -c1-16)
            directory=$(cat {SECRET_IN_CONTAINER}/AWSCURRENT | sha256sum | cut -c1-16)
            echo "file $file directory $directory"
            sleep 0.05
        done"""
    binds = {PINNED: scene.secret_dir / "AWSCURRENT", SECRET_IN_CONTAINER: scene.secret_dir}
    with running(container(scene.app, binds, script), tmp_path) as both:
        assert both.wait_for_last(f"file {fingerprint(value)} directory {fingerprint(value)}")
        # The single-file bind is of the version file, not of the label.
        assert both.lines()[0] == f"/{SECRET}/versions/{version}"
        promoted = [new_value(), new_value()]
        for new in promoted:
            scene.daemon.call("put-secret-value", "--secret-id", SECRET,
                              "--secret-string", "-", input=new.encode())
            expected = f"file {fingerprint(value)} directory {fingerprint(new)}"
            assert both.wait_for_last(expected)
            assert set(both.next_lines()) == {expected}
    # The pinned version no longer carries any label: the host has moved on twice.
    assert os.readlink(scene.secret_dir / "AWSCURRENT") == f"versions/{scene.current()[0]}"
    assert os.readlink(scene.secret_dir / "AWSPREVIOUS") != f"versions/{version}"
    assert both.stderr.read_bytes() == b""


# --- who may read: the host uid, whatever the uid inside ------------------------------------

def test_a_uid_no_policy_allows_gets_eacces_even_as_root_in_its_container(scene):
    version, value = scene.current()
    result = run_once(scene.intruder, {SECRET_IN_CONTAINER: scene.secret_dir}, f"""
        id -u
        cd {SECRET_IN_CONTAINER} && readlink AWSCURRENT
        cat AWSCURRENT; echo "cat=$?"
        cat keys/AWSCURRENT/password; echo "key=$?"
        test -r AWSCURRENT; echo "test-r=$?"
        ls keys/AWSCURRENT/ >/dev/null; echo "ls=$?" """, inside_uid=0)
    assert result.returncode == 0, result.stderr
    # Root inside its user namespace, and the names resolve: the content is refused.
    assert result.stdout.decode().splitlines() == [
        "0", f"versions/{version}", "cat=1", "key=1", "test-r=1", "ls=2"]
    assert result.stderr.count(DENIED) == 3, result.stderr
    assert value.encode() not in result.stdout + result.stderr
    # The daemon refused the intruder's host uid.
    assert wait_for(lambda: any(
        record["eventName"] == "GetSecretValue" and record["resources"]["name"] == SECRET
        and record["userIdentity"]["uid"] == scene.intruder.pw_uid
        for record in scene.daemon.audit_records(
            "--uid", str(scene.intruder.pw_uid), "--denied-only")), 5)


# --- the legacy application and its rendered config file -----------------------------------

def rendered_config(value: str) -> bytes:
    """app.ini.j2 as secretfs renders it for the JSON value `value` of prod/db."""
    text = example("app.ini.j2")
    for key, field in json.loads(value).items():
        text = text.replace("{{ secret('" + SECRET + "')." + key + " }}", field)
    return text.encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def legacy_line(value: str) -> str:
    fields = json.loads(value)
    return f"connecting as {fields['username']}, password {fingerprint(fields['password'])}"


def test_the_legacy_app_reads_its_rendered_config_in_a_container_and_sees_a_rotation(
        scene, tmp_path):
    directory = TEMPLATE.rsplit("/", 1)[0]
    binds = {CONFIG_IN_CONTAINER: scene.daemon.path("~templates", directory)}
    config = f"{CONFIG_IN_CONTAINER}/{TEMPLATE.rsplit('/', 1)[1]}"
    _, value = scene.current()
    result = run_once(scene.app, binds, f"cat {config}")
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == sha256(rendered_config(value)), "app.ini differs"
    # The intruder's container gets EACCES for the rendering too.
    denied = run_once(scene.intruder, binds, f"cat {config}", inside_uid=0)
    assert denied.returncode == 1 and DENIED in denied.stderr and denied.stdout == b""

    command = container(scene.app, binds, example("legacy-app.sh"),
                        env={"CONFIG": config, "INTERVAL": "0.05"})
    with running(command, tmp_path) as legacy:
        assert legacy.wait_for_last(legacy_line(value))
        rotated = new_value()
        scene.daemon.call("put-secret-value", "--secret-id", SECRET, "--secret-string", "-",
                          input=rotated.encode())
        assert legacy.wait_for_last(legacy_line(rotated))
    assert set(legacy.lines()) == {legacy_line(value), legacy_line(rotated)}
    assert legacy.stderr.read_bytes() == b""


# --- the example files name what these tests bind --------------------------------------------

def binds_of(service: dict) -> dict[str, dict]:
    return {volume["target"]: volume for volume in service["volumes"]}


def test_the_compose_file_binds_what_the_tests_bind():
    compose = yaml.safe_load(example("compose.yaml"))
    app, legacy = compose["services"]["app"], compose["services"]["legacy"]
    for service, script in ((app, "app.sh"), (legacy, "legacy-app.sh")):
        assert service["user"] == f"{INSIDE_UID}:{INSIDE_UID}"
        assert service["command"] == ["sh", f"/app/{script}"]
        bound = binds_of(service)[f"/app/{script}"]
        assert bound["source"] == f"./{script}" and (EXAMPLES / script).is_file()
    db = binds_of(app)[SECRET_IN_CONTAINER]
    assert db == {"type": "bind", "source": f"/secrets/{SECRET}",
                  "target": SECRET_IN_CONTAINER, "read_only": True}  # no relabel option
    assert app["environment"] == {"SECRET_DIR": SECRET_IN_CONTAINER}
    directory, name = TEMPLATE.rsplit("/", 1)
    config = binds_of(legacy)[CONFIG_IN_CONTAINER]
    assert config == {"type": "bind", "source": f"/secrets/~templates/{directory}",
                      "target": CONFIG_IN_CONTAINER, "read_only": True}
    assert legacy["environment"] == {"CONFIG": f"{CONFIG_IN_CONTAINER}/{name}"}
    # The policy the tests put is the one the README tells the reader to put.
    policy = json.loads(example("read-db.json"))
    (statement,) = policy["Statement"]
    assert statement["Resource"] == [SECRET, TEMPLATE]
    assert "secretsmanager:GetSecretValue" in statement["Action"]


def pod_spec(deployment: dict) -> tuple[dict, dict, dict, dict]:
    """A Deployment's one container, and its volumes, mounts and environment by name."""
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    pod = spec["template"]["spec"]
    (main,) = pod["containers"]
    return (pod, {volume["name"]: volume for volume in pod["volumes"]},
            {mount["name"]: mount for mount in main["volumeMounts"]},
            {variable["name"]: variable["value"] for variable in main["env"]})


def test_the_kubernetes_manifests_bind_what_the_tests_bind():
    documents = {document["metadata"]["name"]: document
                 for document in yaml.safe_load_all(example("kubernetes.yaml"))}
    assert {document["kind"] for document in documents.values()} == {"Deployment"}
    for document in documents.values():
        pod, volumes, mounts, _ = pod_spec(document)
        assert pod["securityContext"]["runAsUser"] == INSIDE_UID
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert mounts["app"]["mountPath"] == "/app"
        assert volumes["app"]["configMap"]["name"] == "secretfs-example-app"

    _, volumes, mounts, env = pod_spec(documents["secretfs-app"])
    assert volumes["db"]["hostPath"] == {"path": f"/secrets/{SECRET}", "type": "Directory"}
    assert mounts["db"] == {"name": "db", "mountPath": SECRET_IN_CONTAINER, "readOnly": True}
    assert env == {"SECRET_DIR": SECRET_IN_CONTAINER}

    # The restartable one: a directory above the mountpoint, rslave, as the restart
    # test below builds it (<parent>/secrets is the mountpoint).
    _, volumes, mounts, env = pod_spec(documents["secretfs-app-restartable"])
    assert volumes["secretfs"]["hostPath"] == {"path": "/srv/secretfs", "type": "Directory"}
    mount = mounts["secretfs"]
    assert (mount["readOnly"], mount["mountPropagation"]) == (True, "HostToContainer")
    assert env == {"SECRET_DIR": f"{mount['mountPath']}/secrets/{SECRET}"}


# --- a restart of secretfs, seen from a pod -------------------------------------------------

@contextlib.contextmanager
def daemon_below_a_shared_directory() -> Iterator[tuple[Daemon, Path]]:
    """A daemon mounted at <parent>/secrets, <parent> being a shared mount: what
    /srv/secretfs is on a systemd host (where every mount is shared), made so here
    without touching the host's other mounts."""
    base = reachable_directory("secretfs-containers-restart-")
    parent = base / "srv-secretfs"
    (parent / "secrets").mkdir(parents=True)
    parent.chmod(0o755)
    daemon = Daemon(state_dir=base / "state", mountpoint=parent / "secrets")
    try:
        subprocess.run(["mount", "--bind", str(parent), str(parent)], check=True)
        subprocess.run(["mount", "--make-shared", str(parent)], check=True)
        daemon.cli("init", "--state-dir", str(daemon.state_dir))
        daemon.start()
        yield daemon, parent
    finally:
        daemon.stop()
        subprocess.run(["umount", "-l", str(parent)], capture_output=True)
        if not os.path.ismount(parent):
            shutil.rmtree(base, ignore_errors=True)


# A pod: a mount namespace that is a slave of the host's, with three hostPath volumes
# as kubelet makes them (None = rprivate, HostToContainer = rslave): the secret's
# directory, the mountpoint, and the directory above it. Then the application's uid.
POD = """pod=$1 && mount -t tmpfs pod "$pod" && mkdir "$pod/dir" "$pod/mnt" "$pod/above" &&
mount --bind "$2" "$pod/dir" && mount --make-rprivate "$pod/dir" &&
mount --bind "$3" "$pod/mnt" && mount --make-rslave "$pod/mnt" &&
mount --rbind "$4" "$pod/above" && mount --make-rslave "$pod/above" || exit 9
shift 4 && exec "$@"
"""
# The application: each 50 ms, each of the three views of AWSCURRENT, as a fingerprint
# or as the error of its read.
READER = """while :; do
    line=""
    for path in dir mnt/prod/db above/secrets/prod/db; do
        if out=$(cat "$1/$path/AWSCURRENT" 2>&1); then
            line="$line|ok $(printf %s "$out" | sha256sum | cut -c1-16)"
        else
            line="$line|${out##*: }"
        fi
    done
    echo "${line#|}"
    sleep 0.05
done
"""


def test_after_a_restart_only_a_directory_above_the_mount_with_rslave_sees_secretfs(
        scene, tmp_path):
    """What kubernetes.yaml's notes say: a restart of secretfs (SIGTERM, as systemd
    stops it, then a new mount) leaves a bind of the secret's directory, or of the
    mountpoint itself even with rslave, on the dead mount (ENOTCONN) for good, while a
    bind of the directory above the mountpoint with rslave (HostToContainer) sees the
    new mount."""
    with daemon_below_a_shared_directory() as (daemon, parent):
        pod = parent.parent / "pod"  # where the pod's volumes go (a tmpfs in its namespace)
        pod.mkdir()
        value = new_value()
        daemon.call("create-secret", "--name", SECRET, "--secret-string", "-",
                    input=value.encode())
        allow_app(daemon, scene.app)
        reader = ["setpriv", f"--reuid={scene.app.pw_uid}", f"--regid={scene.app.pw_gid}",
                  "--init-groups", "--", "sh", "-c", READER, "reader", str(pod)]
        node = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", POD, "node",
                str(pod), str(secret_dir(daemon)), str(daemon.mountpoint),
                str(parent), *reader]
        with running(node, tmp_path) as app:
            ok = f"ok {fingerprint(value)}"
            assert app.wait_for_last("|".join([ok] * 3)), (app.last(), app.stderr.read_text())

            pid = daemon.pid()
            os.kill(pid, signal.SIGTERM)
            assert wait_for(lambda: not Path(f"/proc/{pid}").exists())
            daemon.start()

            assert app.wait_for_last(f"{NOT_CONNECTED}|{NOT_CONNECTED}|{ok}")
            # Served by the new daemon: a promotion shows there, and only there.
            value = new_value()
            daemon.call("put-secret-value", "--secret-id", SECRET, "--secret-string", "-",
                        input=value.encode())
            assert app.wait_for_last(
                f"{NOT_CONNECTED}|{NOT_CONNECTED}|ok {fingerprint(value)}")


def test_umount_leaves_the_daemon_serving_the_containers_that_bind_it(scene, daemon, tmp_path):
    """`secretfs umount`, unlike SIGTERM, detaches only the host's mount: a container's
    bind keeps the FUSE mount alive and served; the daemon exits when it is gone."""
    value = new_value()
    daemon.call("create-secret", "--name", SECRET, "--secret-string", "-",
                input=value.encode())
    allow_app(daemon, scene.app)
    command = container(scene.app, {SECRET_IN_CONTAINER: secret_dir(daemon)},
                        example("app.sh"),
                        env={"SECRET_DIR": SECRET_IN_CONTAINER, "INTERVAL": "0.05"})
    pid = daemon.pid()
    with running(command, tmp_path) as app:
        assert app.wait_for_last(app_line(value))
        result = daemon.cli("umount", str(daemon.mountpoint), check=False)
        assert result.returncode == 1 and b"has not exited" in result.stderr, result.stderr
        assert b"other mount namespace" in result.stderr, result.stderr
        assert not os.path.ismount(daemon.mountpoint)
        assert set(app.next_lines()) == {app_line(value)}
        assert Path(f"/proc/{pid}").exists()
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists())
