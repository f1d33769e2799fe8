"""Hostile secret names, labels and paths, against a reference of AWS's name rules and
README's names-as-directories rules.

Hypothesis builds names out of unicode, NUL and control characters, `.` and `..`,
empty segments, very long segments, percent signs, and segments that collide with
what a secret's directory holds (`versions`, `keys`, the AWS labels, custom labels).
A valid name must create a secret reachable at exactly its path, and an invalid one
must get AWS's error and change nothing. In volume through the in-process service and
the filesystem's pure layout; then, fewer, through the control socket and a real mount,
which must never show a path outside its tree and must keep serving.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
from _reliability import AWSCURRENT, api_client, entry_name, path_of, read_file
from conftest import serving_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretfs import model
from secretfs.fs import layout as L
from secretfs.identity import SYSTEM

pytest_plugins = ["_service_fixtures"]
pytestmark = [pytest.mark.reliability]

# --- the reference: AWS's rules and README's, written out independently ----------------

NAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "/_+=.@-")
OWN_ENTRIES = frozenset({"versions", "keys", "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING"})


class World:
    """The secrets that exist (name -> labels), as the reference sees them."""

    def __init__(self, secrets: dict[str, set[str]]):
        self.secrets = {name: set(labels) for name, labels in secrets.items()}

    def paths(self) -> dict[str, str]:
        return {path_of(name): name for name in self.secrets}

    def create_error(self, name: str, *, api: bool) -> str | None:
        """The error code creating `name` must get, or None if it must succeed."""
        if not name:
            # botocore's model says min 1; the service itself asks for a name.
            return "ValidationException" if api else "InvalidParameterException"
        if len(name) > 512 or not set(name) <= NAME_CHARACTERS:
            return "ValidationException"
        segments = [segment for segment in name.split("/") if segment]
        if not segments or any(segment in (".", "..") for segment in segments):
            return "InvalidParameterException"
        paths = self.paths()
        path = "/".join(segments)
        if name in self.secrets or path in paths:
            return "ResourceExistsException"
        for depth in range(1, len(segments)):
            holder = paths.get("/".join(segments[:depth]))
            if holder is not None and (
                    segments[depth] in OWN_ENTRIES
                    or segments[depth] in {entry_name(label) for label in self.secrets[holder]}):
                return "InvalidParameterException"
        for other in paths:
            if other.startswith(path + "/") and other[len(path) + 1:].split("/")[0] in OWN_ENTRIES:
                return "InvalidParameterException"
        return None

    def label_error(self, name: str, label: str, *, api: bool) -> str | None:
        """The error attaching a new custom `label` to secret `name` must get."""
        if not 1 <= len(label) <= 256:
            return "ValidationException" if api else "InvalidParameterException"
        if not label.isprintable():
            return "InvalidParameterException"
        entry = entry_name(label)
        if entry in ("versions", "keys"):
            return "InvalidParameterException"
        below = path_of(name) + "/"
        if any(other.startswith(below) and other[len(below):].split("/")[0] == entry
               for other in self.paths()):
            return "InvalidParameterException"
        return None


# Every example starts from these: `app` has the custom label BLUE, `team` and `deep/a`
# are directories only, and `hold` can't be created while `hold/keys/z` exists.
BASE = {"app": {"AWSCURRENT", "AWSPREVIOUS", "BLUE"}, "team/db": {"AWSCURRENT"},
        "deep/a/b": {"AWSCURRENT"}, "hold/keys/z": {"AWSCURRENT"}}

_HOSTILE = ["é", "ß", "日", "本", "\u202e", "\0", "\n", "\r", " ", "*", "?", "\\", "%", ":", "\t",
            "😀", "ﬁ", "Ａ", "\u0301", "$", "#", "'", '"', "<", "~", "\x7f", "\u2028"]
segments = st.one_of(
    st.sampled_from(["app", "db", "team", "deep", "a", "b", "hold", "keys", "versions",
                     "AWSCURRENT", "AWSPREVIOUS", "AWSPENDING", "BLUE", "blue", ".", "..", "...",
                     ".hidden", "%2E", "a%2Fb", "-", "@", "+=", "_", "z", "%2F"]),
    st.text(alphabet=sorted(NAME_CHARACTERS - {"/"}), min_size=1, max_size=12),
    st.text(alphabet=st.sampled_from(_HOSTILE) | st.sampled_from("abc.-"), min_size=1,
            max_size=6),
    st.builds(lambda size, tail: "s" * size + tail, st.integers(100, 520),
              st.sampled_from(["", "é", ".", "\0"])),
)
names = st.one_of(
    st.builds(lambda lead, parts, trail: "/" * lead + "/".join(parts) + "/" * trail,
              st.integers(0, 2), st.lists(segments, min_size=1, max_size=4),
              st.integers(0, 2)),
    st.builds(lambda size: "n" * size, st.integers(505, 520)),  # the length limit
    # a valid name with whitespace or NUL after it: `^...$` takes "db\n" for valid
    st.builds(lambda name, tail: name + tail, st.sampled_from(["db", "app/x", "a/b/c"]),
              st.sampled_from(["\n", "\r\n", "\n\n", " ", "\t", "\0"])),
    st.just(""), st.just("/"), st.just("//"),
)
labels = st.one_of(
    st.sampled_from(["versions", "keys", "a", "d", "z", "b", "..", ".", "%", "/", "a/b",
                     ".versions", "%2E", "GREEN", "x" * 256, "x" * 257, "", " ", "é" * 256,
                     "\0", "\n", "tab\there", "%" * 256]),
    st.text(min_size=1, max_size=20).filter(lambda text: text not in BASE["app"]),
)
actions = st.lists(st.one_of(st.tuples(st.just("create"), names),
                             st.tuples(st.just("label"), labels)), min_size=1, max_size=4)


# --- the in-process service and the pure layout ------------------------------------------

# A fresh store per example: on tmpfs its fsyncs cost nothing.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _fresh_service(root: Path, clock):
    from _service_fixtures import make_service  # a plugin of this module: already rewritten

    store, service = make_service(root, clock)
    for name in BASE:
        service.call("CreateSecret", {"Name": name, "SecretString": f"base {name}"}, SYSTEM)
    answer = service.call("PutSecretValue", {"SecretId": "app", "SecretString": "app two"},
                          SYSTEM)
    service.call("PutSecretValue", {"SecretId": "app", "SecretString": "app three",
                                    "VersionStages": ["BLUE"]}, SYSTEM)
    assert answer["VersionStages"] == [AWSCURRENT]
    return store, service


def _code(call) -> str | None:
    try:
        call()
    except model.SecretsManagerError as error:
        return error.code
    return None


def _walk(layout: L.Layout, path: str) -> L.Node:
    node = L.ROOT
    for segment in path.split("/"):
        node = layout.lookup(node, segment)
    return node


def _assert_sane_tree(layout: L.Layout) -> None:
    """Every entry is one plain name, and every link stays inside its secret's directory."""
    pending = [L.ROOT]
    while pending:
        node = pending.pop()
        for name, child in layout.children(node):
            assert name and name not in (".", "..") and "/" not in name and "\0" not in name
            assert layout.lookup(node, name) == child
            if child[0] in (L.LABEL, L.KEYLINK):
                target = layout.readlink(child).split("/")
                assert len(target) == 2 and target[0] in ("versions", L.BY_VERSION_NAME)
                assert target[1] not in ("", ".", "..")
            elif child[0] != L.KEY and child[0] != L.VERSION:
                pending.append(child)


def _assert_reachable(layout: L.Layout, name: str, value: bytes) -> None:
    path = path_of(name)
    secret_dir = _walk(layout, path)
    assert secret_dir == (L.DIR, path)
    parent, _, last = path.rpartition("/")
    assert last in [entry for entry, _ in layout.children(_walk(layout, parent) if parent
                                                          else L.ROOT)]
    link = layout.lookup(secret_dir, AWSCURRENT)
    directory, version_id = layout.readlink(link).split("/")
    version = layout.lookup(layout.lookup(secret_dir, directory), version_id)
    assert layout.content(version) == value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions)
def test_hostile_names_and_labels_through_the_service_and_the_layout(steps):
    from _service_fixtures import Clock

    with tempfile.TemporaryDirectory(prefix="sfs-names-", dir=SCRATCH) as directory:
        store, service = _fresh_service(Path(directory), Clock())
        try:
            world = World(BASE)
            app_current = service.call("DescribeSecret", {"SecretId": "app"}, SYSTEM)
            current = next(vid for vid, stages in app_current["VersionIdsToStages"].items()
                           if AWSCURRENT in stages)
            layout = L.Layout(service)
            for number, (kind, text) in enumerate(steps):
                # Every secret's metadata and labels, and the secrets there are.
                listed = service.call("ListSecrets", {"IncludePlannedDeletion": True}, SYSTEM)
                if kind == "create":
                    value = f"sfs-name-{number}-{os.urandom(8).hex()}"
                    expected = world.create_error(text, api=False)
                    got = _code(lambda text=text, value=value: service.call(
                        "CreateSecret", {"Name": text, "SecretString": value}, SYSTEM))
                    assert got == expected, (ascii(text), got, expected)
                    if got is None:
                        world.secrets[text] = {AWSCURRENT}
                        _assert_reachable(layout, text, value.encode())
                else:
                    expected = world.label_error("app", text, api=False)
                    got = _code(lambda text=text: service.call(
                        "UpdateSecretVersionStage", {"SecretId": "app", "VersionStage": text,
                                                     "MoveToVersionId": current}, SYSTEM))
                    assert got == expected, (ascii(text), got, expected)
                    if got is None:
                        world.secrets["app"].add(text)
                        link = layout.lookup(_walk(layout, "app"), entry_name(text))
                        assert layout.readlink(link) == f"versions/{current}"
                if got is not None:  # refused: nothing changed
                    assert service.call("ListSecrets", {"IncludePlannedDeletion": True},
                                        SYSTEM) == listed
            _assert_sane_tree(layout)
            assert sorted(entry["Name"] for entry in service.call(
                "ListSecrets", {}, SYSTEM)["SecretList"]) == sorted(world.secrets)
        finally:
            store.close()


def test_a_name_ending_in_a_newline_is_refused(call):
    """Python's `$` matches before a final newline: `^[...]+$` took "db\\n" for a valid
    name, and the mount showed a directory named "db\\n"."""
    for name in ("db\n", "prod/db\n", "\n"):
        with pytest.raises(model.ValidationException):
            call("CreateSecret", Name=name, SecretString="x")
    assert call("ListSecrets")["SecretList"] == []


# --- the control socket and a real mount -------------------------------------------------

@pytest.fixture(scope="module")
def named(plaintext_watch):
    """A daemon holding BASE, shared by the examples; scanned for plaintext before its
    directory goes away."""
    with serving_daemon(prefix="secretfs-names-") as daemon:
        client = api_client(daemon)
        for name in BASE:
            client.call("CreateSecret", {"Name": name,
                                         "SecretString": plaintext_watch.token("name")})
        client.call("PutSecretValue", {"SecretId": "app",
                                       "SecretString": plaintext_watch.token("name")})
        client.call("PutSecretValue", {"SecretId": "app", "VersionStages": ["BLUE"],
                                       "SecretString": plaintext_watch.token("name")})
        pid = daemon.pid()
        yield daemon
        # Still the same daemon, serving.
        assert daemon.pid() == pid
        os.statvfs(daemon.mountpoint)
        assert stages_at(daemon, "app") == stages_before(client)
        assert plaintext_watch.findings(daemon.state_dir) == []


def stages_before(client) -> dict:
    return client.call("DescribeSecret", {"SecretId": "app"})["VersionIdsToStages"]


def stages_at(daemon, name: str) -> dict:
    """The label links in a secret's directory, as VersionIdsToStages."""
    found: dict[str, list[str]] = {}
    directory = daemon.path(*name.split("/"))
    for entry in sorted(os.listdir(directory)):
        if os.path.islink(directory / entry):
            found.setdefault(os.readlink(directory / entry).split("/")[1], []).append(entry)
    return found


def _state(client) -> tuple:
    listed = client.call("ListSecrets", {"IncludePlannedDeletion": True})["SecretList"]
    return sorted((entry["ARN"], json.dumps(entry.get("SecretVersionsToStages"),
                                            sort_keys=True)) for entry in listed)


def _probe(mountpoint: Path, name: str) -> None:
    """Looking a name up in the mount answers with an entry inside it or an error."""
    parts = [segment for segment in name.split("/") if segment not in ("", ".", "..")]
    if not parts or any("\0" in part for part in parts):
        return  # no such path can be asked for
    try:
        os.lstat(mountpoint.joinpath(*parts))
    except OSError as error:
        assert error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG), error


def _assert_sane_mount(mountpoint: Path) -> None:
    root = mountpoint.resolve()
    for directory, subdirectories, files in os.walk(mountpoint):
        for entry in subdirectories + files:
            path = Path(directory) / entry
            if path.is_symlink():
                target = os.readlink(path)
                assert not target.startswith("/") and ".." not in target.split("/"), target
                assert path.resolve().is_relative_to(root)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=actions)
def test_hostile_names_and_labels_through_the_api_and_the_mount(named, plaintext_watch, steps):
    daemon, client = named, api_client(named)
    world = World(BASE)
    current = next(vid for vid, stages in stages_before(client).items() if AWSCURRENT in stages)
    created, attached = [], []
    try:
        for kind, text in steps:
            before = _state(client)
            if kind == "create":
                value = plaintext_watch.token("name")
                expected = world.create_error(text, api=True)
                got = _code(lambda text=text, value=value: client.call(
                    "CreateSecret", {"Name": text, "SecretString": value}))
                assert got == expected, (ascii(text), got, expected)
                if got is None:
                    created.append(text)
                    world.secrets[text] = {AWSCURRENT}
                    path = daemon.path(*path_of(text).split("/"))
                    assert path.name in os.listdir(path.parent)
                    assert os.readlink(path / AWSCURRENT).startswith("versions/")
                    assert read_file(path / AWSCURRENT) == value.encode()
            else:
                expected = world.label_error("app", text, api=True)
                got = _code(lambda text=text: client.call(
                    "UpdateSecretVersionStage", {"SecretId": "app", "VersionStage": text,
                                                 "MoveToVersionId": current}))
                assert got == expected, (ascii(text), got, expected)
                if got is None and text not in attached:
                    attached.append(text)
                    world.secrets["app"].add(text)
                    link = daemon.path("app", entry_name(text))
                    assert os.readlink(link) == f"versions/{current}"
            if got is not None:
                assert _state(client) == before
            _probe(daemon.mountpoint, text)
        _assert_sane_mount(daemon.mountpoint)
    finally:  # back to BASE for the next example
        for name in reversed(created):
            client.call("DeleteSecret", {"SecretId": name, "ForceDeleteWithoutRecovery": True})
        for label in attached:
            client.call("UpdateSecretVersionStage", {"SecretId": "app", "VersionStage": label,
                                                     "RemoveFromVersionId": current})
    for name in created:
        with contextlib.suppress(ValueError):  # the directory is gone, or still a prefix
            assert not daemon.path(*path_of(name).split("/"), AWSCURRENT).exists()
