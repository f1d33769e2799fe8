"""Tier 1: the pure path <-> node mapping (secretfs/fs/layout.py) over a real service."""

from __future__ import annotations

import json
import secrets
import sqlite3
from contextlib import closing

import pytest

from secretfs import model
from secretfs.fs.layout import (
    BY_VERSION,
    BY_VERSION_NAME,
    DIR,
    DIR_MODE,
    FILE_MODE,
    KEY,
    KEYLINK,
    KEYS,
    LABEL,
    LINK_MODE,
    ROOT,
    VERSION,
    VERSION_KEYS,
    VERSIONS,
    Layout,
    NotFound,
    key_values,
)
from secretfs.model import DecryptionFailure

pytest_plugins = ["_service_fixtures"]


@pytest.fixture
def layout(svc) -> Layout:
    return Layout(svc)


@pytest.fixture
def changes(svc) -> list:
    """Every (old, new) pair the catalog publishes after a commit."""
    heard: list = []
    svc.catalog.subscribe(lambda old, new: heard.append((old, new)))
    return heard


def resolve(layout: Layout, path: str):
    """Walk a path as the kernel does, following label symlinks (relative to their dir)."""
    node, parents = ROOT, []
    parts = [part for part in path.split("/") if part]
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            node = parents.pop()
            continue
        child = layout.lookup(node, name)
        if child[0] in (LABEL, KEYLINK):
            target = layout.readlink(child)
            assert not target.startswith("/") and ".." not in target.split("/")
            parts = [part for part in target.split("/") if part] + parts
            hops += 1
            assert hops < 10
            continue
        parents.append(node)
        node = child
    return node


def read(layout: Layout, path: str) -> bytes:
    return layout.content(resolve(layout, path))


def names(layout: Layout, node) -> list[str]:
    return [name for name, _ in layout.children(node)]


def sid(svc, name: str) -> int:
    return svc.catalog.id_by_name(name)


# --- directories ------------------------------------------------------------------------


def test_root_and_prefix_directories(layout, call):
    for name in ("prod/db", "prod/api/key", "misc"):
        call("CreateSecret", Name=name, SecretString="v")
    assert layout.children(ROOT) == [("misc", (DIR, "misc")), ("prod", (DIR, "prod"))]
    assert layout.lookup(ROOT, "prod") == (DIR, "prod")
    assert layout.lookup((DIR, "prod"), "api") == (DIR, "prod/api")
    assert names(layout, (DIR, "prod")) == ["api", "db"]
    assert names(layout, (DIR, "prod/api")) == ["key"]
    for node in (ROOT, (DIR, "prod"), (DIR, "prod/api")):
        attributes = layout.attributes(node)
        assert (attributes.mode, attributes.size, attributes.mtime, attributes.immutable) == (
            DIR_MODE, 0, None, False)
    for parent, name in ((ROOT, "nope"), ((DIR, "prod"), "versions"), ((DIR, "prod"), "keys"),
                         ((DIR, "prod"), "AWSCURRENT"), (ROOT, ""), ((DIR, "prod"), "DB")):
        with pytest.raises(NotFound):
            layout.lookup(parent, name)
    with pytest.raises(NotFound):
        layout.attributes((DIR, "nope"))
    assert not layout.exists((DIR, "prod/nope")) and layout.exists((DIR, "prod/db"))


def test_secret_directory(layout, call, svc):
    v1 = call("CreateSecret", Name="prod/db", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="prod/db", SecretString="two")["VersionId"]
    call("UpdateSecretVersionStage", SecretId="prod/db", VersionStage="blue", MoveToVersionId=v1)
    call("CreateSecret", Name="prod/db/replica", SecretString="r")
    secret = svc.catalog.get(sid(svc, "prod/db"))
    node = layout.lookup((DIR, "prod"), "db")
    assert node == (DIR, "prod/db")
    assert layout.children(node) == [
        ("AWSCURRENT", (LABEL, secret.secret_id, "AWSCURRENT")),
        ("AWSPREVIOUS", (LABEL, secret.secret_id, "AWSPREVIOUS")),
        ("blue", (LABEL, secret.secret_id, "blue")),
        ("keys", (KEYS, secret.secret_id)),
        ("versions", (VERSIONS, secret.secret_id)),
        ("replica", (DIR, "prod/db/replica")),
    ]
    assert layout.attributes(node).mtime == secret.changed
    assert layout.attributes(node).mode == DIR_MODE
    current = layout.lookup(node, "AWSCURRENT")
    assert current == (LABEL, secret.secret_id, "AWSCURRENT")
    assert layout.readlink(current) == f"versions/{v2}"
    assert layout.readlink(layout.lookup(node, "blue")) == f"versions/{v1}"
    assert layout.readlink(layout.lookup(node, "AWSPREVIOUS")) == f"versions/{v1}"
    link = layout.attributes(current)
    assert (link.mode, link.size) == (LINK_MODE, len(f"versions/{v2}"))
    assert read(layout, "prod/db/AWSCURRENT") == b"two"
    assert read(layout, "prod/db/blue") == b"one"
    assert read(layout, "prod/db/replica/AWSCURRENT") == b"r"
    with pytest.raises(NotFound):
        layout.lookup(node, "AWSPENDING")


def test_version_files_have_exact_sizes(layout, call, svc):
    values = {
        "ascii": ("SecretString", "x" * 41),
        "utf8": ("SecretString", "\u00e9t\u00e9 \u2603 \U0001f511"),
        "binary": ("SecretBinary", secrets.token_bytes(333) + b"\x00"),
        "big": ("SecretString", "y" * 65536),
    }
    for name, (member, value) in values.items():
        call("CreateSecret", Name=name, **{member: value})
    for name, (_, value) in values.items():
        expected = value if isinstance(value, bytes) else value.encode()
        secret = svc.catalog.get(sid(svc, name))
        (version_id,) = secret.versions
        node = resolve(layout, f"{name}/AWSCURRENT")
        assert node == (VERSION, secret.secret_id, version_id)
        assert node == resolve(layout, f"{name}/versions/{version_id}")
        attributes = layout.attributes(node)
        assert attributes.size == len(expected), name
        assert attributes.mode == FILE_MODE
        assert attributes.immutable is True
        assert attributes.mtime == secret.versions[version_id].created
        assert layout.content(node) == expected


def test_versions_directory_lists_every_version(layout, call, svc):
    ids = [call("CreateSecret", Name="s", SecretString="0")["VersionId"]]
    for i in range(1, 4):
        ids.append(call("PutSecretValue", SecretId="s", SecretString=str(i))["VersionId"])
    versions = layout.lookup((DIR, "s"), "versions")
    assert names(layout, versions) == ids  # oldest first, deprecated ones included
    assert layout.content(layout.lookup(versions, ids[0])) == b"0"
    with pytest.raises(NotFound):
        layout.lookup(versions, "f" * 36)
    with pytest.raises(NotFound):
        layout.lookup(versions, "AWSCURRENT")


def test_a_secret_without_value_has_empty_directories(layout, call):
    call("CreateSecret", Name="empty")
    assert names(layout, (DIR, "empty")) == ["keys", "versions"]
    assert names(layout, layout.lookup((DIR, "empty"), "versions")) == []
    assert names(layout, layout.lookup((DIR, "empty"), "keys")) == []


# --- JSON keys ----------------------------------------------------------------------------


DOCUMENT = {
    "user": "admin", "port": 5432, "nested": {"a": [1, 2], "b": "\u00e9"}, "flag": True,
    "none": None, "pi": 1.5, "s/lash": "x", ".dot": "y", "": "no file", "uni": "\u00e9",
    "50%": "pct", "list": ["a", 1],
}


def test_json_keys(layout, call, svc):
    v1 = call("CreateSecret", Name="app", SecretString=json.dumps(DOCUMENT))["VersionId"]
    secret = svc.catalog.get(sid(svc, "app"))
    keys = layout.lookup((DIR, "app"), "keys")
    assert keys == (KEYS, secret.secret_id)
    assert layout.children(keys) == [("AWSCURRENT", (KEYLINK, secret.secret_id, "AWSCURRENT"))]
    link = layout.lookup(keys, "AWSCURRENT")
    assert layout.readlink(link) == f"{BY_VERSION_NAME}/{v1}"
    assert layout.attributes(link).mode == LINK_MODE
    by_version = layout.lookup(keys, BY_VERSION_NAME)
    assert by_version == (BY_VERSION, secret.secret_id)
    assert names(layout, by_version) == [v1]
    version_keys = layout.lookup(by_version, v1)
    assert version_keys == (VERSION_KEYS, secret.secret_id, v1)
    assert layout.attributes(version_keys).mode == DIR_MODE
    expected = {
        "user": b"admin", "port": b"5432", "nested": b'{"a":[1,2],"b":"\\u00e9"}',
        "flag": b"true", "none": b"null", "pi": b"1.5", "s%2Flash": b"x", "%2Edot": b"y",
        "uni": "\u00e9".encode(), "50%25": b"pct", "list": b'["a",1]',
    }
    assert names(layout, version_keys) == sorted(expected)
    for name, data in expected.items():
        node = resolve(layout, f"app/keys/AWSCURRENT/{name}")
        assert node == (KEY, secret.secret_id, v1, name)
        assert layout.content(node) == data, name
        attributes = layout.attributes(node)
        assert (attributes.mode, attributes.size, attributes.immutable) == (
            FILE_MODE, len(data), True)
    for missing in ("nope", "s/lash", ".dot", ""):
        with pytest.raises(NotFound):
            layout.lookup(version_keys, missing)
    assert key_values(json.dumps(DOCUMENT).encode()) == expected


@pytest.mark.parametrize("value", [
    {"SecretString": "plain text"}, {"SecretString": "[1, 2]"}, {"SecretString": "42"},
    {"SecretString": '"a string"'}, {"SecretString": "{broken"},
    {"SecretBinary": b"\xff\xfe{\x00"}, {"SecretString": "{}"},
])
def test_values_without_json_object_have_no_keys(layout, call, value):
    version_id = call("CreateSecret", Name="s", **value)["VersionId"]
    assert names(layout, resolve(layout, "s/keys/AWSCURRENT")) == []
    assert names(layout, resolve(layout, f"s/keys/{BY_VERSION_NAME}/{version_id}")) == []


def test_keys_follow_the_label(layout, call):
    call("CreateSecret", Name="app", SecretString='{"password": "one"}')
    assert read(layout, "app/keys/AWSCURRENT/password") == b"one"
    call("PutSecretValue", SecretId="app", SecretString='{"password": "two", "extra": "x"}')
    assert read(layout, "app/keys/AWSCURRENT/password") == b"two"
    assert read(layout, "app/keys/AWSPREVIOUS/password") == b"one"
    with pytest.raises(NotFound):
        resolve(layout, "app/keys/AWSPREVIOUS/extra")


# --- file names that need encoding --------------------------------------------------------


def test_labels_and_version_ids_are_percent_encoded(layout, call, svc):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    dotted = ".dot-token-" + "d" * 30
    percent = "50%-token-" + "p" * 30
    call("PutSecretValue", SecretId="s", SecretString="two", ClientRequestToken=dotted,
         VersionStages=["release/1", ".hidden"])
    call("PutSecretValue", SecretId="s", SecretString="three", ClientRequestToken=percent,
         VersionStages=["50%", "..", "."])
    secret = svc.catalog.get(sid(svc, "s"))
    assert names(layout, (DIR, "s")) == [
        "%2E", "%2E.", "%2Ehidden", "50%25", "AWSCURRENT", "release%2F1", "keys", "versions"]
    assert names(layout, (KEYS, secret.secret_id)) == [
        "%2E", "%2E.", "%2Ehidden", "50%25", "AWSCURRENT", "release%2F1"]
    encoded_dotted, encoded_percent = "%2Edot-token-" + "d" * 30, "50%25-token-" + "p" * 30
    assert names(layout, (VERSIONS, secret.secret_id)) == [v1, encoded_dotted, encoded_percent]
    assert layout.lookup((DIR, "s"), "release%2F1") == (LABEL, secret.secret_id, "release/1")
    assert layout.lookup((DIR, "s"), "%2Ehidden") == (LABEL, secret.secret_id, ".hidden")
    assert layout.lookup((DIR, "s"), "%2E.") == (LABEL, secret.secret_id, "..")
    assert layout.readlink((LABEL, secret.secret_id, "release/1")) == f"versions/{encoded_dotted}"
    assert layout.readlink((KEYLINK, secret.secret_id, "50%")) == (
        f"{BY_VERSION_NAME}/{encoded_percent}")
    assert read(layout, "s/release%2F1") == b"two"
    assert read(layout, "s/%2Ehidden") == b"two"
    assert read(layout, "s/50%25") == b"three"
    assert read(layout, "s/%2E") == b"three"
    assert read(layout, f"s/versions/{encoded_dotted}") == b"two"
    for raw in (".hidden", "50%", "release", dotted, percent):
        with pytest.raises(NotFound):
            layout.lookup((DIR, "s"), raw)
    with pytest.raises(NotFound):
        layout.lookup((VERSIONS, secret.secret_id), dotted)


def test_a_label_named_like_another_labels_file_name(layout, call, svc):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two",
              VersionStages=[".x"])["VersionId"]
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="%2Ex", MoveToVersionId=v1)
    secret = svc.catalog.get(sid(svc, "s"))
    listed = dict(layout.children((DIR, "s")))
    assert listed["%2Ex"] == (LABEL, secret.secret_id, ".x")
    assert listed["%252Ex"] == (LABEL, secret.secret_id, "%2Ex")
    assert layout.readlink(layout.lookup((DIR, "s"), "%252Ex")) == f"versions/{v1}"
    assert layout.lookup((DIR, "s"), "%2Ex") == (LABEL, secret.secret_id, ".x")
    assert layout.readlink(layout.lookup((DIR, "s"), "%2Ex")) == f"versions/{v2}"


# --- deletion -------------------------------------------------------------------------------


def test_a_secret_scheduled_for_deletion_vanishes(layout, call, svc):
    version_id = call("CreateSecret", Name="prod/db", SecretString="v")["VersionId"]
    call("CreateSecret", Name="prod/api", SecretString="w")
    secret_id = sid(svc, "prod/db")
    nodes = [(LABEL, secret_id, "AWSCURRENT"), (VERSIONS, secret_id), (KEYS, secret_id),
             (VERSION, secret_id, version_id), (BY_VERSION, secret_id),
             (VERSION_KEYS, secret_id, version_id)]
    assert all(layout.exists(node) for node in nodes)
    call("DeleteSecret", SecretId="prod/db", RecoveryWindowInDays=7)
    assert names(layout, (DIR, "prod")) == ["api"]
    with pytest.raises(NotFound):
        layout.lookup((DIR, "prod"), "db")
    with pytest.raises(NotFound):
        layout.attributes((DIR, "prod/db"))
    for node in nodes:
        assert not layout.exists(node), node
        with pytest.raises(NotFound):
            layout.children(node)
    with pytest.raises(NotFound):
        layout.content((VERSION, secret_id, version_id))
    with pytest.raises(NotFound):
        layout.readlink((LABEL, secret_id, "AWSCURRENT"))
    call("RestoreSecret", SecretId="prod/db")
    assert read(layout, "prod/db/AWSCURRENT") == b"v"


def test_a_deleted_parent_secret_leaves_a_plain_directory(layout, call):
    call("CreateSecret", Name="a", SecretString="parent")
    call("CreateSecret", Name="a/b", SecretString="child")
    call("DeleteSecret", SecretId="a", RecoveryWindowInDays=7)
    assert layout.children((DIR, "a")) == [("b", (DIR, "a/b"))]
    assert layout.attributes((DIR, "a")).mtime is None
    for name in ("versions", "keys", "AWSCURRENT"):
        with pytest.raises(NotFound):
            layout.lookup((DIR, "a"), name)
    assert read(layout, "a/b/AWSCURRENT") == b"child"


def test_tampered_value_propagates_decryption_failure(layout, call, env):
    call("CreateSecret", Name="s", SecretString='{"k": "v"}')
    with closing(sqlite3.connect(env.db_path, isolation_level=None)) as connection:
        (ciphertext,) = connection.execute("SELECT ciphertext FROM versions").fetchone()
        connection.execute("UPDATE versions SET ciphertext = ?",
                           (ciphertext[:12] + bytes(len(ciphertext) - 12),))
    node = resolve(layout, "s/AWSCURRENT")
    assert layout.attributes(node).size == len('{"k": "v"}')  # metadata needs no decryption
    with pytest.raises(DecryptionFailure):
        layout.content(node)
    with pytest.raises(DecryptionFailure):
        resolve(layout, "s/keys/AWSCURRENT/k")


# --- what a change makes stale ----------------------------------------------------------------


def stale(layout, changes) -> tuple[set, set]:
    """The stale entries and moved links of every change heard since the last call."""
    entries, moved = set(), set()
    for old, new in changes:
        found_entries, found_moved = layout.stale_entries(old, new)
        entries |= set(found_entries)
        moved |= set(found_moved)
    changes.clear()
    return entries, moved


def test_creation_and_unlabelled_changes_make_nothing_stale(layout, call, svc, changes):
    call("CreateSecret", Name="s", SecretString="v")
    assert changes and changes[0][0] is None
    assert stale(layout, changes) == (set(), set())
    call("TagResource", SecretId="s", Tags=[{"Key": "k", "Value": "v"}])
    call("UpdateSecret", SecretId="s", Description="d")
    call("GetSecretValue", SecretId="s")
    svc.flush_accesses()
    call("PutSecretValue", SecretId="s", SecretString="p", VersionStages=["AWSPENDING"])
    assert stale(layout, changes) == (set(), set())


def test_label_moves_are_reported_as_moved_links(layout, call, svc, changes):
    call("CreateSecret", Name="s", SecretString="one")
    secret_id = sid(svc, "s")
    changes.clear()
    call("PutSecretValue", SecretId="s", SecretString="two")
    assert stale(layout, changes) == (set(), {
        (LABEL, secret_id, "AWSCURRENT"), (KEYLINK, secret_id, "AWSCURRENT")})
    call("PutSecretValue", SecretId="s", SecretString="three")
    assert stale(layout, changes) == (set(), {
        (LABEL, secret_id, "AWSCURRENT"), (KEYLINK, secret_id, "AWSCURRENT"),
        (LABEL, secret_id, "AWSPREVIOUS"), (KEYLINK, secret_id, "AWSPREVIOUS")})


def test_label_removal_is_reported_as_stale_entries(layout, call, svc, changes):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    for label in ("blue", "a/b", ".x"):
        call("UpdateSecretVersionStage", SecretId="s", VersionStage=label, MoveToVersionId=v1)
    secret_id = sid(svc, "s")
    changes.clear()
    for label, name in (("blue", "blue"), ("a/b", "a%2Fb"), (".x", "%2Ex")):
        call("UpdateSecretVersionStage", SecretId="s", VersionStage=label,
             RemoveFromVersionId=v1)
        assert stale(layout, changes) == ({((DIR, "s"), name), ((KEYS, secret_id), name)},
                                          set()), label


def test_pruned_versions_are_reported_as_stale_entries(layout, call, svc, changes, env,
                                                       monkeypatch):
    monkeypatch.setattr(model, "VERSIONS_KEPT", 3)
    ids = [call("CreateSecret", Name="s", SecretString="0")["VersionId"]]
    for i in range(1, 4):
        ids.append(call("PutSecretValue", SecretId="s", SecretString=str(i))["VersionId"])
    secret_id = sid(svc, "s")
    changes.clear()
    env.clock.advance(hours=25)
    ids.append(call("PutSecretValue", SecretId="s", SecretString="new")["VersionId"])
    entries, moved = stale(layout, changes)
    # five versions, three kept: the two oldest unlabelled ones go
    assert entries == {((VERSIONS, secret_id), ids[0]), ((BY_VERSION, secret_id), ids[0]),
                       ((VERSIONS, secret_id), ids[1]), ((BY_VERSION, secret_id), ids[1])}
    assert (LABEL, secret_id, "AWSCURRENT") in moved
    assert names(layout, (VERSIONS, secret_id)) == ids[2:]


def deletion_entries(secret_id: int, path: str, version_ids: list[str],
                     labels: list[str]) -> set:
    entries = {((DIR, path), "versions"), ((DIR, path), "keys")}
    for label in labels:
        entries |= {((DIR, path), label), ((KEYS, secret_id), label)}
    for version_id in version_ids:
        entries |= {((VERSIONS, secret_id), version_id), ((BY_VERSION, secret_id), version_id)}
    return entries


@pytest.mark.parametrize("how", ["scheduled", "forced", "purged"])
def test_deletion_makes_the_directory_and_bare_prefixes_stale(layout, call, svc, env,
                                                              changes, how):
    call("CreateSecret", Name="x/other", SecretString="keep")
    v1 = call("CreateSecret", Name="x/y/z", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="x/y/z", SecretString="two")["VersionId"]
    secret_id = sid(svc, "x/y/z")
    if how == "purged":
        call("DeleteSecret", SecretId="x/y/z", RecoveryWindowInDays=7)
        changes.clear()
        env.clock.advance(days=7)
        assert svc.purge_expired() == 1
    elif how == "forced":
        changes.clear()
        call("DeleteSecret", SecretId="x/y/z", ForceDeleteWithoutRecovery=True)
    else:
        changes.clear()
        call("DeleteSecret", SecretId="x/y/z")
    entries, moved = stale(layout, changes)
    assert moved == set()
    expected = deletion_entries(secret_id, "x/y/z", [v1, v2], ["AWSCURRENT", "AWSPREVIOUS"])
    # 'x/y' held only the deleted secret, so it goes; 'x' still holds 'other'
    expected |= {((DIR, "x/y"), "z"), ((DIR, "x"), "y")}
    assert entries == expected
    assert names(layout, ROOT) == ["x"]
    assert names(layout, (DIR, "x")) == ["other"]


def test_deleting_the_last_secret_below_a_prefix_makes_the_prefix_stale(layout, call, svc,
                                                                        changes):
    v1 = call("CreateSecret", Name="solo/deep/s", SecretString="v")["VersionId"]
    secret_id = sid(svc, "solo/deep/s")
    changes.clear()
    call("DeleteSecret", SecretId="solo/deep/s", ForceDeleteWithoutRecovery=True)
    entries, _ = stale(layout, changes)
    assert entries == deletion_entries(secret_id, "solo/deep/s", [v1], ["AWSCURRENT"]) | {
        ((DIR, "solo/deep"), "s"), ((DIR, "solo"), "deep"), ((DIR, ""), "solo")}
    assert layout.children(ROOT) == []


def test_deleting_a_secret_with_children_keeps_its_directory(layout, call, svc, changes):
    v1 = call("CreateSecret", Name="a", SecretString="v")["VersionId"]
    call("CreateSecret", Name="a/b", SecretString="w")
    secret_id = sid(svc, "a")
    changes.clear()
    call("DeleteSecret", SecretId="a", RecoveryWindowInDays=7)
    entries, _ = stale(layout, changes)
    assert entries == deletion_entries(secret_id, "a", [v1], ["AWSCURRENT"])
    changes.clear()
    call("RestoreSecret", SecretId="a")
    assert stale(layout, changes) == (set(), set())
    assert read(layout, "a/AWSCURRENT") == b"v"
