"""Running under systemd and from fstab: the units in systemd/, the mount(8) helper,
the master key from a systemd credential, and --lock-memory.

systemd is not PID 1 in the test environment, so no unit is started here. What the
units promise is checked piece by piece: `systemd-analyze verify` on every unit, the
daemon under the service's capability bounding set, no_new_privs and a
write-xor-execute memory policy (PR_SET_MDWE, the kernel's form of
MemoryDenyWriteExecute=) reporting READY=1 on a NOTIFY_SOCKET and unmounting on
SIGTERM, and why the service has no mount namespace.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Daemon, _cli, force_unmount, reachable_directory, run_as

from secretfs.mount_helper import parse_options
from secretfs.options import MountOptions, OptionsError

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "systemd").glob("*.*"))
SERVICE = REPO / "systemd" / "secretfs.service"
HELPER = Path("/sbin/mount.fuse.secretfs")
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _root_with_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("these tests need root and /dev/fuse (run through the README's test command)")


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            name, _, value = line.partition("=")
            settings.setdefault(name.strip(), []).append(value.strip())
    return settings


def _daemon_pid(mountpoint: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", f"secretfs.daemon --mountpoint {mountpoint}"],
                             capture_output=True, text=True).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.05)
    raise AssertionError(f"no daemon serves {mountpoint}")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def _locked_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))


@pytest.fixture
def place(tmp_path):
    """An initialized state directory and an empty mountpoint every uid can reach."""
    _root_with_fuse()
    base = reachable_directory("secretfs-systemd-")
    running = Daemon(state_dir=base / "state", mountpoint=base / "secrets")
    running.mountpoint.mkdir()
    running.cli("init", "--state-dir", str(running.state_dir))
    try:
        yield running
    finally:
        force_unmount(running.mountpoint)
        shutil.rmtree(base, ignore_errors=True)


# --- the unit files --------------------------------------------------------------------

@pytest.mark.parametrize("unit", UNITS, ids=[unit.name for unit in UNITS])
def test_systemd_analyze_verify_passes(unit, tmp_path):
    """verify checks ExecStart's binary exists: the copy points at this venv's."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is needed (Debian package systemd)")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "secretfs").exists(), "install secretfs in the venv (pip install -e .)"
    rendered = tmp_path / unit.name
    rendered.write_text(unit.read_text().replace("/usr/local/bin/", f"{bin_dir}/"))
    result = subprocess.run(["systemd-analyze", "verify", str(rendered)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert unit.name not in result.stderr, result.stderr  # no warning about the unit
    if "#LoadCredentialEncrypted=" in rendered.read_text():  # and with the credential on
        rendered.write_text(rendered.read_text().replace("#LoadCredentialEncrypted=",
                                                         "LoadCredentialEncrypted="))
        result = subprocess.run(["systemd-analyze", "verify", str(rendered)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and unit.name not in result.stderr, result.stderr


def test_service_runs_the_daemon_supervised_and_hardened():
    settings = _unit_settings(SERVICE)
    one = {name: values[-1] for name, values in settings.items()}
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure"
    assert re.fullmatch(r"\S+/secretfs mount /secrets --foreground "
                        r"--state-dir /var/lib/secretfs( --\S+)*", one["ExecStart"])
    for name, value in {"NoNewPrivileges": "yes", "MemoryDenyWriteExecute": "yes",
                        "LockPersonality": "yes", "RestrictRealtime": "yes",
                        "RestrictNamespaces": "yes", "SystemCallArchitectures": "native",
                        "LimitCORE": "0", "UMask": "0077", "DevicePolicy": "closed"}.items():
        assert one.get(name) == value, name
    assert set(one["CapabilityBoundingSet"].split()) == {
        "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_IPC_LOCK"}
    assert set(one["RestrictAddressFamilies"].split()) <= {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # Each of these would give the daemon a mount namespace its mount can't leave.
    for name in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths",
                 "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                 "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
                 "PrivateMounts", "MountFlags"):
        assert name not in settings, name


def test_a_mount_made_in_a_systemd_style_namespace_never_reaches_the_host(tmp_path):
    """systemd builds a service's namespace (ProtectSystem= and friends) by making every
    mount a slave first; mounts made in there don't propagate back, even after `/` is
    made shared again (MountFlags=shared). A fresh namespace stands in for the host."""
    _root_with_fuse()
    target = tmp_path / "mnt"
    target.mkdir()
    script = f"""
        mount --make-rshared /
        for mode in shared slave; do
            unshare --mount --propagation $mode sh -c \\
                'mount --make-rshared / && mount -t tmpfs none {target}'
            if mountpoint -q {target}; then echo "$mode:host"; umount {target};
            else echo "$mode:hidden"; fi
        done
    """
    result = subprocess.run(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c",
                             script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shared:host", "slave:hidden"]


# --- the mount(8) helper ---------------------------------------------------------------

def test_helper_options_map_to_mount_flags_and_generic_ones_are_ignored():
    options, skipped = parse_options(
        "rw,defaults,nofail,_netdev,x-systemd.automount,x-systemd.requires=a.service,"
        "comment=x,noatime,nosuid,strict_names,lock-memory,listen=127.0.0.1:8443,"
        "tls_cert=/etc/c.pem,tls_key=/etc/k.pem")
    assert skipped == []
    assert options == MountOptions(strict_names=True, lock_memory=True,
                                   listen="127.0.0.1:8443", tls_certificate="/etc/c.pem",
                                   tls_key="/etc/k.pem")
    observed, _ = parse_options("metrics_listen=127.0.0.1:9464,metrics_allow_remote,"
                                "log_format=json")
    assert observed == MountOptions(metrics_listen="127.0.0.1:9464",
                                    metrics_allow_remote=True, log_format="json")
    assert parse_options("")[0] == MountOptions()
    for bad in ("bogus", "strict_names=1", "listen", "listen="):
        with pytest.raises(OptionsError):
            parse_options(bad)
    assert parse_options("bogus,debug", sloppy=True) == (MountOptions(debug=True), ["bogus"])


@pytest.fixture
def mount_helper():
    """/sbin/mount.fuse.secretfs, as README installs it: a link to the console script
    (or, in a checkout not reinstalled since, a script running the module)."""
    _root_with_fuse()
    saved = HELPER.with_name(HELPER.name + ".saved-by-test")
    if HELPER.exists() or HELPER.is_symlink():
        HELPER.rename(saved)
    script = Path(sys.executable).parent / "mount.fuse.secretfs"
    if script.exists():
        HELPER.symlink_to(script)
    else:
        HELPER.write_text(f'#!/bin/sh\nexec {sys.executable} -m secretfs.mount_helper "$@"\n')
        HELPER.chmod(0o755)
    try:
        yield HELPER
    finally:
        HELPER.unlink(missing_ok=True)
        if saved.exists() or saved.is_symlink():
            saved.rename(HELPER)


def test_mount_and_umount_through_fstab_style_mount(place, mount_helper, make_user):
    result = subprocess.run(
        ["mount", "-t", "fuse.secretfs", str(place.state_dir), str(place.mountpoint), "-o",
         "rw,nofail,_netdev,x-systemd.automount,strict_names,lock_memory"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    ours = [m for m in mounts if m[1] == str(place.mountpoint)]
    assert ours and ours[0][2] == "fuse.secretfs", ours
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(ours[0][3].split(","))
    pid = _daemon_pid(place.mountpoint)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--strict-names" in argv and b"--lock-memory" in argv
    assert _locked_kb(pid) > 0
    place.cli("create-secret", "--name", "prod/db", "--secret-string", "s3cret")
    # strict_names as behaviour: a name root just walked stays hidden from another uid.
    secret = place.path("prod/db", "AWSCURRENT")
    assert secret.read_text() == "s3cret"
    stat = run_as(make_user(), "stat", str(place.path("prod/db")))
    assert stat.returncode != 0 and b"No such file" in stat.stderr, stat.stderr
    result = subprocess.run(["umount", str(place.mountpoint)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(place.mountpoint)
    assert _gone(pid), "the daemon outlived umount"


def test_helper_refuses_an_unknown_option_and_mounts_nothing(place, mount_helper):
    result = subprocess.run(["mount", "-t", "fuse.secretfs", str(place.state_dir),
                             str(place.mountpoint), "-o", "strict_names,frobnicate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "unknown mount option 'frobnicate'" in result.stderr
    assert not os.path.ismount(place.mountpoint)


# --- the master key from a systemd credential ------------------------------------------

def _mount_with(place: Daemon, credentials: Path | None, *args: str):
    env = dict(os.environ, SECRETFS_STATE_DIR=str(place.state_dir))
    env.pop("CREDENTIALS_DIRECTORY", None)
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return subprocess.run(
        [sys.executable, "-m", "secretfs.cli", "mount", str(place.mountpoint),
         "--state-dir", str(place.state_dir), *args],
        capture_output=True, text=True, env=env, timeout=60)


def _assert_sealed(keys_file: Path, master_key: bytes) -> None:
    text = keys_file.read_text()
    doc = json.loads(text)
    assert doc["SealedBy"] == "credential:secretfs-master-key"
    assert all("KeyMaterial" not in key and key["SealedKeyMaterial"] for key in doc["Keys"])
    raw = base64.b64decode(master_key.strip())
    assert master_key.strip().decode() not in text
    assert raw not in keys_file.read_bytes()
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"


def test_master_key_from_a_credential_seals_keys_json(place, tmp_path):
    place.start()
    try:
        place.cli("create-secret", "--name", "old", "--secret-string", "before")
    finally:
        place.stop()
    master_key = place.cli("export-master-key").stdout
    assert len(base64.b64decode(master_key.strip(), validate=True)) == 32
    keys_file = place.state_dir / "keys.json"
    assert "KeyMaterial" in keys_file.read_text()  # exporting changed nothing
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "secretfs-master-key").write_bytes(master_key)

    result = _mount_with(place, credentials)
    assert result.returncode == 0, result.stderr
    try:
        _assert_sealed(keys_file, master_key)
        assert place.path("old", "AWSCURRENT").read_text() == "before"
        place.cli("create-secret", "--name", "new", "--secret-string", "after")
        assert place.path("new", "AWSCURRENT").read_text() == "after"
    finally:
        place.stop()
    assert "already sealed" in place.cli("export-master-key", check=False).stderr.decode()

    # Without the credential, or with another key in it, the daemon refuses to start.
    result = _mount_with(place, None)
    assert result.returncode != 0 and "secretfs-master-key" in result.stderr, result.stderr
    (credentials / "secretfs-master-key").write_bytes(base64.b64encode(os.urandom(32)))
    result = _mount_with(place, credentials)
    assert result.returncode != 0 and "secretfs-master-key" in result.stderr, result.stderr
    assert not os.path.ismount(place.mountpoint)

    # The raw 32 bytes serve as well as their base64.
    (credentials / "secretfs-master-key").write_bytes(base64.b64decode(master_key.strip()))
    result = _mount_with(place, credentials)
    assert result.returncode == 0, result.stderr
    try:
        assert place.path("old", "AWSCURRENT").read_text() == "before"
        assert place.path("new", "AWSCURRENT").read_text() == "after"
    finally:
        place.stop()


def test_a_sealed_key_file_refuses_plaintext_entries_and_bad_credentials(tmp_path):
    from secretfs.crypto.local import LocalKeyProvider, read_credential

    path = tmp_path / "keys.json"
    provider = LocalKeyProvider.create(path, region="us-east-1", account_id="0" * 12,
                                       sealed=True)
    master = base64.b64decode(provider.master_key())
    assert LocalKeyProvider.load(path, region="us-east-1", account_id="0" * 12,
                                 credential=master).sealed
    doc = json.loads(path.read_text())
    doc["Keys"][0]["KeyMaterial"] = base64.b64encode(os.urandom(32)).decode()
    del doc["Keys"][0]["SealedKeyMaterial"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="holds no plaintext KeyMaterial"):
        LocalKeyProvider.load(path, region="us-east-1", account_id="0" * 12,
                              credential=master)
    credential = tmp_path / "secretfs-master-key"
    for content in (b"", b"not base64!", base64.b64encode(os.urandom(16))):
        credential.write_bytes(content)
        with pytest.raises(ValueError, match="32-byte master key"):
            read_credential(credential)


def test_init_can_keep_the_master_key_out_of_keys_json_from_the_start(tmp_path):
    _root_with_fuse()
    base = reachable_directory("secretfs-systemd-")
    place = Daemon(state_dir=base / "state", mountpoint=base / "secrets")
    place.mountpoint.mkdir()
    try:
        result = place.cli("init", "--state-dir", str(place.state_dir),
                           "--master-key-from-credential")
        master_key = result.stdout
        assert len(base64.b64decode(master_key.strip(), validate=True)) == 32
        assert json.loads(result.stderr)["StateDir"] == str(place.state_dir)
        _assert_sealed(place.state_dir / "keys.json", master_key)
        assert _mount_with(place, None).returncode != 0
        credentials = tmp_path / "credentials"
        credentials.mkdir(mode=0o700)
        (credentials / "secretfs-master-key").write_bytes(master_key)
        result = _mount_with(place, credentials)
        assert result.returncode == 0, result.stderr
        # A key made now is sealed too, and protects a secret across a restart.
        place.cli("create-key", "--alias", "alias/second")
        place.cli("create-secret", "--name", "k", "--secret-string", "v",
                  "--kms-key-id", "alias/second")
        _assert_sealed(place.state_dir / "keys.json", master_key)
        assert len(json.loads((place.state_dir / "keys.json").read_text())["Keys"]) == 2
        place.stop()
        assert _mount_with(place, credentials).returncode == 0
        assert place.path("k", "AWSCURRENT").read_text() == "v"
    finally:
        place.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- --lock-memory ---------------------------------------------------------------------

def test_lock_memory_locks_the_daemons_pages(place):
    place.extra_args = ["--lock-memory"]
    place.start()
    try:
        assert _locked_kb(place.pid()) > 0
    finally:
        place.stop()
    # The same from config.json, without the flag.
    config = json.loads((place.state_dir / "config.json").read_text())
    (place.state_dir / "config.json").write_text(json.dumps({**config, "LockMemory": True}))
    place.extra_args = []
    place.start()
    try:
        assert _locked_kb(place.pid()) > 0
    finally:
        place.stop()


def test_lock_memory_refused_is_a_warning_and_the_daemon_serves(place):
    """Without CAP_IPC_LOCK and with a tiny RLIMIT_MEMLOCK, mlockall fails (ENOMEM)."""
    result = subprocess.run(
        ["prlimit", "--memlock=65536:65536", "setpriv", "--bounding-set=-ipc_lock",
         "--inh-caps=-all", "--", sys.executable, "-m", "secretfs.cli", "mount",
         str(place.mountpoint), "--state-dir", str(place.state_dir), "--lock-memory"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    try:
        place.cli("create-secret", "--name", "a", "--secret-string", "x")
        assert place.path("a", "AWSCURRENT").read_text() == "x"
        assert _locked_kb(place.pid()) == 0
        log = (place.state_dir / "daemon.log").read_text()
        assert "--lock-memory: mlockall failed" in log
    finally:
        place.stop()


# --- the daemon as secretfs.service runs it -------------------------------------------

def _service_bounding_set() -> str:
    caps = _unit_settings(SERVICE)["CapabilityBoundingSet"][-1].split()
    return "-all," + ",".join("+" + cap.removeprefix("CAP_").lower() for cap in caps)


_UNDER_MDWE = f"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, ctypes.get_errno()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit("PR_SET_MDWE did not refuse a writable, executable mapping")
from secretfs.daemon import main
sys.exit(main(sys.argv[1:]))
"""


def test_daemon_under_the_services_limits_notifies_serves_and_stops(place, make_user,
                                                                     tmp_path):
    """The service's capability bounding set and no_new_privs (setpriv), write-xor-
    execute memory (PR_SET_MDWE), --lock-memory, Type=notify, and SIGTERM."""
    user = make_user()
    place.start()
    try:
        _secret_for_cat(place, tmp_path)
    finally:
        place.stop()
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
    daemon = subprocess.Popen(
        ["setpriv", "--no-new-privs", f"--bounding-set={_service_bounding_set()}",
         "--inh-caps=-all", "--", sys.executable, "-c", _UNDER_MDWE,
         "--mountpoint", str(place.mountpoint), "--state-dir", str(place.state_dir),
         "--lock-memory"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            daemon.kill()
            pytest.fail(f"no READY=1: {daemon.communicate()[1].decode()[-2000:]}")
        assert message == b"READY=1"
        assert os.path.ismount(place.mountpoint)
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        assert int(re.search(r"^VmLck:\s+(\d+)", status, re.M).group(1)) > 0
        # Reading another uid's /proc/<pid>/exe needs CAP_SYS_PTRACE: the policy on the
        # executable lets this user's cat read, while its ls (no policy) may not.
        read = run_as(user, "cat", str(place.path("app/db", "AWSCURRENT")))
        assert read.returncode == 0 and read.stdout == b"pw", read.stderr
        head = run_as(user, "head", "-c1", str(place.path("app/db", "AWSCURRENT")))
        assert head.returncode != 0
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read().decode()[-2000:]
        assert not os.path.ismount(place.mountpoint)
    finally:
        notify.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()


def test_without_cap_sys_ptrace_a_policy_on_the_executable_can_not_match(place, make_user,
                                                                         tmp_path):
    """Why CAP_SYS_PTRACE is in the bounding set."""
    user = make_user()
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all,+sys_admin", "--inh-caps=-all", "--",
         *_cli_argv(), "mount", str(place.mountpoint), "--state-dir", str(place.state_dir)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    try:
        _secret_for_cat(place, tmp_path)
        read = run_as(user, "cat", str(place.path("app/db", "AWSCURRENT")))
        assert read.returncode != 0 and b"Permission denied" in read.stderr, read
    finally:
        place.stop()


def _secret_for_cat(place: Daemon, tmp_path: Path) -> None:
    """app/db, readable by any uid running cat (a policy on the executable)."""
    place.cli("create-secret", "--name", "app/db", "--secret-string", "pw")
    policy = tmp_path / "cat.json"
    policy.write_text(json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "app/*"}]}))
    place.cli("put-identity-policy", "--principal", f"exe:{os.path.realpath('/bin/cat')}",
              "--policy-name", "cat", "--policy-document", f"file://{policy}")


def _cli_argv() -> list[str]:
    return [sys.executable, "-m", "secretfs.cli"]


def test_export_master_key_needs_a_state_directory(tmp_path):
    result = _cli(tmp_path / "none", "export-master-key", check=False)
    assert result.returncode == 1 and b"secretfs init" in result.stderr
