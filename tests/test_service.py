"""Tier 1: the Secrets Manager rules, driven through `service.call()` as the API drives them.

A real SqliteStore and LocalKeyProvider in tmp_path, a hand-moved clock, no mount.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from datetime import timedelta

import pytest

from secretfs import model
from secretfs.access_keys import wrapping_context
from secretfs.identity import SYSTEM
from secretfs.model import (
    AccessDeniedException,
    InvalidNextTokenException,
    InvalidParameterException,
    InvalidRequestException,
    LimitExceededException,
    ResourceExistsException,
    ResourceNotFoundException,
    SecretsManagerError,
    UnknownOperationException,
    ValidationException,
)
from secretfs.store.sqlite import Reader

pytest_plugins = ["_service_fixtures"]

def arn_name(svc, arn: str) -> str | None:
    """The secret name inside an ARN of the documented shape, else None."""
    match = re.match(rf"^arn:aws:secretsmanager:{svc.region}:{svc.account_id}:secret:"
                     r"(?P<name>.+)-[A-Za-z0-9]{6}$", arn)
    return match and match.group("name")


def distinctive(label: str) -> str:
    return f"{label}-{secrets.token_hex(16)}"
TOKEN_A = "a" * 32
TOKEN_B = "b" * 36


def token() -> str:
    return secrets.token_hex(16)


def stages(call, name: str) -> dict[str, list[str]]:
    return call("DescribeSecret", SecretId=name)["VersionIdsToStages"]


def value_of(call, name: str, **selector) -> str | bytes:
    got = call("GetSecretValue", SecretId=name, **selector)
    return got["SecretString"] if "SecretString" in got else got["SecretBinary"]


def names(call, **params) -> list[str]:
    return [entry["Name"] for entry in call("ListSecrets", **params)["SecretList"]]


def all_pages(call, action: str, key: str, **params) -> tuple[list[dict], int]:
    """Every entry over all pages, and the number of pages."""
    entries, pages, next_token = [], 0, None
    while True:
        page = call(action, **params, **({"NextToken": next_token} if next_token else {}))
        pages += 1
        entries += page[key]
        next_token = page.get("NextToken")
        if not next_token:
            return entries, pages
        assert pages < 1000, "pagination doesn't end"


# --- CreateSecret ---------------------------------------------------------------------


def test_create_string_value_round_trips_exactly(call):
    value = 'line1\nline2 \t{"k": "é"} \u2603 \x00 end'
    created = call("CreateSecret", Name="prod/db", SecretString=value)
    assert set(created) == {"ARN", "Name", "VersionId"}
    assert created["Name"] == "prod/db"
    got = call("GetSecretValue", SecretId="prod/db")
    assert got["SecretString"] == value
    assert "SecretBinary" not in got
    assert got["VersionId"] == created["VersionId"]
    assert got["VersionStages"] == ["AWSCURRENT"]
    assert got["ARN"] == created["ARN"]


def test_create_binary_value_round_trips_byte_for_byte(call):
    value = bytes(range(256)) * 4 + secrets.token_bytes(1000) + b"\x00\xff"
    created = call("CreateSecret", Name="bin", SecretBinary=value)
    got = call("GetSecretValue", SecretId="bin")
    assert got["SecretBinary"] == value
    assert type(got["SecretBinary"]) is bytes
    assert "SecretString" not in got
    assert got["VersionId"] == created["VersionId"]


def test_create_binary_accepts_base64_text(call):
    raw = secrets.token_bytes(48)
    call("CreateSecret", Name="b64", SecretBinary=base64.b64encode(raw).decode())
    assert value_of(call, "b64") == raw
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="b64bad", SecretBinary="not base64!")
    assert names(call) == ["b64"]


def test_create_without_value_has_no_version(call):
    created = call("CreateSecret", Name="empty", Description="later")
    assert "VersionId" not in created
    described = call("DescribeSecret", SecretId="empty")
    assert described["VersionIdsToStages"] == {}
    assert described["Description"] == "later"
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="empty")
    assert call("ListSecretVersionIds", SecretId="empty", IncludeDeprecated=True)["Versions"] == []


def test_create_duplicate_name_is_refused_and_changes_nothing(env, call):
    call("CreateSecret", Name="dup", SecretString="one")
    before = env.snapshot("dup")
    env.clock.advance(seconds=5)
    with pytest.raises(ResourceExistsException):
        call("CreateSecret", Name="dup", SecretString="two")
    with pytest.raises(ResourceExistsException):
        call("CreateSecret", Name="dup")
    assert env.snapshot("dup") == before


def test_create_retry_with_same_token_and_value_is_idempotent(env, call):
    first = call("CreateSecret", Name="idem", SecretString="v", ClientRequestToken=TOKEN_A)
    assert first["VersionId"] == TOKEN_A
    again = call("CreateSecret", Name="idem", SecretString="v", ClientRequestToken=TOKEN_A)
    assert again == first
    versions = call("ListSecretVersionIds", SecretId="idem", IncludeDeprecated=True)["Versions"]
    assert [v["VersionId"] for v in versions] == [TOKEN_A]


def test_create_retry_with_same_token_and_other_value_fails(env, call):
    call("CreateSecret", Name="idem", SecretString="v", ClientRequestToken=TOKEN_A)
    before = env.snapshot("idem")
    for other in ({"SecretString": "w"}, {"SecretBinary": b"v"}):
        with pytest.raises(ResourceExistsException):
            call("CreateSecret", Name="idem", ClientRequestToken=TOKEN_A, **other)
    with pytest.raises(ResourceExistsException):
        call("CreateSecret", Name="idem", SecretString="v", ClientRequestToken=TOKEN_B)
    assert env.snapshot("idem") == before
    assert value_of(call, "idem") == "v"


@pytest.mark.parametrize(("name", "error"), [
    *((name, ValidationException)  # AWS's answer to a malformed name
      for name in ("a b", "a#b", "caf\u00e9", "a!b", "a:b", "a%b", "a*b", "x" * 513)),
    *((name, InvalidParameterException)  # names that can't be directories
      for name in ("", ".", "..", "a/./b", "a/../b", "../a", "a/..", "/", "///")),
])
def test_invalid_names_are_refused_and_nothing_is_created(call, name, error):
    with pytest.raises(error):
        call("CreateSecret", Name=name, SecretString="v")
    assert names(call, IncludePlannedDeletion=True) == []


@pytest.mark.parametrize("name", [
    "x" * 512, "a/.../b", "a_b+c=d.e@f-g", "prod/db-AbCdEf", ".hidden", "/lead", "trail/",
    "/".join(["s"] * 200),
])
def test_valid_names_are_accepted(call, svc, name):
    created = call("CreateSecret", Name=name, SecretString="v")
    assert created["Name"] == name
    assert arn_name(svc, created["ARN"]) == name
    assert value_of(call, name) == "v"


def test_hierarchical_names_coexist(call):
    for name in ("prod/db/replica", "prod/db", "prod", "prod/api/key"):
        call("CreateSecret", Name=name, SecretString=name)
    for name in ("prod/db/replica", "prod/db", "prod", "prod/api/key"):
        assert value_of(call, name) == name
    assert names(call, SortBy="name") == ["prod", "prod/api/key", "prod/db", "prod/db/replica"]


@pytest.mark.parametrize(("first", "second"), [
    ("a/b", "/a/b"), ("/a/b", "a/b"), ("a/b", "a//b"), ("a/b", "a/b/"), ("a", "/a"),
])
def test_two_names_for_one_directory_are_refused(env, call, first, second):
    call("CreateSecret", Name=first, SecretString="first")
    before = env.snapshot(first)
    with pytest.raises(ResourceExistsException):
        call("CreateSecret", Name=second, SecretString="second")
    assert env.snapshot(first) == before
    with pytest.raises(ResourceNotFoundException):
        call("DescribeSecret", SecretId=second)


@pytest.mark.parametrize("child", ["versions", "keys", "AWSCURRENT", "AWSPREVIOUS",
                                   "AWSPENDING", "blue"])
def test_child_may_not_take_a_name_the_parent_directory_uses(env, call, child):
    created = call("CreateSecret", Name="app", SecretString="v")
    call("UpdateSecretVersionStage", SecretId="app", VersionStage="blue",
         MoveToVersionId=created["VersionId"])
    before = env.snapshot("app")
    for name in (f"app/{child}", f"app/{child}/deeper", f"/app/{child}"):
        with pytest.raises(InvalidParameterException):
            call("CreateSecret", Name=name, SecretString="child")
    assert env.snapshot("app") == before
    call("CreateSecret", Name="app/green", SecretString="ok")  # an unused segment is fine


@pytest.mark.parametrize("child", ["versions", "keys/deep", "AWSCURRENT", "AWSPENDING"])
def test_parent_may_not_claim_a_directory_whose_children_use_its_names(env, call, child):
    call("CreateSecret", Name=f"svc/{child}", SecretString="child")
    before = env.snapshot(f"svc/{child}")
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="svc", SecretString="parent")
    assert env.snapshot(f"svc/{child}") == before


def test_parent_check_counts_a_child_scheduled_for_deletion(call):
    # The child can still be restored, so its directory name stays taken.
    call("CreateSecret", Name="q/versions", SecretString="v")
    call("DeleteSecret", SecretId="q/versions", RecoveryWindowInDays=7)
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="q", SecretString="parent")
    call("DeleteSecret", SecretId="q/versions", ForceDeleteWithoutRecovery=True)
    call("CreateSecret", Name="q", SecretString="parent")


def test_grandchild_below_a_nested_secret_is_checked(call):
    call("CreateSecret", Name="p/x", SecretString="v")
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="p/x/versions/y", SecretString="v")
    call("CreateSecret", Name="p/versions", SecretString="v")  # 'p' is no secret: fine


def test_tags_are_kept_in_order(call):
    tags = [{"Key": "team", "Value": "db"}, {"Key": "env", "Value": "prod"},
            {"Key": "empty", "Value": ""}, {"Key": "k" * 128, "Value": "v" * 256}]
    call("CreateSecret", Name="t", SecretString="v", Tags=tags)
    assert call("DescribeSecret", SecretId="t")["Tags"] == tags
    call("CreateSecret", Name="t2", SecretString="v", Tags=[{"Key": "novalue"}])
    assert call("DescribeSecret", SecretId="t2")["Tags"] == [{"Key": "novalue", "Value": ""}]
    call("CreateSecret", Name="t3", SecretString="v",
         Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(50)])
    assert len(call("DescribeSecret", SecretId="t3")["Tags"]) == 50


@pytest.mark.parametrize("tags", [
    [{"Key": "aws:owner", "Value": "x"}],
    [{"Key": "AWS:owner", "Value": "x"}],
    [{"Key": "a", "Value": "1"}, {"Key": "a", "Value": "2"}],
    [{"Key": f"k{i}", "Value": "v"} for i in range(51)],
    [{"Key": "k" * 129, "Value": "v"}],
    [{"Key": "k", "Value": "v" * 257}],
    [{"Key": "", "Value": "v"}],
    [{"Key": "a#b", "Value": "v"}],
    [{"Key": "k", "Value": "a#b"}],
    [{"Value": "v"}],
    [{"Key": "k", "Value": 5}],
    "not a list",
])
def test_bad_tags_are_refused_and_nothing_is_created(call, tags):
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="t", SecretString="v", Tags=tags)
    assert names(call, IncludePlannedDeletion=True) == []


def test_description_limit(call):
    call("CreateSecret", Name="d", Description="x" * 2048)
    assert call("DescribeSecret", SecretId="d")["Description"] == "x" * 2048
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="d2", Description="x" * 2049)
    assert names(call) == ["d"]


def test_value_size_limits(call):
    call("CreateSecret", Name="s", SecretString="x" * 65536)
    call("CreateSecret", Name="b", SecretBinary=b"\x01" * 65536)
    assert value_of(call, "s") == "x" * 65536
    assert value_of(call, "b") == b"\x01" * 65536
    for name, value in (("s2", {"SecretString": "x" * 65537}),
                        ("b2", {"SecretBinary": b"\x01" * 65537}),
                        ("s3", {"SecretString": ""}),
                        ("b3", {"SecretBinary": b""}),
                        ("both", {"SecretString": "x", "SecretBinary": b"x"})):
        with pytest.raises(InvalidParameterException):
            call("CreateSecret", Name=name, **value)
    assert sorted(names(call)) == ["b", "s"]


def test_kms_key_alias_from_create_key(call):
    key = call("CreateKey", Alias="alias/app", Description="app key")
    assert key["Aliases"] == ["alias/app"]
    call("CreateSecret", Name="k", SecretString="v", KmsKeyId="alias/app")
    call("CreateSecret", Name="k2", SecretString="v2", KmsKeyId=key["KeyId"])
    call("CreateSecret", Name="k3", SecretString="v3", KmsKeyId=key["Arn"])
    call("CreateSecret", Name="default", SecretString="d")
    assert call("DescribeSecret", SecretId="k")["KmsKeyId"] == "alias/app"
    assert "KmsKeyId" not in call("DescribeSecret", SecretId="default")
    for name in ("k", "k2", "k3"):
        versions = call("ListSecretVersionIds", SecretId=name)["Versions"]
        assert versions[0]["KmsKeyIds"] == [key["Arn"]]
    default_versions = call("ListSecretVersionIds", SecretId="default")["Versions"]
    assert default_versions[0]["KmsKeyIds"] != [key["Arn"]]
    assert [value_of(call, n) for n in ("k", "k2", "k3")] == ["v", "v2", "v3"]
    listed = call("ListKeys")["Keys"]
    assert key["KeyId"] in [entry["KeyId"] for entry in listed]


@pytest.mark.parametrize("key", [
    "alias/nope", "00000000-0000-4000-8000-000000000000",
    "arn:aws:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000000",
    "arn:aws:kms:eu-west-1:{account}:alias/aws/secretsmanager",
    "arn:aws:kms:{region}:999999999999:alias/aws/secretsmanager",
])
def test_unknown_kms_key_is_refused_and_nothing_is_created(call, svc, key):
    key = key.format(region=svc.region, account=svc.account_id)
    with pytest.raises(InvalidParameterException):
        call("CreateSecret", Name="k", SecretString="v", KmsKeyId=key)
    assert names(call, IncludePlannedDeletion=True) == []


def test_arn_format_and_every_form_of_secret_id(call, svc):
    created = call("CreateSecret", Name="prod/db", SecretString="v")
    arn = created["ARN"]
    assert arn_name(svc, arn) == "prod/db"
    partial = arn[:-7]
    assert partial == f"arn:aws:secretsmanager:{svc.region}:{svc.account_id}:secret:prod/db"
    for secret_id in ("prod/db", arn, partial):
        assert call("DescribeSecret", SecretId=secret_id)["ARN"] == arn
        assert value_of(call, secret_id) == "v"
    wrong_suffix = partial + ("-AAAAAA" if not arn.endswith("-AAAAAA") else "-BBBBBB")
    for bad in (wrong_suffix, arn.replace(svc.region, "eu-west-1"), partial[:-1], "prod/db/",
                "/prod/db", "Prod/db"):
        with pytest.raises(ResourceNotFoundException):
            call("DescribeSecret", SecretId=bad)
    with pytest.raises(InvalidParameterException):
        call("DescribeSecret", SecretId="")


def test_recreated_secret_gets_new_arn_and_old_arn_is_gone(call):
    old = call("CreateSecret", Name="r", SecretString="old")["ARN"]
    call("DeleteSecret", SecretId="r", ForceDeleteWithoutRecovery=True)
    new = call("CreateSecret", Name="r", SecretString="new")["ARN"]
    assert new != old
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId=old)
    assert value_of(call, old[:-7]) == "new"


# --- PutSecretValue ---------------------------------------------------------------------


def test_put_moves_awscurrent_and_awsprevious_follows(call):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    put = call("PutSecretValue", SecretId="s", SecretString="two")
    v2 = put["VersionId"]
    assert put["VersionStages"] == ["AWSCURRENT"]
    assert stages(call, "s") == {v1: ["AWSPREVIOUS"], v2: ["AWSCURRENT"]}
    v3 = call("PutSecretValue", SecretId="s", SecretBinary=b"three")["VersionId"]
    assert stages(call, "s") == {v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"]}
    assert value_of(call, "s") == b"three"
    assert value_of(call, "s", VersionStage="AWSPREVIOUS") == "two"
    assert value_of(call, "s", VersionId=v1) == "one"  # deprecated, still readable
    listed = call("ListSecretVersionIds", SecretId="s")["Versions"]
    assert [v["VersionId"] for v in listed] == [v3, v2]
    listed = call("ListSecretVersionIds", SecretId="s", IncludeDeprecated=True)["Versions"]
    assert [(v["VersionId"], v["VersionStages"]) for v in listed] == [
        (v3, ["AWSCURRENT"]), (v2, ["AWSPREVIOUS"]), (v1, [])]


def test_put_with_awspending_leaves_awscurrent_alone(call):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    put = call("PutSecretValue", SecretId="s", SecretString="pending",
               VersionStages=["AWSPENDING"])
    assert put["VersionStages"] == ["AWSPENDING"]
    assert stages(call, "s") == {v1: ["AWSCURRENT"], put["VersionId"]: ["AWSPENDING"]}
    assert value_of(call, "s") == "one"
    assert value_of(call, "s", VersionStage="AWSPENDING") == "pending"
    again = call("PutSecretValue", SecretId="s", SecretString="pending2",
                 VersionStages=["AWSPENDING"])
    assert stages(call, "s") == {v1: ["AWSCURRENT"], again["VersionId"]: ["AWSPENDING"]}


def test_first_version_always_gets_awscurrent(call):
    call("CreateSecret", Name="s")
    put = call("PutSecretValue", SecretId="s", SecretString="v", VersionStages=["AWSPENDING"])
    assert stages(call, "s") == {put["VersionId"]: ["AWSCURRENT", "AWSPENDING"]}
    assert value_of(call, "s") == "v"


def test_put_with_same_token_is_idempotent(env, call):
    call("CreateSecret", Name="s", SecretString="one")
    put = call("PutSecretValue", SecretId="s", SecretString="two", ClientRequestToken=TOKEN_A)
    assert put["VersionId"] == TOKEN_A
    before = env.snapshot("s")
    again = call("PutSecretValue", SecretId="s", SecretString="two", ClientRequestToken=TOKEN_A)
    assert again["VersionId"] == TOKEN_A
    after = env.snapshot("s")
    for state in (before, after):  # LastChangedDate aside, a retry does nothing
        state["s"]["describe"].pop("LastChangedDate")
    assert after == before
    for other in ({"SecretString": "changed"}, {"SecretBinary": b"two"}):
        with pytest.raises(ResourceExistsException):
            call("PutSecretValue", SecretId="s", ClientRequestToken=TOKEN_A, **other)
    assert value_of(call, "s", VersionId=TOKEN_A) == "two"


@pytest.mark.parametrize("bad_token", ["short", "x" * 65, "a/" + "b" * 32, "\n" * 32, 42])
def test_put_with_invalid_token_changes_nothing(env, call, bad_token):
    call("CreateSecret", Name="s", SecretString="one")
    before = env.snapshot("s")
    with pytest.raises(InvalidParameterException):
        call("PutSecretValue", SecretId="s", SecretString="two", ClientRequestToken=bad_token)
    assert env.snapshot("s") == before


def test_custom_labels_are_on_at_most_one_version(call):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two",
              VersionStages=["blue", "green"])["VersionId"]
    v3 = call("PutSecretValue", SecretId="s", SecretString="three",
              VersionStages=["blue"])["VersionId"]
    assert stages(call, "s") == {v1: ["AWSCURRENT"], v2: ["green"], v3: ["blue"]}
    assert value_of(call, "s", VersionStage="blue") == "three"
    assert value_of(call, "s", VersionStage="green") == "two"


def test_put_with_awscurrent_and_custom_labels(call):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    put = call("PutSecretValue", SecretId="s", SecretString="two",
               VersionStages=["AWSCURRENT", "release-7"])
    assert put["VersionStages"] == ["AWSCURRENT", "release-7"]
    assert stages(call, "s") == {v1: ["AWSPREVIOUS"], put["VersionId"]: ["AWSCURRENT",
                                                                          "release-7"]}


def test_twenty_labels_fit_and_twenty_one_do_not(env, call):
    call("CreateSecret", Name="s", SecretString="one")
    labels = [f"l{i}" for i in range(20)]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two", VersionStages=labels)
    assert stages(call, "s")[v2["VersionId"]] == sorted(labels)
    before = env.snapshot("s")
    with pytest.raises(InvalidParameterException):
        call("PutSecretValue", SecretId="s", SecretString="three",
             VersionStages=[f"m{i}" for i in range(21)])
    assert env.snapshot("s") == before


def test_a_label_move_that_makes_twenty_one_is_refused_and_rolled_back(env, call):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two",
              VersionStages=[f"l{i}" for i in range(20)])["VersionId"]
    before = env.snapshot("s")
    env.clock.advance(seconds=1)
    with pytest.raises(LimitExceededException):
        call("UpdateSecretVersionStage", SecretId="s", VersionStage="AWSCURRENT",
             MoveToVersionId=v2, RemoveFromVersionId=v1)
    assert env.snapshot("s") == before


@pytest.mark.parametrize("label", ["versions", "keys", "", "x" * 257, "tab\there"])
def test_put_with_a_label_that_cant_be_a_file_changes_nothing(env, call, label):
    call("CreateSecret", Name="s", SecretString="one")
    before = env.snapshot("s")
    with pytest.raises(InvalidParameterException):
        call("PutSecretValue", SecretId="s", SecretString="two", VersionStages=[label])
    assert env.snapshot("s") == before


def test_put_label_colliding_with_a_child_secret_changes_nothing(env, call):
    call("CreateSecret", Name="app", SecretString="one")
    call("CreateSecret", Name="app/blue", SecretString="child")
    before = env.snapshot("app", "app/blue")
    with pytest.raises(InvalidParameterException):
        call("PutSecretValue", SecretId="app", SecretString="two", VersionStages=["blue"])
    assert env.snapshot("app", "app/blue") == before


def test_put_on_a_secret_scheduled_for_deletion_is_refused(env, call):
    call("CreateSecret", Name="s", SecretString="one")
    call("DeleteSecret", SecretId="s", RecoveryWindowInDays=7)
    before = env.snapshot("s")
    with pytest.raises(InvalidRequestException):
        call("PutSecretValue", SecretId="s", SecretString="two")
    assert env.snapshot("s") == before


def test_put_without_value_or_on_missing_secret(call):
    call("CreateSecret", Name="s", SecretString="one")
    with pytest.raises(InvalidParameterException):
        call("PutSecretValue", SecretId="s")
    with pytest.raises(ResourceNotFoundException):
        call("PutSecretValue", SecretId="nope", SecretString="x")


# --- UpdateSecretVersionStage -----------------------------------------------------------


@pytest.fixture
def three_versions(call):
    """s: v1 (deprecated), v2 AWSPREVIOUS, v3 AWSCURRENT, v4 AWSPENDING."""
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two")["VersionId"]
    v3 = call("PutSecretValue", SecretId="s", SecretString="three")["VersionId"]
    v4 = call("PutSecretValue", SecretId="s", SecretString="four",
              VersionStages=["AWSPENDING"])["VersionId"]
    return v1, v2, v3, v4


def test_promote_pending_to_current(call, three_versions):
    _, v2, v3, v4 = three_versions
    assert call("UpdateSecretVersionStage", SecretId="s", VersionStage="AWSCURRENT",
                MoveToVersionId=v4, RemoveFromVersionId=v3) == {
        "ARN": call("DescribeSecret", SecretId="s")["ARN"], "Name": "s"}
    assert stages(call, "s") == {v3: ["AWSPREVIOUS"], v4: ["AWSCURRENT", "AWSPENDING"]}
    assert value_of(call, "s") == "four"
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="AWSPENDING",
         RemoveFromVersionId=v4)
    assert stages(call, "s") == {v3: ["AWSPREVIOUS"], v4: ["AWSCURRENT"]}


def test_promote_to_a_deprecated_version(call, three_versions):
    v1, _, v3, v4 = three_versions
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="AWSCURRENT",
         MoveToVersionId=v1, RemoveFromVersionId=v3)
    assert stages(call, "s") == {v1: ["AWSCURRENT"], v3: ["AWSPREVIOUS"], v4: ["AWSPENDING"]}
    assert value_of(call, "s") == "one"


def test_bad_stage_updates_change_nothing(env, call, three_versions):
    v1, v2, v3, v4 = three_versions
    unknown = "f" * 36
    cases = [
        # moving a label attached elsewhere needs RemoveFromVersionId
        ({"VersionStage": "AWSCURRENT", "MoveToVersionId": v4}, InvalidParameterException),
        ({"VersionStage": "AWSPENDING", "MoveToVersionId": v1}, InvalidParameterException),
        # AWSCURRENT can't just be removed
        ({"VersionStage": "AWSCURRENT", "RemoveFromVersionId": v3}, InvalidParameterException),
        # RemoveFromVersionId must be the version holding the label
        ({"VersionStage": "AWSCURRENT", "RemoveFromVersionId": v2, "MoveToVersionId": v4},
         InvalidParameterException),
        ({"VersionStage": "blue", "RemoveFromVersionId": v2}, InvalidParameterException),
        ({"VersionStage": "AWSCURRENT", "RemoveFromVersionId": unknown,
          "MoveToVersionId": v4}, InvalidParameterException),
        ({"VersionStage": "AWSCURRENT", "RemoveFromVersionId": v3,
          "MoveToVersionId": unknown}, ResourceNotFoundException),
        ({"VersionStage": "blue", "MoveToVersionId": unknown}, ResourceNotFoundException),
        ({"VersionStage": "AWSCURRENT"}, InvalidParameterException),
        ({"VersionStage": "", "MoveToVersionId": v1}, InvalidParameterException),
        ({"VersionStage": "versions", "MoveToVersionId": v1}, InvalidParameterException),
        ({"VersionStage": "keys", "MoveToVersionId": v1}, InvalidParameterException),
    ]
    before = env.snapshot("s")
    for params, error in cases:
        env.clock.advance(seconds=1)
        with pytest.raises(error):
            call("UpdateSecretVersionStage", SecretId="s", **params)
        assert env.snapshot("s") == before, params


def test_custom_label_attach_move_remove(call, three_versions):
    v1, v2, v3, v4 = three_versions
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="blue", MoveToVersionId=v1)
    assert value_of(call, "s", VersionStage="blue") == "one"
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="blue", MoveToVersionId=v2,
         RemoveFromVersionId=v1)
    assert stages(call, "s")[v2] == ["AWSPREVIOUS", "blue"]
    assert v1 not in stages(call, "s")
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="blue", RemoveFromVersionId=v2)
    assert stages(call, "s") == {v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"], v4: ["AWSPENDING"]}
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="s", VersionStage="blue")


def test_custom_label_colliding_with_a_child_directory_is_refused(env, call):
    v1 = call("CreateSecret", Name="app", SecretString="one")["VersionId"]
    call("CreateSecret", Name="app/blue/deep", SecretString="child")
    before = env.snapshot("app")
    with pytest.raises(InvalidParameterException):
        call("UpdateSecretVersionStage", SecretId="app", VersionStage="blue", MoveToVersionId=v1)
    assert env.snapshot("app") == before
    # a label whose file name differs from the child's segment is fine
    call("UpdateSecretVersionStage", SecretId="app", VersionStage="blue/x", MoveToVersionId=v1)


def test_stage_update_on_deleted_secret_is_refused(env, call, three_versions):
    _, _, v3, v4 = three_versions
    call("DeleteSecret", SecretId="s", RecoveryWindowInDays=7)
    before = env.snapshot("s")
    with pytest.raises(InvalidRequestException):
        call("UpdateSecretVersionStage", SecretId="s", VersionStage="AWSCURRENT",
             MoveToVersionId=v4, RemoveFromVersionId=v3)
    assert env.snapshot("s") == before


# --- UpdateSecret -------------------------------------------------------------------


def test_update_description_and_value(env, call):
    v1 = call("CreateSecret", Name="s", SecretString="one", Description="first")["VersionId"]
    created = call("DescribeSecret", SecretId="s")
    env.clock.advance(hours=1)
    assert call("UpdateSecret", SecretId="s", Description="second") == {
        "ARN": created["ARN"], "Name": "s"}
    described = call("DescribeSecret", SecretId="s")
    assert described["Description"] == "second"
    assert described["LastChangedDate"] == env.clock.now
    assert described["CreatedDate"] == created["CreatedDate"]
    assert described["VersionIdsToStages"] == {v1: ["AWSCURRENT"]}
    env.clock.advance(hours=1)
    updated = call("UpdateSecret", SecretId="s", SecretString="two")
    assert stages(call, "s") == {v1: ["AWSPREVIOUS"], updated["VersionId"]: ["AWSCURRENT"]}
    assert value_of(call, "s") == "two"
    assert call("DescribeSecret", SecretId="s")["Description"] == "second"


def test_update_kms_key_keeps_old_versions_readable(call):
    key = call("CreateKey", Alias="alias/new")
    v1 = call("CreateSecret", Name="s", SecretBinary=b"one")["VersionId"]
    call("UpdateSecret", SecretId="s", KmsKeyId="alias/new")
    v2 = call("PutSecretValue", SecretId="s", SecretBinary=b"two")["VersionId"]
    v3 = call("UpdateSecret", SecretId="s", SecretBinary=b"three")["VersionId"]
    assert call("DescribeSecret", SecretId="s")["KmsKeyId"] == "alias/new"
    versions = {v["VersionId"]: v["KmsKeyIds"] for v in call(
        "ListSecretVersionIds", SecretId="s", IncludeDeprecated=True)["Versions"]}
    assert versions[v2] == versions[v3] == [key["Arn"]]
    assert versions[v1] != [key["Arn"]]
    assert value_of(call, "s", VersionId=v1) == b"one"
    assert value_of(call, "s", VersionId=v2) == b"two"
    assert value_of(call, "s") == b"three"


def test_bad_updates_change_nothing(env, call):
    call("CreateSecret", Name="s", SecretString="one", Description="d")
    before = env.snapshot("s")
    for params in ({"KmsKeyId": "alias/none"}, {"Description": "x" * 2049},
                   {"SecretString": "a", "SecretBinary": b"a"}, {"SecretString": ""},
                   {"SecretString": "x" * 65537}):
        env.clock.advance(seconds=1)
        with pytest.raises(InvalidParameterException):
            call("UpdateSecret", SecretId="s", **params)
        assert env.snapshot("s") == before, params
    call("DeleteSecret", SecretId="s", RecoveryWindowInDays=7)
    before = env.snapshot("s")
    with pytest.raises(InvalidRequestException):
        call("UpdateSecret", SecretId="s", Description="new")
    assert env.snapshot("s") == before


# --- GetSecretValue -------------------------------------------------------------------


def test_get_by_version_id_stage_or_both(call, three_versions):
    v1, v2, v3, v4 = three_versions
    got = call("GetSecretValue", SecretId="s", VersionId=v2)
    assert (got["SecretString"], got["VersionStages"]) == ("two", ["AWSPREVIOUS"])
    assert set(got) == {"ARN", "Name", "VersionId", "VersionStages", "CreatedDate",
                        "SecretString"}
    assert value_of(call, "s", VersionStage="AWSPENDING") == "four"
    assert value_of(call, "s", VersionId=v3, VersionStage="AWSCURRENT") == "three"
    assert call("GetSecretValue", SecretId="s", VersionId=v1)["VersionStages"] == []
    with pytest.raises(InvalidRequestException):
        call("GetSecretValue", SecretId="s", VersionId=v2, VersionStage="AWSCURRENT")
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="s", VersionId="e" * 36)
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="s", VersionStage="nope")
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="missing")


def test_last_accessed_date_is_the_day_of_the_read(env, call, svc):
    v1 = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    changed = call("DescribeSecret", SecretId="s")["LastChangedDate"]
    env.clock.advance(hours=3)
    call("GetSecretValue", SecretId="s")
    assert "LastAccessedDate" not in call("DescribeSecret", SecretId="s")  # not yet flushed
    svc.flush_accesses()
    midnight = env.clock.now.replace(hour=0, minute=0, second=0, microsecond=0)
    described = call("DescribeSecret", SecretId="s")
    assert described["LastAccessedDate"] == midnight
    assert described["LastChangedDate"] == changed
    version = call("ListSecretVersionIds", SecretId="s")["Versions"][0]
    assert version["VersionId"] == v1 and version["LastAccessedDate"] == midnight
    env.clock.advance(days=2)
    call("GetSecretValue", SecretId="s")
    svc.flush_accesses()
    assert call("DescribeSecret", SecretId="s")["LastAccessedDate"] == midnight + timedelta(days=2)


# --- BatchGetSecretValue --------------------------------------------------------------


def test_batch_get_by_id_list_reports_errors(call):
    call("CreateSecret", Name="a", SecretString="va")
    arn_b = call("CreateSecret", Name="b", SecretBinary=b"vb")["ARN"]
    call("CreateSecret", Name="gone", SecretString="x")
    call("DeleteSecret", SecretId="gone", RecoveryWindowInDays=7)
    call("CreateSecret", Name="novalue")
    got = call("BatchGetSecretValue", SecretIdList=["a", arn_b, "missing", "gone", "novalue"])
    assert [(v["Name"], v.get("SecretString", v.get("SecretBinary")))
            for v in got["SecretValues"]] == [("a", "va"), ("b", b"vb")]
    assert {e["SecretId"]: e["ErrorCode"] for e in got["Errors"]} == {
        "missing": "ResourceNotFoundException", "gone": "InvalidRequestException",
        "novalue": "ResourceNotFoundException"}
    assert all(e["Message"] for e in got["Errors"])
    assert "NextToken" not in got


def test_batch_get_parameters(call):
    call("CreateSecret", Name="a", SecretString="va")
    for params in ({}, {"SecretIdList": ["a"], "Filters": [{"Key": "name", "Values": ["a"]}]},
                   {"SecretIdList": []}, {"SecretIdList": ["a"] * 21},
                   {"SecretIdList": ["a"], "MaxResults": 5},
                   {"Filters": [{"Key": "name", "Values": ["a"]}], "MaxResults": 21}):
        with pytest.raises(InvalidParameterException):
            call("BatchGetSecretValue", **params)


def test_batch_get_by_filters_paginates(env, call):
    expected = {}
    for i in range(25):
        env.clock.advance(seconds=1)
        value = distinctive(f"batch{i}")
        call("CreateSecret", Name=f"batch/{i:02}", SecretString=value)
        expected[f"batch/{i:02}"] = value
        call("CreateSecret", Name=f"other/{i:02}", SecretString="no")
    values, pages = all_pages(call, "BatchGetSecretValue", "SecretValues",
                              Filters=[{"Key": "name", "Values": ["batch/"]}], MaxResults=10)
    assert pages == 3
    assert [v["Name"] for v in values] == sorted(expected)
    assert {v["Name"]: v["SecretString"] for v in values} == expected


# --- DescribeSecret -------------------------------------------------------------------


def test_describe_shape(env, call, three_versions):
    v1, v2, v3, v4 = three_versions
    call("TagResource", SecretId="s", Tags=[{"Key": "team", "Value": "db"}])
    described = call("DescribeSecret", SecretId="s")
    assert set(described) == {"ARN", "Name", "LastChangedDate", "CreatedDate", "Tags",
                              "VersionIdsToStages"}
    assert described["Name"] == "s"
    assert described["CreatedDate"] == env.clock.now
    assert described["VersionIdsToStages"] == {
        v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"], v4: ["AWSPENDING"]}
    assert described["Tags"] == [{"Key": "team", "Value": "db"}]
    env.clock.advance(days=1)
    deletion = call("DeleteSecret", SecretId="s", RecoveryWindowInDays=9)["DeletionDate"]
    described = call("DescribeSecret", SecretId="s")
    assert described["DeletedDate"] == deletion == env.clock.now + timedelta(days=9)
    call("RestoreSecret", SecretId="s")
    assert "DeletedDate" not in call("DescribeSecret", SecretId="s")


# --- ListSecrets ---------------------------------------------------------------------


@pytest.mark.parametrize("ticking", [True, False], ids=["distinct-dates", "same-date"])
def test_list_pagination_visits_every_secret_once(env, call, ticking):
    created = []
    for i in range(250):
        if ticking:
            env.clock.advance(seconds=1)
        name = f"s/{(i * 37) % 250:03}"  # creation order differs from name order
        call("CreateSecret", Name=name, SecretString="v")
        created.append(name)
    for sort_by in ("created-date", "name", "last-changed-date", "last-accessed-date"):
        for order in ("asc", "desc"):
            entries, pages = all_pages(call, "ListSecrets", "SecretList", MaxResults=7,
                                       SortOrder=order, SortBy=sort_by)
            listed = [entry["Name"] for entry in entries]
            assert len(listed) == len(set(listed)) == 250, (sort_by, order)
            assert pages == 36, (sort_by, order)  # ceil(250 / 7)
            # Equal dates (and no accesses at all) fall back to creation order.
            expected = sorted(created) if sort_by == "name" else created
            assert listed == (expected if order == "asc" else expected[::-1]), (sort_by, order)


def test_list_default_page_size_is_100(call):
    for i in range(130):
        call("CreateSecret", Name=f"s{i}", SecretString="v")
    first = call("ListSecrets")
    assert len(first["SecretList"]) == 100
    rest = call("ListSecrets", NextToken=first["NextToken"])
    assert len(rest["SecretList"]) == 30 and "NextToken" not in rest


def test_list_entry_shape(call, three_versions):
    _, v2, v3, v4 = three_versions
    entry = call("ListSecrets")["SecretList"][0]
    assert entry["Name"] == "s"
    assert entry["SecretVersionsToStages"] == {
        v2: ["AWSPREVIOUS"], v3: ["AWSCURRENT"], v4: ["AWSPENDING"]}
    assert "VersionIdsToStages" not in entry


@pytest.fixture
def catalogue(call):
    specs = {
        "prod/db": ("Primary Database", [("team", "data"), ("env", "prod")]),
        "prod/api": ("public API key", [("team", "web"), ("env", "prod")]),
        "dev/db": ("scratch database", [("team", "data"), ("env", "dev")]),
        "Prod/Upper": (None, [("owner", "ops-team")]),
        "misc": ("nothing here", []),
    }
    for name, (description, tags) in specs.items():
        call("CreateSecret", Name=name, SecretString="v",
             **({"Description": description} if description else {}),
             Tags=[{"Key": k, "Value": v} for k, v in tags])
    return specs


@pytest.mark.parametrize(("filters", "expected"), [
    ([{"Key": "name", "Values": ["prod/"]}], {"prod/db", "prod/api"}),
    ([{"Key": "name", "Values": ["prod"]}], {"prod/db", "prod/api"}),  # case-sensitive
    ([{"Key": "name", "Values": ["Prod"]}], {"Prod/Upper"}),
    ([{"Key": "name", "Values": ["db"]}], set()),  # prefix, not substring
    ([{"Key": "name", "Values": ["dev", "misc"]}], {"dev/db", "misc"}),  # values OR
    ([{"Key": "name", "Values": ["!prod"]}], {"dev/db", "Prod/Upper", "misc"}),
    ([{"Key": "description", "Values": ["primary"]}], {"prod/db"}),  # case-insensitive
    ([{"Key": "description", "Values": ["!scratch"]}],
     {"prod/db", "prod/api", "Prod/Upper", "misc"}),
    ([{"Key": "tag-key", "Values": ["own"]}], {"Prod/Upper"}),
    ([{"Key": "tag-key", "Values": ["!team"]}], {"Prod/Upper", "misc"}),
    ([{"Key": "tag-value", "Values": ["data"]}], {"prod/db", "dev/db"}),
    ([{"Key": "tag-value", "Values": ["Data"]}], set()),
    ([{"Key": "tag-key", "Values": ["env"]}, {"Key": "tag-value", "Values": ["dev"]}],
     {"dev/db"}),  # filters AND
    ([{"Key": "name", "Values": ["prod"]}, {"Key": "description", "Values": ["!public"]}],
     {"prod/db"}),
    ([{"Key": "all", "Values": ["database"]}], {"prod/db", "dev/db"}),
    ([{"Key": "all", "Values": ["DATA"]}], {"prod/db", "dev/db"}),
    ([{"Key": "all", "Values": ["ops"]}], {"Prod/Upper"}),
    ([{"Key": "all", "Values": ["!prod"]}], {"dev/db", "misc"}),
])
def test_list_filters(call, catalogue, filters, expected):
    assert set(names(call, Filters=filters)) == expected


@pytest.mark.parametrize("filters", [
    [{"Key": "colour", "Values": ["x"]}],
    [{"Key": "name", "Values": []}],
    [{"Key": "name"}],
    [{"Key": "name", "Values": [5]}],
    [{"Key": "name", "Values": ["a"]}] * 11,
    "name",
])
def test_list_bad_filters(call, catalogue, filters):
    with pytest.raises(InvalidParameterException):
        call("ListSecrets", Filters=filters)


def test_list_include_planned_deletion(call):
    for name in ("a", "b", "c"):
        call("CreateSecret", Name=name, SecretString="v")
    call("DeleteSecret", SecretId="b", RecoveryWindowInDays=7)
    assert names(call) == ["a", "c"]
    listed = call("ListSecrets", IncludePlannedDeletion=True)["SecretList"]
    assert [entry["Name"] for entry in listed] == ["a", "b", "c"]
    assert "DeletedDate" in listed[1] and "DeletedDate" not in listed[0]


def test_list_bad_parameters_and_tokens(call, svc):
    for i in range(3):
        call("CreateSecret", Name=f"s{i}", SecretString="v")
    asc = call("ListSecrets", MaxResults=1)["NextToken"]
    call("ListSecrets", NextToken=asc)
    versions_token = svc._encode_token("versions", 1)
    for bad in ("garbage", "!!!", base64.urlsafe_b64encode(b"[1,2]").decode(), versions_token,
                base64.urlsafe_b64encode(b'["secrets:created-date:asc", 1]').decode()):
        with pytest.raises(InvalidNextTokenException):
            call("ListSecrets", NextToken=bad)
    with pytest.raises(InvalidNextTokenException):  # a token belongs to its sort order
        call("ListSecrets", NextToken=asc, SortOrder="desc")
    with pytest.raises(InvalidNextTokenException):
        call("ListSecrets", NextToken=asc, SortBy="name")
    for params in ({"MaxResults": 0}, {"MaxResults": 101}, {"SortBy": "size"},
                   {"SortOrder": "up"}):
        with pytest.raises(InvalidParameterException):
            call("ListSecrets", **params)


@pytest.mark.parametrize("cursor", [[1], {"a": 1}])
def test_list_token_with_wrong_cursor_type_is_invalid(call, svc, cursor):
    call("CreateSecret", Name="s", SecretString="v")
    with pytest.raises(InvalidNextTokenException):
        call("ListSecrets", NextToken=svc._encode_token("secrets:created-date:asc", cursor, 1))


# --- ListSecretVersionIds --------------------------------------------------------------


def test_list_version_ids_paginates_newest_first(env, call):
    ids = [call("CreateSecret", Name="s", SecretString="0")["VersionId"]]
    for i in range(1, 12):
        env.clock.advance(seconds=1)
        ids.append(call("PutSecretValue", SecretId="s", SecretString=str(i))["VersionId"])
    versions, pages = all_pages(call, "ListSecretVersionIds", "Versions", SecretId="s",
                                MaxResults=5, IncludeDeprecated=True)
    assert [v["VersionId"] for v in versions] == ids[::-1]
    assert pages == 3
    labelled, _ = all_pages(call, "ListSecretVersionIds", "Versions", SecretId="s",
                            MaxResults=1)
    assert [v["VersionId"] for v in labelled] == [ids[-1], ids[-2]]
    page = call("ListSecretVersionIds", SecretId="s")
    assert set(page) == {"Versions", "ARN", "Name"}
    for bad in ("garbage", list_secrets_token(call)):
        with pytest.raises(InvalidNextTokenException):
            call("ListSecretVersionIds", SecretId="s", NextToken=bad)
    for bad_limit in (0, 101):
        with pytest.raises(InvalidParameterException):
            call("ListSecretVersionIds", SecretId="s", MaxResults=bad_limit)


def list_secrets_token(call) -> str:
    """A ListSecrets token: not valid for ListSecretVersionIds."""
    for i in range(2):
        call("CreateSecret", Name=f"tok{i}", SecretString="v")
    return call("ListSecrets", MaxResults=1)["NextToken"]


def test_version_token_without_offset_is_invalid(call, svc):
    call("CreateSecret", Name="s", SecretString="v")
    with pytest.raises(InvalidNextTokenException):
        call("ListSecretVersionIds", SecretId="s", NextToken=svc._encode_token("versions"))


# --- DeleteSecret and RestoreSecret ----------------------------------------------------


@pytest.mark.parametrize("days", [7, 30])
def test_recovery_window_bounds_accepted(env, call, days):
    call("CreateSecret", Name="s", SecretString="v")
    deleted = call("DeleteSecret", SecretId="s", RecoveryWindowInDays=days)
    assert deleted["DeletionDate"] == env.clock.now + timedelta(days=days)
    assert deleted["Name"] == "s"


def test_default_recovery_window_is_30_days(env, call):
    call("CreateSecret", Name="s", SecretString="v")
    assert call("DeleteSecret", SecretId="s")["DeletionDate"] == env.clock.now + timedelta(
        days=30)


@pytest.mark.parametrize("params", [
    {"RecoveryWindowInDays": 6}, {"RecoveryWindowInDays": 31}, {"RecoveryWindowInDays": 0},
    {"RecoveryWindowInDays": -7}, {"RecoveryWindowInDays": "7"},
    {"RecoveryWindowInDays": 7, "ForceDeleteWithoutRecovery": True},
    {"RecoveryWindowInDays": 30, "ForceDeleteWithoutRecovery": True},
])
def test_bad_delete_changes_nothing(env, call, params):
    call("CreateSecret", Name="s", SecretString="v")
    before = env.snapshot("s")
    with pytest.raises(InvalidParameterException):
        call("DeleteSecret", SecretId="s", **params)
    assert env.snapshot("s") == before


def test_force_delete_is_immediate_and_frees_the_name(env, call):
    call("CreateSecret", Name="s", SecretString="v", Tags=[{"Key": "k", "Value": "v"}])
    call("CreateSecret", Name="keep", SecretString="kept")
    deleted = call("DeleteSecret", SecretId="s", ForceDeleteWithoutRecovery=True)
    assert deleted["DeletionDate"] == env.clock.now
    with pytest.raises(ResourceNotFoundException):
        call("DescribeSecret", SecretId="s")
    assert names(call, IncludePlannedDeletion=True) == ["keep"]
    call("CreateSecret", Name="s", SecretString="again")
    assert value_of(call, "s") == "again"
    assert value_of(call, "keep") == "kept"


def test_delete_twice_and_use_while_scheduled(env, call):
    call("CreateSecret", Name="s", SecretString="v", Description="d")
    call("DeleteSecret", SecretId="s", RecoveryWindowInDays=7)
    before = env.snapshot("s")
    refused = [
        ("DeleteSecret", {}),
        ("GetSecretValue", {}),
        ("PutSecretValue", {"SecretString": "new"}),
        ("UpdateSecret", {"Description": "new"}),
        ("TagResource", {"Tags": [{"Key": "a", "Value": "b"}]}),
        ("UntagResource", {"TagKeys": ["a"]}),
    ]
    for action, params in refused:
        env.clock.advance(seconds=1)
        with pytest.raises(InvalidRequestException):
            call(action, SecretId="s", **params)
    with pytest.raises(InvalidRequestException):
        call("CreateSecret", Name="s", SecretString="new")
    got = call("BatchGetSecretValue", SecretIdList=["s"])
    assert got["SecretValues"] == [] and got["Errors"][0]["ErrorCode"] == "InvalidRequestException"
    assert env.snapshot("s") == before
    assert call("DescribeSecret", SecretId="s")["Description"] == "d"


def test_restore(env, call):
    call("CreateSecret", Name="s", SecretString="v")
    before = env.snapshot("s")
    with pytest.raises(InvalidRequestException):
        call("RestoreSecret", SecretId="s")
    assert env.snapshot("s") == before
    call("DeleteSecret", SecretId="s", RecoveryWindowInDays=7)
    env.clock.advance(days=6)
    restored = call("RestoreSecret", SecretId="s")
    assert restored["Name"] == "s"
    assert value_of(call, "s") == "v"
    assert "DeletedDate" not in call("DescribeSecret", SecretId="s")
    env.clock.advance(days=30)
    assert env.service.purge_expired() == 0
    assert value_of(call, "s") == "v"


def test_purge_removes_only_secrets_past_their_date(env, call, svc):
    for name in ("seven", "ten", "live"):
        call("CreateSecret", Name=name, SecretString=name)
    call("DeleteSecret", SecretId="seven", RecoveryWindowInDays=7)
    env.clock.advance(days=3)
    call("DeleteSecret", SecretId="ten", RecoveryWindowInDays=7)
    assert svc.next_deletion() == env.clock.now + timedelta(days=4)
    env.clock.advance(days=4, seconds=-1)
    assert svc.purge_expired() == 0
    env.clock.advance(seconds=1)
    assert svc.purge_expired() == 1
    assert names(call, IncludePlannedDeletion=True) == ["ten", "live"]
    assert svc.next_deletion() == env.clock.now + timedelta(days=3)
    call("CreateSecret", Name="seven", SecretString="new")  # the name is free again
    env.clock.advance(days=3)
    assert svc.purge_expired() == 1
    assert svc.next_deletion() is None
    assert names(call, IncludePlannedDeletion=True) == ["live", "seven"]
    assert value_of(call, "live") == "live"
    assert value_of(call, "seven") == "new"


def test_purge_does_not_remove_a_secret_restored_meanwhile(env, call, svc, monkeypatch):
    call("CreateSecret", Name="racy", SecretString="v")
    call("DeleteSecret", SecretId="racy", RecoveryWindowInDays=7)
    env.clock.advance(days=8)
    expired = Reader.expired

    def expired_then_restored(reader, now):
        found = expired(reader, now)
        call("RestoreSecret", SecretId="racy")  # an API thread wins the race
        return found

    monkeypatch.setattr(Reader, "expired", expired_then_restored)
    svc.purge_expired()
    assert value_of(call, "racy") == "v"


# --- version retention ---------------------------------------------------------------


def test_deprecated_versions_over_100_are_pruned_after_a_day(env, call):
    first = call("CreateSecret", Name="s", SecretString="0")["VersionId"]
    call("UpdateSecretVersionStage", SecretId="s", VersionStage="keep", MoveToVersionId=first)
    ids = [first]
    for i in range(1, 106):
        env.clock.advance(seconds=10)
        ids.append(call("PutSecretValue", SecretId="s", SecretString=str(i))["VersionId"])

    def kept() -> list[str]:
        versions, _ = all_pages(call, "ListSecretVersionIds", "Versions", SecretId="s",
                                IncludeDeprecated=True)
        return [v["VersionId"] for v in versions][::-1]

    assert kept() == ids  # 106 versions, all younger than a day: none pruned
    env.clock.advance(hours=25)
    ids.append(call("PutSecretValue", SecretId="s", SecretString="new")["VersionId"])
    # 107 versions: the 7 oldest unlabelled ones go; 'keep' stays though it is the oldest
    assert kept() == [first] + ids[8:]
    assert len(kept()) == 100
    assert value_of(call, "s", VersionStage="keep") == "0"
    assert value_of(call, "s", VersionStage="AWSPREVIOUS") == "105"
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="s", VersionId=ids[1])
    # one over the limit: exactly the oldest unlabelled version goes
    ids.append(call("PutSecretValue", SecretId="s", SecretString="newer")["VersionId"])
    assert kept() == [first] + ids[9:]


def test_versions_younger_than_a_day_are_capped(env, call, monkeypatch):
    monkeypatch.setattr(model, "VERSIONS_MAX", 104)  # 1000 real versions are slow to make
    call("CreateSecret", Name="s", SecretString="0", ClientRequestToken=TOKEN_A)
    for i in range(1, 104):
        env.clock.advance(seconds=1)
        call("PutSecretValue", SecretId="s", SecretString=str(i))
    before = env.snapshot("s")
    with pytest.raises(LimitExceededException):
        call("PutSecretValue", SecretId="s", SecretString="one too many")
    assert env.snapshot("s") == before
    # retrying an existing version is no new version
    call("PutSecretValue", SecretId="s", SecretString="0", ClientRequestToken=TOKEN_A)


def test_version_cap_lifts_once_old_versions_can_be_pruned(env, call, monkeypatch):
    monkeypatch.setattr(model, "VERSIONS_MAX", 104)
    call("CreateSecret", Name="s", SecretString="0")
    for i in range(1, 104):
        env.clock.advance(seconds=1)
        call("PutSecretValue", SecretId="s", SecretString=str(i))
    env.clock.advance(hours=25)
    call("PutSecretValue", SecretId="s", SecretString="after a day")
    assert value_of(call, "s") == "after a day"


# --- tags -----------------------------------------------------------------------------


def test_tag_and_untag(env, call):
    call("CreateSecret", Name="s", SecretString="v", Tags=[{"Key": "a", "Value": "1"}])
    env.clock.advance(minutes=1)
    assert call("TagResource", SecretId="s", Tags=[{"Key": "b", "Value": "2"},
                                                   {"Key": "a", "Value": "one"}]) == {}
    described = call("DescribeSecret", SecretId="s")
    assert described["Tags"] == [{"Key": "a", "Value": "one"}, {"Key": "b", "Value": "2"}]
    assert described["LastChangedDate"] == env.clock.now
    assert call("UntagResource", SecretId="s", TagKeys=["a", "absent"]) == {}
    assert call("DescribeSecret", SecretId="s")["Tags"] == [{"Key": "b", "Value": "2"}]
    call("UntagResource", SecretId="s", TagKeys=["b"])
    assert "Tags" not in call("DescribeSecret", SecretId="s")


def test_bad_tagging_changes_nothing(env, call):
    call("CreateSecret", Name="s", SecretString="v",
         Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(49)])
    before = env.snapshot("s")
    cases = [
        ("TagResource", {"Tags": [{"Key": "x", "Value": "1"}, {"Key": "y", "Value": "2"}]},
         LimitExceededException),
        ("TagResource", {"Tags": [{"Key": "aws:x", "Value": "1"}]}, InvalidParameterException),
        ("TagResource", {"Tags": [{"Key": "x", "Value": "1"}, {"Key": "x", "Value": "2"}]},
         InvalidParameterException),
        ("UntagResource", {"TagKeys": "k1"}, InvalidParameterException),
        ("UntagResource", {"TagKeys": ["k1", ""]}, InvalidParameterException),
    ]
    for action, params, error in cases:
        env.clock.advance(seconds=1)
        with pytest.raises(error):
            call(action, SecretId="s", **params)
        assert env.snapshot("s") == before, (action, params)
    with pytest.raises(ResourceNotFoundException):
        call("TagResource", SecretId="nope", Tags=[{"Key": "x", "Value": "1"}])


# --- authorization and dispatch -------------------------------------------------------


def _every_action(v1: str, v2: str) -> list[tuple[str, dict]]:
    return [
        ("CreateSecret", {"Name": "new", "SecretString": "x"}),
        ("PutSecretValue", {"SecretId": "s", "SecretString": "x"}),
        ("GetSecretValue", {"SecretId": "s"}),
        ("BatchGetSecretValue", {"SecretIdList": ["s"]}),
        ("UpdateSecret", {"SecretId": "s", "Description": "x"}),
        ("UpdateSecretVersionStage", {"SecretId": "s", "VersionStage": "AWSCURRENT",
                                      "MoveToVersionId": v1, "RemoveFromVersionId": v2}),
        ("DescribeSecret", {"SecretId": "s"}),
        ("ListSecrets", {}),
        ("ListSecretVersionIds", {"SecretId": "s"}),
        ("DeleteSecret", {"SecretId": "s", "ForceDeleteWithoutRecovery": True}),
        ("RestoreSecret", {"SecretId": "s"}),
        ("TagResource", {"SecretId": "s", "Tags": [{"Key": "a", "Value": "b"}]}),
        ("UntagResource", {"SecretId": "s", "TagKeys": ["team"]}),
        ("GetRandomPassword", {}),
        ("CreateKey", {"Alias": "alias/x"}),
        ("ListKeys", {}),
        ("PutResourcePolicy", {"SecretId": "s", "ResourcePolicy": _POLICY}),
        ("GetResourcePolicy", {"SecretId": "s"}),
        ("DeleteResourcePolicy", {"SecretId": "s"}),
        ("ValidateResourcePolicy", {"ResourcePolicy": _POLICY}),
        ("PutIdentityPolicy", {"Principal": "uid:1000", "PolicyName": "p",
                               "PolicyDocument": _IDENTITY_POLICY}),
        ("GetIdentityPolicy", {"Principal": "uid:1000", "PolicyName": "p"}),
        ("DeleteIdentityPolicy", {"Principal": "uid:1000", "PolicyName": "p"}),
        ("ListIdentityPolicies", {}),
        ("RotateSecret", {"SecretId": "s", "RotationLambdaARN": "secretfs:random-password"}),
        ("CancelRotateSecret", {"SecretId": "s"}),
        ("CreateAccessKey", {"Principal": "uid:1000"}),
        ("ListAccessKeys", {}),
        ("DeleteAccessKey", {"AccessKeyId": "AKSF" + "A" * 16}),
        ("GetStatus", {}),
        ("Refresh", {}),
        ("RotateKey", {}),
        ("RetireKeyVersions", {}),
        ("ReEncrypt", {}),
        ("GetReEncryptStatus", {}),
    ]


_POLICY = ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
           '"Principal": {"Unix": ["uid:1000"]}, "Action": "secretsmanager:DescribeSecret", '
           '"Resource": "*"}]}')
_IDENTITY_POLICY = ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
                    '"Action": "secretsmanager:DescribeSecret", "Resource": "*"}]}')


def test_every_action_is_covered_by_the_denial_test(svc):
    covered = {action for action, _ in _every_action("a", "b")}
    assert covered == svc.AWS_ACTIONS | svc.EXTENSION_ACTIONS


@pytest.mark.parametrize("index", range(len(_every_action("a", "b"))))
def test_non_root_caller_is_denied_every_action(env, call, svc, user, index):
    v1 = call("CreateSecret", Name="s", SecretString="one",
              Tags=[{"Key": "team", "Value": "db"}])["VersionId"]
    v2 = call("PutSecretValue", SecretId="s", SecretString="two")["VersionId"]
    keys_before = call("ListKeys")["Keys"]
    before = env.snapshot("s", "new")
    action, params = _every_action(v1, v2)[index]
    with pytest.raises(AccessDeniedException) as denied:
        call(action, caller=user, **params)
    assert denied.value.code == "AccessDeniedException"
    assert "1000" in str(denied.value)
    svc.flush_accesses()
    assert env.snapshot("s", "new") == before
    assert "LastAccessedDate" not in call("DescribeSecret", SecretId="s")
    assert call("ListKeys")["Keys"] == keys_before


def test_unknown_action_and_parameters(call, svc, user):
    for action in ("DeleteEverything", "create_secret", "createsecret", "purge_expired", ""):
        with pytest.raises(UnknownOperationException):
            call(action)
    with pytest.raises(ValidationException):
        call("CreateSecret", Name="s", SecretString="v", Colour="red")
    with pytest.raises(ValidationException):
        call("CreateSecret", SecretString="v")  # Name is required
    call("CreateSecret", Name="s", SecretString="v")
    with pytest.raises(ValidationException):  # a request can't name its own caller
        svc.call("DescribeSecret", {"SecretId": "s", "caller": SYSTEM}, user)
    with pytest.raises(ValidationException):
        svc.call("DescribeSecret", {"SecretId": "s", "self": None}, SYSTEM)
    call("DeleteSecret", SecretId="s", ForceDeleteWithoutRecovery=True)
    assert names(call, IncludePlannedDeletion=True) == []


def test_errors_carry_their_aws_code(call):
    with pytest.raises(SecretsManagerError) as raised:
        call("GetSecretValue", SecretId="missing")
    assert raised.value.code == "ResourceNotFoundException"
    assert raised.value.status == 400


# --- restart ----------------------------------------------------------------------------


def test_a_new_service_over_the_same_files_sees_everything(env, call):
    key = call("CreateKey", Alias="alias/restart")
    v1 = call("CreateSecret", Name="prod/db", SecretString="one", Description="db",
              Tags=[{"Key": "env", "Value": "prod"}], KmsKeyId="alias/restart")["VersionId"]
    call("PutSecretValue", SecretId="prod/db", SecretBinary=b"\x00two",
         VersionStages=["AWSPENDING", "blue"])
    call("CreateSecret", Name="doomed", SecretString="x")
    call("DeleteSecret", SecretId="doomed", RecoveryWindowInDays=7)
    call("CreateSecret", Name="empty")
    call("GetSecretValue", SecretId="prod/db")
    env.service.flush_accesses()
    before = env.snapshot("prod/db", "doomed", "empty")
    listed = call("ListSecrets", IncludePlannedDeletion=True)

    restarted = env.reopen()
    again = env.service
    env.service = restarted
    try:
        assert env.snapshot("prod/db", "doomed", "empty") == before
        assert call("ListSecrets", IncludePlannedDeletion=True) == listed
        assert call("ListKeys")["Keys"] == again.call("ListKeys", {}, SYSTEM)["Keys"]
        assert value_of(call, "prod/db", VersionId=v1) == "one"
        assert call("ListSecretVersionIds", SecretId="prod/db")["Versions"][-1][
            "KmsKeyIds"] == [key["Arn"]]
        v3 = call("PutSecretValue", SecretId="prod/db", SecretString="three")["VersionId"]
        assert value_of(call, "prod/db") == "three"
        assert stages(call, "prod/db")[v3] == ["AWSCURRENT"]
        with pytest.raises(ResourceExistsException):
            call("CreateSecret", Name="prod/db")
    finally:
        env.service = again


def test_secret_values_are_json_agnostic(call):
    document = {"username": "admin", "port": 5432}
    call("CreateSecret", Name="j", SecretString=json.dumps(document))
    assert json.loads(value_of(call, "j")) == document


# --- where a value is sealed -------------------------------------------------------------


class _HeldKeys:
    """The service's own key provider, whose wrapping waits until the test lets it go:
    what a slow KMS GenerateDataKey looks like to the service."""

    def __init__(self, keys):
        self._keys = keys
        self.wrapping = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._keys, name)

    def wrap(self, *args):
        self.wrapping.set()
        assert self.release.wait(10)
        return self._keys.wrap(*args)


def test_a_new_value_is_sealed_before_the_write_transaction_begins(env):
    """Sealing may be a KMS round trip: it must not hold the store's write lock, which
    on a shared store every host's writes wait for."""
    env.call("CreateSecret", Name="app/db", SecretString="one")
    held = env.service.keys = _HeldKeys(env.service.keys)
    put = threading.Thread(target=env.call, args=("PutSecretValue",),
                           kwargs={"SecretId": "app/db", "SecretString": "two"})
    put.start()
    try:
        assert held.wrapping.wait(10)
        began = time.monotonic()
        with env.service.store.write() as writer:  # another writer, meanwhile
            writer.set_meta("probe", "written while a value was being sealed")
        waited = time.monotonic() - began
    finally:
        held.release.set()
        put.join(10)
    assert waited < 1.0
    assert env.call("GetSecretValue", SecretId="app/db")["SecretString"] == "two"


def test_a_value_sealed_ahead_for_another_key_is_sealed_again(env):
    """A secret whose KmsKeyId changed between the seal and the transaction gets its
    value wrapped under the key it has when the version is written."""
    env.call("CreateSecret", Name="app/db", SecretString="one")
    other = env.call("CreateKey", Alias="alias/other")["KeyId"]
    secret = env.service.catalog.get(env.service.catalog.id_by_name("app/db"))
    token = model.new_token()
    ahead = env.service._seal_ahead(secret, token, (b"two", False))
    env.call("UpdateSecret", SecretId="app/db", KmsKeyId="alias/other")
    fresh = env.service.catalog.get(secret.secret_id)
    with env.service.store.write() as writer:
        env.service._add_version(writer, fresh, token, (b"two", False), ["AWSCURRENT"],
                                 ahead=ahead)
    with env.service.store.read() as reader:
        assert reader.sealed_value(secret.secret_id, token).key_id == other
    env.service.catalog.refresh(secret.secret_id)
    assert env.call("GetSecretValue", SecretId="app/db")["SecretString"] == "two"


class _CountingKeys:
    """The service's own key provider, counting the data keys it unwraps."""

    def __init__(self, keys):
        self._keys = keys
        self.unwrapped = 0

    def __getattr__(self, name):
        return getattr(self._keys, name)

    def unwrap(self, *args):
        self.unwrapped += 1
        return self._keys.unwrap(*args)


def test_an_access_keys_secret_half_is_unwrapped_once_until_its_row_changes(env):
    """Each signed request looks its key up; with KMS an unwrap is a network round trip,
    so the opened secret half is kept while the stored row is the one it came from."""
    created = env.call("CreateAccessKey", Principal="uid:1000")
    key_id = created["AccessKeyId"]
    access_keys = env.service.access_keys
    counting = access_keys.keys = _CountingKeys(access_keys.keys)
    for _ in range(3):
        assert access_keys.credentials(key_id) == (created["SecretAccessKey"], "uid:1000")
    assert counting.unwrapped == 1
    # Re-wrapped under another data key blob (what re-encrypt does): opened afresh.
    with env.service.store.read() as reader:
        (_, master, old), = reader.wrapped_access_keys(None, 10)
    data_key = counting._keys.unwrap(master, old, wrapping_context(key_id))
    rewrapped = counting._keys.wrap(master, bytes(data_key), wrapping_context(key_id))
    with env.service.store.write() as writer:
        assert writer.rewrap_access_key(key_id, old, rewrapped, master)
    assert access_keys.credentials(key_id) == (created["SecretAccessKey"], "uid:1000")
    assert counting.unwrapped == 2
    env.call("DeleteAccessKey", AccessKeyId=key_id)
    assert access_keys.credentials(key_id) is None
