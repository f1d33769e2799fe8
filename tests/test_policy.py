"""Tier 1: the policy grammar, the access decision, and the policy actions of the service.

The decision is driven directly through `PolicySet.decide` with identities whose lazy
attributes are set by hand (no /proc, no passwd), then end to end through `service.call()`
with a caller whose uid has no passwd entry.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from secretfs.identity import FUSE, HTTPS, SYSTEM, UNIX_SOCKET, Caller, Identity, rotator_caller
from secretfs.model import (
    AccessDeniedException,
    InvalidParameterException,
    ResourceNotFoundException,
    Secret,
)
from secretfs.policy import (
    POLICY_MAX,
    MalformedPolicyDocumentException,
    PolicySet,
    PublicPolicyException,
    Request,
    grants_public_read,
    parse_policy,
    validate_policy,
)

pytest_plugins = ["_service_fixtures"]

ARN_PREFIX = "arn:aws:secretsmanager:us-east-1:123456789012:secret:"
NOW = datetime(2024, 5, 6, 15, 30, 12, tzinfo=UTC)
# A uid with no passwd entry: its identity resolves to no user name and no group names.
STRANGER = Caller(uid=54321, gid=54321, pid=0, source=UNIX_SOCKET)
ROTATING_NAME = "prod/rotating"


# --- building blocks ---------------------------------------------------------------------

def secret(name: str = "prod/db", tags: dict[str, str] | None = None,
           secret_id: int = 1) -> Secret:
    tags = {"team": "payments"} if tags is None else tags
    return Secret(secret_id=secret_id, name=name, arn=f"{ARN_PREFIX}{name}-AbCdEf", path=name,
                  description=None, kms_key_id=None, created=NOW, changed=NOW, accessed=None,
                  deleted=None, rotation=None, tags=tuple(tags.items()))


def identity(uid: int = 1000, gid: int = 1000, *, user: str | None = "alice",
             gids: set[int] | None = None, groups: set[str] | None = None,
             exe: str | None = "/usr/bin/python3",
             cgroup: str | None = "/system.slice/app.service", unit: str | None = "app.service",
             address: str | None = None, source: str = FUSE, pid: int = 4242) -> Identity:
    """An Identity whose lazy attributes are fixed here, so nothing is read from /proc."""
    who = Identity(Caller(uid=uid, gid=gid, pid=pid, source=source, address=address))
    who.__dict__.update(
        user=user,
        gids=frozenset({gid, 27} if gids is None else gids),
        groups=frozenset({"alice", "sudo"} if groups is None else groups),
        exe=exe, cgroup=cgroup, unit=unit)
    return who


ROTATING = {"name": ROTATING_NAME, "secret_id": 2}
ROTATOR = Identity(rotator_caller("secretfs:postgresql-single-user",
                                  f"{ARN_PREFIX}{ROTATING_NAME}-AbCdEf"))


def doc(*statements: dict) -> dict:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action="*", resource="*", **extra) -> dict:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action="*", resource="*", **extra) -> dict:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


def when(condition: dict, action="*", resource="*", **extra) -> dict:
    """An Allow statement with one Condition block."""
    return allow(action, resource, Sid="Cond", Condition=condition, **extra)


def everyone(statement: dict) -> dict:
    return {**statement, "Principal": "*"}


def unix(*principals: str) -> dict:
    return {"Unix": list(principals)}


def mine(*statements: dict) -> dict:
    """Identity policies: one document attached to uid 1000, named 'p'."""
    return {("uid:1000", "p"): doc(*statements)}


def decide(identity_policies: dict, resource_policy: dict | None, who: Identity,
           request: dict):
    request = dict(request)
    target = request.pop("secret", secret())
    if isinstance(target, dict):
        target = secret(**target)
    policies = PolicySet(
        identity={key: parse_policy(document, resource_policy=False)
                  for key, document in identity_policies.items()},
        resource={} if resource_policy is None or target is None else {
            target.secret_id: parse_policy(resource_policy, resource_policy=True)})
    request.setdefault("action", "GetSecretValue")
    request.setdefault("now", NOW)
    return policies.decide(who, Request(secret=target, **request))


GET = {"action": "GetSecretValue"}
CURRENT = {"action": "GetSecretValue", "stages": ("AWSCURRENT",)}
PREVIOUS = {"action": "GetSecretValue", "stages": ("AWSPREVIOUS",)}
ID = "identity-policy uid:1000/p#"

# (description, identity policies, resource policy, caller, request, allowed, decided_by)
DECISIONS = [
    # --- defaults and root
    ("no policy at all denies by default", {}, None, identity(), GET, False, "implicit-deny"),
    ("root is allowed with no policy", {}, None, identity(uid=0, gid=0, user="root"), GET,
     True, "root"),
    ("root is allowed even against an explicit Deny",
     {("uid:0", "p"): doc(deny())}, doc(everyone(deny(Sid="X"))),
     identity(uid=0, gid=0, user="root"), GET, True, "root"),
    ("a Deny alone grants nothing", mine(deny("secretsmanager:DeleteSecret")), None,
     identity(), GET, False, "implicit-deny"),
    # --- identity principals
    ("identity Allow by uid", {("uid:1000", "read"): doc(allow(Sid="ReadAll"))}, None,
     identity(), GET, True, "identity-policy uid:1000/read#ReadAll"),
    ("identity Allow by user", {("user:alice", "read"): doc(allow(Sid="R"))}, None,
     identity(), GET, True, "identity-policy user:alice/read#R"),
    ("identity Allow by supplementary gid", {("gid:27", "read"): doc(allow(Sid="R"))}, None,
     identity(), GET, True, "identity-policy gid:27/read#R"),
    ("identity Allow by supplementary group", {("group:sudo", "read"): doc(allow(Sid="R"))},
     None, identity(), GET, True, "identity-policy group:sudo/read#R"),
    ("identity Allow by unit glob", {("unit:app*.service", "read"): doc(allow(Sid="R"))},
     None, identity(), GET, True, "identity-policy unit:app*.service/read#R"),
    ("identity Allow by cgroup glob", {("cgroup:/system.slice/*", "r"): doc(allow(Sid="R"))},
     None, identity(), GET, True, "identity-policy cgroup:/system.slice/*/r#R"),
    ("identity Allow by exe", {("exe:/usr/bin/python3", "r"): doc(allow(Sid="R"))}, None,
     identity(), GET, True, "identity-policy exe:/usr/bin/python3/r#R"),
    ("a policy attached to another uid is ignored", {("uid:1001", "r"): doc(allow())}, None,
     identity(), GET, False, "implicit-deny"),
    ("a policy attached to another user is ignored", {("user:bob", "r"): doc(allow())}, None,
     identity(), GET, False, "implicit-deny"),
    ("a policy attached to a group the caller lacks is ignored",
     {("group:wheel", "r"): doc(allow())}, None, identity(), GET, False, "implicit-deny"),
    ("a Deny attached to another uid is ignored",
     {**mine(allow(Sid="A")), ("uid:1001", "d"): doc(deny())}, None, identity(), GET,
     True, f"{ID}A"),
    ("an exe principal does not match a caller without exe",
     {("exe:*", "r"): doc(allow())}, None, identity(exe=None), GET, False, "implicit-deny"),
    # --- resource policies
    ("resource Allow for a principal no identity policy names", {},
     doc(allow(Sid="Shared", Principal=unix("user:alice"))), identity(), GET,
     True, "resource-policy#Shared"),
    ("resource Allow for everyone", {}, doc(everyone(allow(Sid="All"))), identity(), GET,
     True, "resource-policy#All"),
    ("resource Allow for another principal grants nothing", {},
     doc(allow(Principal=unix("uid:1001", "group:wheel"))), identity(), GET,
     False, "implicit-deny"),
    ("resource Allow via NotPrincipal that excludes someone else", {},
     doc(allow(Sid="NP", NotPrincipal=unix("uid:1001"))), identity(), GET,
     True, "resource-policy#NP"),
    ("resource Deny via NotPrincipal spares the excluded caller",
     mine(allow(Sid="A")), doc(deny(Sid="NP", NotPrincipal=unix("user:alice"))), identity(),
     GET, True, f"{ID}A"),
    ("resource Deny via NotPrincipal hits everyone else",
     {("uid:1001", "p"): doc(allow())}, doc(deny(Sid="NP", NotPrincipal=unix("user:alice"))),
     identity(uid=1001, user="bob", gids={1001}, groups={"bob"}), GET,
     False, "resource-policy#NP"),
    # --- explicit Deny beats Allow
    ("identity Deny beats identity Allow in another policy",
     {("uid:1000", "a"): doc(allow(Sid="A")), ("group:sudo", "d"): doc(deny(Sid="D"))},
     None, identity(), GET, False, "identity-policy group:sudo/d#D"),
    ("identity Deny beats identity Allow in the same policy",
     mine(allow(Sid="A"), deny("secretsmanager:GetSecretValue", Sid="D")), None,
     identity(), GET, False, f"{ID}D"),
    ("resource Deny beats identity Allow", mine(allow(Sid="A")),
     doc(everyone(deny(Sid="NoOne"))), identity(), GET, False, "resource-policy#NoOne"),
    ("identity Deny beats resource Allow", mine(deny(Sid="D")),
     doc(everyone(allow(Sid="All"))), identity(), GET, False, f"{ID}D"),
    ("resource Deny beats resource Allow", {},
     doc(everyone(allow(Sid="All")), deny(Sid="D", Principal=unix("uid:1000"))), identity(),
     GET, False, "resource-policy#D"),
    ("decided_by names a statement without Sid by its index",
     mine(allow("secretsmanager:DeleteSecret"), allow()), None, identity(), GET,
     True, f"{ID}1"),
    # --- actions
    ("Action wildcard Get* allows GetSecretValue", mine(allow("secretsmanager:Get*", Sid="G")),
     None, identity(), GET, True, f"{ID}G"),
    ("Action wildcard Get* does not allow PutSecretValue",
     mine(allow("secretsmanager:Get*")), None, identity(), {"action": "PutSecretValue"},
     False, "implicit-deny"),
    ("Action names are case-insensitive", mine(allow("SecretsManager:getsecretVALUE", Sid="C")),
     None, identity(), GET, True, f"{ID}C"),
    ("Action '?' wildcard", mine(allow("secretsmanager:?etSecretValue", Sid="Q")), None,
     identity(), GET, True, f"{ID}Q"),
    ("NotAction allows what it doesn't name",
     mine(allow(Sid="N", NotAction="secretsmanager:DeleteSecret") | {"Action": None}), None,
     identity(), GET, True, f"{ID}N"),
    ("NotAction does not allow what it names",
     mine(allow(Sid="N", NotAction="secretsmanager:DeleteSecret") | {"Action": None}), None,
     identity(), {"action": "DeleteSecret"}, False, "implicit-deny"),
    ("Deny with NotAction spares the named actions",
     mine(allow(Sid="A"), deny(Sid="D", NotAction="secretsmanager:Describe*") | {"Action": None}),
     None, identity(), {"action": "DescribeSecret"}, True, f"{ID}A"),
    ("Deny with NotAction hits the rest",
     mine(allow(Sid="A"), deny(Sid="D", NotAction="secretsmanager:Describe*") | {"Action": None}),
     None, identity(), GET, False, f"{ID}D"),
    # --- resources
    ("Resource by ARN pattern", mine(allow(resource=f"{ARN_PREFIX}prod/*", Sid="R")), None,
     identity(), GET, True, f"{ID}R"),
    ("Resource by exact ARN", mine(allow(resource=f"{ARN_PREFIX}prod/db-AbCdEf", Sid="R")),
     None, identity(), GET, True, f"{ID}R"),
    ("Resource ARN pattern of another region", mine(allow(
        resource="arn:aws:secretsmanager:eu-west-1:*:secret:prod/*")), None, identity(), GET,
     False, "implicit-deny"),
    ("Resource by name pattern", mine(allow(resource="prod/*", Sid="R")), None, identity(),
     GET, True, f"{ID}R"),
    ("Resource name pattern of another prefix", mine(allow(resource="dev/*")), None,
     identity(), GET, False, "implicit-deny"),
    ("Resource '?' matches one character", mine(allow(resource="prod/d?", Sid="R")), None,
     identity(), GET, True, f"{ID}R"),
    ("Resource '?' matches exactly one character", mine(allow(resource="prod/d?")), None,
     identity(), {"action": "GetSecretValue", "secret": {"name": "prod/dbx"}},
     False, "implicit-deny"),
    ("NotResource excludes what it names", mine(allow(resource=None, NotResource="prod/*")),
     None, identity(), GET, False, "implicit-deny"),
    ("NotResource allows the rest", mine(allow(resource=None, NotResource="prod/*", Sid="N")),
     None, identity(), {"action": "GetSecretValue", "secret": {"name": "dev/db"}},
     True, f"{ID}N"),
    ("ListSecrets needs Resource '*'", mine(allow(resource="prod/*")), None, identity(),
     {"action": "ListSecrets", "secret": None}, False, "implicit-deny"),
    ("ListSecrets with Resource '*'", mine(allow("secretsmanager:ListSecrets", Sid="L")), None,
     identity(), {"action": "ListSecrets", "secret": None}, True, f"{ID}L"),
    ("GetRandomPassword needs Resource '*'", mine(allow(resource=f"{ARN_PREFIX}*")), None,
     identity(), {"action": "GetRandomPassword", "secret": None}, False, "implicit-deny"),
    ("GetRandomPassword with Resource '*'", mine(allow(Sid="P")), None, identity(),
     {"action": "GetRandomPassword", "secret": None}, True, f"{ID}P"),
    # --- string conditions on the secret
    ("StringEquals on Name, equal", mine(when({"StringEquals": {"secretsmanager:Name":
                                                                   "prod/db"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on Name, different", mine(when({"StringEquals": {"secretsmanager:Name":
                                                                       "prod/api"}})),
     None, identity(), GET, False, "implicit-deny"),
    ("StringNotEquals on Name", mine(when({"StringNotEquals": {"secretsmanager:Name":
                                                                  ["dev/db", "prod/api"]}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringNotEquals on Name, equal", mine(when({"StringNotEquals": {
        "secretsmanager:Name": "prod/db"}})), None, identity(), GET, False, "implicit-deny"),
    ("StringLike on Name", mine(when({"StringLike": {"secretsmanager:Name": "prod/*"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringNotLike on Name", mine(when({"StringNotLike": {"secretsmanager:Name": "prod/*"}})),
     None, identity(), GET, False, "implicit-deny"),
    ("StringEqualsIgnoreCase on Name", mine(when({"StringEqualsIgnoreCase": {
        "secretsmanager:Name": "PROD/DB"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("condition keys are case-insensitive", mine(when({"StringEquals": {
        "SecretsManager:NAME": "prod/db"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on VersionStage, AWSCURRENT read",
     mine(when({"StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"}})), None,
     identity(), CURRENT, True, f"{ID}Cond"),
    ("StringEquals on VersionStage, AWSPREVIOUS read",
     mine(when({"StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"}})), None,
     identity(), PREVIOUS, False, "implicit-deny"),
    ("StringEquals on VersionStage, one of several stages matches",
     mine(when({"StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"}})), None,
     identity(), {"action": "GetSecretValue", "stages": ("AWSPENDING", "AWSCURRENT")},
     True, f"{ID}Cond"),
    ("StringNotEquals on VersionStage fails when any stage is named",
     mine(when({"StringNotEquals": {"secretsmanager:VersionStage": "AWSPENDING"}})), None,
     identity(), {"action": "GetSecretValue", "stages": ("AWSCURRENT", "AWSPENDING")},
     False, "implicit-deny"),
    ("Deny on AWSPREVIOUS applies to a read of AWSPREVIOUS",
     mine(allow(Sid="A"), deny(Sid="Old", Condition={"StringEquals": {
         "secretsmanager:VersionStage": "AWSPREVIOUS"}})), None, identity(), PREVIOUS,
     False, f"{ID}Old"),
    ("Deny on AWSPREVIOUS spares a read of AWSCURRENT",
     mine(allow(Sid="A"), deny(Sid="Old", Condition={"StringEquals": {
         "secretsmanager:VersionStage": "AWSPREVIOUS"}})), None, identity(), CURRENT,
     True, f"{ID}A"),
    ("StringEquals on VersionId", mine(when({"StringEquals": {"secretsmanager:VersionId":
                                                                 "v-1"}})),
     None, identity(), {"action": "GetSecretValue", "version_id": "v-1"}, True, f"{ID}Cond"),
    ("secretsmanager:ResourceTag", mine(when({"StringEquals": {
        "secretsmanager:ResourceTag/team": "payments"}})), None, identity(), GET,
     True, f"{ID}Cond"),
    ("aws:ResourceTag, other value", mine(when({"StringEquals": {
        "aws:ResourceTag/team": "payments"}})), None, identity(),
     {"action": "GetSecretValue", "secret": {"tags": {"team": "billing"}}},
     False, "implicit-deny"),
    ("aws:ResourceTag on an untagged secret", mine(when({"StringEquals": {
        "aws:ResourceTag/team": "payments"}})), None, identity(),
     {"action": "GetSecretValue", "secret": {"tags": {}}}, False, "implicit-deny"),
    ("StringNotEquals on a missing tag is true", mine(when({"StringNotEquals": {
        "aws:ResourceTag/team": "payments"}})), None, identity(),
     {"action": "GetSecretValue", "secret": {"tags": {}}}, True, f"{ID}Cond"),
    # --- conditions on the caller
    ("StringEquals on secretfs:Uid", mine(when({"StringEquals": {"secretfs:Uid": "1000"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on secretfs:User", mine(when({"StringEquals": {"secretfs:User": "alice"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on secretfs:User, another user", mine(when({"StringEquals": {
        "secretfs:User": "bob"}})), None, identity(), GET, False, "implicit-deny"),
    ("StringEquals on secretfs:Group matches any group", mine(when({"StringEquals": {
        "secretfs:Group": "sudo"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("StringLike on secretfs:Unit", mine(when({"StringLike": {"secretfs:Unit": "*.service"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on secretfs:Exe", mine(when({"StringEquals": {
        "secretfs:Exe": "/usr/bin/python3"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("StringEquals on secretfs:Exe, other binary", mine(when({"StringEquals": {
        "secretfs:Exe": "/usr/bin/cat"}})), None, identity(), GET, False, "implicit-deny"),
    ("StringLike on secretfs:Cgroup", mine(when({"StringLike": {
        "secretfs:Cgroup": "/system.slice/*"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("NumericLessThan on secretfs:Uid", mine(when({"NumericLessThan": {"secretfs:Uid": 2000}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("NumericLessThan on secretfs:Uid, not less", mine(when({"NumericLessThan": {
        "secretfs:Uid": "1000"}})), None, identity(), GET, False, "implicit-deny"),
    ("NumericLessThanEquals on secretfs:Uid", mine(when({"NumericLessThanEquals": {
        "secretfs:Uid": "1000"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("NumericGreaterThan on secretfs:Uid", mine(when({"NumericGreaterThan": {
        "secretfs:Uid": 999}})), None, identity(), GET, True, f"{ID}Cond"),
    ("NumericGreaterThanEquals on secretfs:Uid, below", mine(when({"NumericGreaterThanEquals": {
        "secretfs:Uid": 1001}})), None, identity(), GET, False, "implicit-deny"),
    ("NumericEquals on secretfs:Uid", mine(when({"NumericEquals": {"secretfs:Uid": [5, 1000]}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("NumericNotEquals on secretfs:Uid", mine(when({"NumericNotEquals": {
        "secretfs:Uid": 1000}})), None, identity(), GET, False, "implicit-deny"),
    ("Bool on aws:SecureTransport", mine(when({"Bool": {"aws:SecureTransport": "true"}})),
     None, identity(), GET, True, f"{ID}Cond"),
    ("Bool false on aws:SecureTransport", mine(when({"Bool": {"aws:SecureTransport": False}})),
     None, identity(), GET, False, "implicit-deny"),
    ("DateLessThan on aws:CurrentTime, before", mine(when({"DateLessThan": {
        "aws:CurrentTime": "2025-01-01T00:00:00Z"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("DateLessThan on aws:CurrentTime, after", mine(when({"DateLessThan": {
        "aws:CurrentTime": "2024-01-01T00:00:00Z"}})), None, identity(), GET,
     False, "implicit-deny"),
    ("DateGreaterThan on aws:CurrentTime, after", mine(when({"DateGreaterThan": {
        "aws:CurrentTime": "2024-05-06T15:30:11Z"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("DateGreaterThan on aws:CurrentTime, before", mine(when({"DateGreaterThan": {
        "aws:CurrentTime": "2024-05-06T15:30:13Z"}})), None, identity(), GET,
     False, "implicit-deny"),
    ("DateGreaterThan follows the injected clock", mine(when({"DateGreaterThan": {
        "aws:CurrentTime": "2024-05-06T15:30:13Z"}})), None, identity(),
     {"action": "GetSecretValue", "now": datetime(2030, 1, 1, tzinfo=UTC)}, True, f"{ID}Cond"),
    ("NumericLessThan on aws:EpochTime", mine(when({"NumericLessThan": {
        "aws:EpochTime": int(NOW.timestamp()) + 1}})), None, identity(), GET, True, f"{ID}Cond"),
    ("IpAddress, inside the block", mine(when({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
     None, identity(address="10.1.2.3", source=HTTPS), GET, True, f"{ID}Cond"),
    ("IpAddress, outside the block", mine(when({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
     None, identity(address="192.168.1.9", source=HTTPS), GET, False, "implicit-deny"),
    ("IpAddress, no address (local caller) is false", mine(when({"IpAddress": {
        "aws:SourceIp": "10.0.0.0/8"}})), None, identity(), GET, False, "implicit-deny"),
    ("NotIpAddress, outside the block", mine(when({"NotIpAddress": {
        "aws:SourceIp": ["10.0.0.0/8", "fd00::/8"]}})), None,
     identity(address="192.168.1.9", source=HTTPS), GET, True, f"{ID}Cond"),
    ("NotIpAddress, inside the block", mine(when({"NotIpAddress": {
        "aws:SourceIp": "10.0.0.0/8"}})), None, identity(address="10.9.9.9", source=HTTPS), GET,
     False, "implicit-deny"),
    ("NotIpAddress, no address is true", mine(when({"NotIpAddress": {
        "aws:SourceIp": "10.0.0.0/8"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("IpAddressIfExists, no address", mine(when({"IpAddressIfExists": {
        "aws:SourceIp": "10.0.0.0/8"}})), None, identity(), GET, True, f"{ID}Cond"),
    ("IpAddressIfExists, address outside", mine(when({"IpAddressIfExists": {
        "aws:SourceIp": "10.0.0.0/8"}})), None, identity(address="192.168.1.9", source=HTTPS),
     GET, False, "implicit-deny"),
    ("StringEqualsIfExists, no exe", mine(when({"StringEqualsIfExists": {
        "secretfs:Exe": "/usr/bin/app"}})), None, identity(exe=None), GET, True, f"{ID}Cond"),
    ("Null true, key absent", mine(when({"Null": {"aws:SourceIp": "true"}})), None,
     identity(), GET, True, f"{ID}Cond"),
    ("Null true, key present", mine(when({"Null": {"aws:SourceIp": "true"}})), None,
     identity(address="10.1.2.3", source=HTTPS), GET, False, "implicit-deny"),
    ("Null false, tag absent", mine(when({"Null": {"aws:ResourceTag/owner": "false"}})), None,
     identity(), GET, False, "implicit-deny"),
    ("Null false, tag present", mine(when({"Null": {"aws:ResourceTag/team": False}})), None,
     identity(), GET, True, f"{ID}Cond"),
    ("ForAnyValue:StringEquals on groups", mine(when({"ForAnyValue:StringEquals": {
        "secretfs:Group": ["wheel", "sudo"]}})), None, identity(), GET, True, f"{ID}Cond"),
    ("ForAnyValue:StringEquals on groups, none", mine(when({"ForAnyValue:StringEquals": {
        "secretfs:Group": ["wheel", "adm"]}})), None, identity(), GET, False, "implicit-deny"),
    ("ForAllValues:StringEquals on groups, all listed", mine(when({"ForAllValues:StringEquals": {
        "secretfs:Group": ["alice", "sudo", "docker"]}})), None, identity(), GET,
     True, f"{ID}Cond"),
    ("ForAllValues:StringEquals on groups, one unlisted", mine(when({
        "ForAllValues:StringEquals": {"secretfs:Group": ["alice"]}})), None, identity(), GET,
     False, "implicit-deny"),
    ("ForAllValues on a caller with no group names is vacuously true", mine(when({
        "ForAllValues:StringEquals": {"secretfs:Group": ["alice"]}})), None,
     identity(groups=set()), GET, True, f"{ID}Cond"),
    ("ForAnyValue on a caller with no group names is false", mine(when({
        "ForAnyValue:StringEquals": {"secretfs:Group": ["alice"]}})), None,
     identity(groups=set()), GET, False, "implicit-deny"),
    ("ForAllValues:StringNotEquals on groups", mine(when({"ForAllValues:StringNotEquals": {
        "secretfs:Group": ["wheel"]}})), None, identity(), GET, True, f"{ID}Cond"),
    # --- missing keys
    ("missing key: positive operator is false", mine(when({"StringEquals": {
        "secretfs:Exe": "/usr/bin/app"}})), None, identity(exe=None), GET,
     False, "implicit-deny"),
    ("missing key: negated operator is true", mine(when({"StringNotEquals": {
        "secretfs:Exe": "/usr/bin/app"}})), None, identity(exe=None), GET, True, f"{ID}Cond"),
    ("missing key: StringLike on an unnamed version's stage", mine(when({"StringLike": {
        "secretsmanager:VersionStage": "*"}})), None, identity(), GET, False, "implicit-deny"),
    ("missing key: StringLike '*' on a caller without user name", mine(when({"StringLike": {
        "secretfs:User": "*"}})), None, identity(user=None), GET, False, "implicit-deny"),
    ("missing key in a Deny: the Deny does not apply",
     mine(allow(Sid="A"), deny(Sid="D", Condition={"StringEquals": {"secretfs:Unit":
                                                                     "evil.service"}})),
     None, identity(unit=None, cgroup=None), GET, True, f"{ID}A"),
    ("missing key in a negated Deny: the Deny applies",
     mine(allow(Sid="A"), deny(Sid="D", Condition={"StringNotEquals": {"secretfs:Unit":
                                                                        "app.service"}})),
     None, identity(unit=None, cgroup=None), GET, False, f"{ID}D"),
    ("all conditions of a statement must hold", mine(when({
        "StringEquals": {"secretfs:User": "alice", "secretsmanager:Name": "prod/api"}})),
     None, identity(), GET, False, "implicit-deny"),
    ("resource policy with a condition on the caller", {},
     doc(everyone(allow(Sid="Svc", Condition={"StringEquals": {"secretfs:Unit":
                                                                  "app.service"}}))),
     identity(), GET, True, "resource-policy#Svc"),
    # --- rotators: their own principal, a standing grant for the secret they rotate
    ("a rotator reads the secret it rotates with no policy", {}, None, ROTATOR,
     {"action": "GetSecretValue", "secret": ROTATING}, True, "rotation-session"),
    ("a rotator writes the pending version of its secret", {}, None, ROTATOR,
     {"action": "PutSecretValue", "secret": ROTATING}, True, "rotation-session"),
    ("a rotator draws passwords", {}, None, ROTATOR,
     {"action": "GetRandomPassword", "secret": None}, True, "rotation-session"),
    ("a rotator may not delete the secret it rotates", {}, None, ROTATOR,
     {"action": "DeleteSecret", "secret": ROTATING}, False, "implicit-deny"),
    ("a rotator may not read another secret", {}, None, ROTATOR, GET, False, "implicit-deny"),
    ("a rotator is not root, though its uid is none", {("uid:0", "p"): doc(allow())}, None,
     ROTATOR, GET, False, "implicit-deny"),
    ("a rotator principal's grant reaches another secret",
     {("rotator:secretfs:postgresql-*", "m"): doc(allow("secretsmanager:GetSecretValue",
                                                         Sid="Master"))},
     None, ROTATOR, GET, True, "identity-policy rotator:secretfs:postgresql-*/m#Master"),
    ("a rotator principal's grant is not another rotator's",
     {("rotator:exec:*", "m"): doc(allow())}, None, ROTATOR, GET, False, "implicit-deny"),
    ("a rotator principal matches no Unix caller",
     {("rotator:*", "m"): doc(allow())}, None, identity(), GET, False, "implicit-deny"),
    ("an explicit Deny beats a rotator's standing grant",
     {("rotator:*", "d"): doc(deny("secretsmanager:PutSecretValue", Sid="Freeze"))}, None,
     ROTATOR, {"action": "PutSecretValue", "secret": ROTATING}, False,
     "identity-policy rotator:*/d#Freeze"),
    ("a resource policy names a rotator in Principal", {},
     doc(allow("secretsmanager:GetSecretValue", Sid="R",
               Principal=unix("rotator:secretfs:postgresql-single-user"))),
     ROTATOR, GET, True, "resource-policy#R"),
    ("a rotator is matched by the secretfs:Rotator key",
     {("rotator:*", "c"): doc(when({"StringLike": {"secretfs:Rotator": "secretfs:*"}}))},
     None, ROTATOR, GET, True, "identity-policy rotator:*/c#Cond"),
]


def _without_none(document):
    """Lets a row write `allow(...) | {"Action": None}` to drop Action for NotAction."""
    if isinstance(document, dict):
        return {key: _without_none(value) for key, value in document.items() if value is not None}
    if isinstance(document, list):
        return [_without_none(item) for item in document]
    return document


@pytest.mark.parametrize(
    ("identity_policies", "resource_policy", "who", "request_", "allowed", "decided_by"),
    [pytest.param(*row[1:], id=row[0]) for row in DECISIONS])
def test_decision(identity_policies, resource_policy, who, request_, allowed, decided_by):
    decision = decide({key: _without_none(value) for key, value in identity_policies.items()},
                      None if resource_policy is None else _without_none(resource_policy),
                      who, request_)
    assert decision.allowed is allowed
    assert decided_by in decision.decided_by


def test_decision_table_is_large_and_its_ids_unique():
    assert len(DECISIONS) >= 40
    assert len({row[0] for row in DECISIONS}) == len(DECISIONS)


def test_lazy_attributes_are_read_only_when_a_policy_asks():
    """A uid policy never resolves the caller's exe, cgroup or groups."""
    who = Identity(Caller(uid=1000, gid=1000, pid=0, source=FUSE))
    policies = PolicySet(identity={("uid:1000", "p"): parse_policy(
        doc(allow()), resource_policy=False)})
    assert policies.decide(who, Request("GetSecretValue", secret())).allowed
    assert not {"exe", "cgroup", "unit", "groups", "gids"} & set(vars(who))


def test_for_any_value_with_a_negated_operator_needs_only_one_value_outside():
    decision = decide(mine(when({"ForAnyValue:StringNotEquals": {"secretfs:Group": "sudo"}})),
                      None, identity(groups={"alice", "sudo"}), GET)
    assert decision.allowed, "the group 'alice' is not 'sudo'"


# --- the grammar -------------------------------------------------------------------------

GOOD_RESOURCE_POLICY = doc(
    {"Sid": "Read", "Effect": "Allow", "Principal": unix("uid:1000", "group:www-data"),
     "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
     "Resource": "*",
     "Condition": {"StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"},
                   "IpAddressIfExists": {"aws:SourceIp": "10.0.0.0/8"}}},
    {"Sid": "NoDelete", "Effect": "Deny", "Principal": "*", "NotAction": "secretsmanager:Get*",
     "NotResource": f"{ARN_PREFIX}other-*"})


def statement(**fields) -> dict:
    base = {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": "*"}
    return _without_none({**base, **fields})


def resource_doc(**fields) -> dict:
    return doc(statement(**{"Principal": unix("uid:1000"), **fields}))


GRAMMAR = [
    # (id, document, resource_policy, location, message fragment)
    ("not JSON", '{"Version": "2012-10-17",\n  "Statement": [}', True, "line 2 column",
     "not valid JSON"),
    ("not an object", "[1, 2]", True, "$", "JSON object"),
    ("a JSON string", '"Allow"', False, "$", "JSON object"),
    ("missing Statement", {"Version": "2012-10-17"}, True, "$.Statement", "required"),
    ("unknown top-level key", {**GOOD_RESOURCE_POLICY, "Statements": []}, True,
     "$.Statements", "unknown element"),
    ("bad Version", {**GOOD_RESOURCE_POLICY, "Version": "2024-01-01"}, True, "$.Version",
     "2012-10-17"),
    ("bad Effect", resource_doc(Effect="allow"), True, "$.Statement[0].Effect",
     "Allow"),
    ("both Action and NotAction", resource_doc(NotAction="secretsmanager:DeleteSecret"), True,
     "$.Statement[0].Action", "exactly one"),
    ("neither Action nor NotAction", resource_doc(Action=None), True,
     "$.Statement[0].Action", "exactly one"),
    ("non-string action", resource_doc(Action=["secretsmanager:GetSecretValue", 7]), True,
     "$.Statement[0].Action", "string"),
    ("empty action list", resource_doc(Action=[]), True, "$.Statement[0].Action", "string"),
    ("action of another service", resource_doc(Action="s3:GetObject"), True,
     "$.Statement[0].Action", "not a secretsmanager action"),
    ("NotAction of another service", resource_doc(Action=None, NotAction="kms:Decrypt"), True,
     "$.Statement[0].NotAction", "not a secretsmanager action"),
    ("neither Resource nor NotResource", resource_doc(Resource=None), True,
     "$.Statement[0].Resource", "exactly one"),
    ("unknown statement key", resource_doc(Actions="*"), True, "$.Statement[0].Actions",
     "unknown element"),
    ("Principal in an identity policy", doc(statement(Principal="*")), False,
     "$.Statement[0].Principal", "identity policy"),
    ("NotPrincipal in an identity policy", doc(statement(NotPrincipal=unix("uid:1"))), False,
     "$.Statement[0].Principal", "identity policy"),
    ("missing Principal in a resource policy", doc(statement()), True,
     "$.Statement[0].Principal", "Principal"),
    ("uid that is not a number", resource_doc(Principal=unix("uid:abc")), True,
     "$.Statement[0].Principal.Unix[0]", "number"),
    ("unknown principal kind", resource_doc(Principal=unix("uid:1", "host:x")), True,
     "$.Statement[0].Principal.Unix[1]", "KIND"),
    ("empty principal", resource_doc(Principal=unix("")), True,
     "$.Statement[0].Principal.Unix[0]", "KIND:VALUE"),
    ("principal without value", resource_doc(Principal=unix("user:")), True,
     "$.Statement[0].Principal.Unix[0]", "non-empty"),
    ("Principal of another shape", resource_doc(Principal={"AWS": "arn:aws:iam::1:root"}), True,
     "$.Statement[0].Principal", "Unix"),
    ("no principal in the list", resource_doc(Principal=unix()), True,
     "$.Statement[0].Principal.Unix", "no principal"),
    ("unknown condition operator", resource_doc(Condition={"StringMatches": {
        "secretsmanager:Name": "x"}}), True, "$.Statement[0].Condition.StringMatches",
     "unknown condition operator"),
    ("unknown set operator", resource_doc(Condition={"ForSomeValues:StringEquals": {
        "secretfs:Group": "x"}}), True, "$.Statement[0].Condition.ForSomeValues:StringEquals",
     "set operator"),
    ("NullIfExists", resource_doc(Condition={"NullIfExists": {"aws:SourceIp": "true"}}), True,
     "$.Statement[0].Condition.NullIfExists", "unknown condition operator"),
    ("unknown condition key", resource_doc(Condition={"StringEquals": {
        "secretsmanager:Colour": "x"}}), True,
     "$.Statement[0].Condition.StringEquals.secretsmanager:Colour", "unknown condition key"),
    ("tag key without a tag", resource_doc(Condition={"StringEquals": {
        "aws:ResourceTag/": "x"}}), True, "$.Statement[0].Condition.StringEquals",
     "unknown condition key"),
    ("bad numeric value", resource_doc(Condition={"NumericLessThan": {
        "secretfs:Uid": "many"}}), True, "$.Statement[0].Condition.NumericLessThan.secretfs:Uid",
     "not a number"),
    ("boolean as a number", resource_doc(Condition={"NumericEquals": {"secretfs:Uid": True}}),
     True, "$.Statement[0].Condition.NumericEquals.secretfs:Uid", "not a number"),
    ("bad date value", resource_doc(Condition={"DateLessThan": {
        "aws:CurrentTime": "next tuesday"}}), True,
     "$.Statement[0].Condition.DateLessThan.aws:CurrentTime", "date"),
    ("bad ip value", resource_doc(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.300"}}), True,
     "$.Statement[0].Condition.IpAddress.aws:SourceIp", "IP address"),
    ("bad bool value", resource_doc(Condition={"Bool": {"aws:SecureTransport": "yes"}}), True,
     "$.Statement[0].Condition.Bool.aws:SecureTransport", "true or false"),
    ("condition values of a bad type", resource_doc(Condition={"StringEquals": {
        "secretsmanager:Name": {"a": 1}}}), True,
     "$.Statement[0].Condition.StringEquals.secretsmanager:Name", "values must be"),
    ("condition block not an object", resource_doc(Condition={"StringEquals": "x"}), True,
     "$.Statement[0].Condition.StringEquals", "must map"),
    ("duplicate Sid", doc(statement(Sid="Same"), statement(Sid="Same", Action="*")), False,
     "$.Statement", "duplicate Sid 'Same'"),
    ("Sid with punctuation", doc(statement(Sid="no-dashes")), False, "$.Statement[0].Sid",
     "letters and digits"),
    ("statement not an object", doc("Allow"), False, "$.Statement[0]", "JSON object"),
    ("string over the size limit", json.dumps(GOOD_RESOURCE_POLICY) + " " * POLICY_MAX, True,
     "$", f"maximum is {POLICY_MAX}"),
    ("object over the size limit", doc(statement(Resource=[f"{ARN_PREFIX}s{i:05}-*"
                                                           for i in range(400)])),
     False, "$", f"maximum is {POLICY_MAX}"),
]


@pytest.mark.parametrize(("document", "resource_policy", "location", "message"),
                         [pytest.param(*row[1:], id=row[0]) for row in GRAMMAR])
def test_grammar_error_is_located(document, resource_policy, location, message):
    errors = validate_policy(document, resource_policy=resource_policy)
    assert any(error.location.startswith(location) and message in error.message
               for error in errors), errors
    with pytest.raises(MalformedPolicyDocumentException, match=f"{len(errors)} error"):
        parse_policy(document, resource_policy=resource_policy)


def test_json_error_gives_line_and_column():
    [error] = validate_policy('{\n  "Version": "2012-10-17",\n  "Statement": [,]\n}',
                              resource_policy=False)
    assert error.location == "line 3 column 17"


def test_every_error_of_a_document_is_reported():
    document = {
        "Version": "1999-01-01",                                  # 1
        "Extra": True,                                            # 2
        "Statement": [
            {"Effect": "Perhaps", "Action": "*", "Resource": "*"},  # 3
            {"Effect": "Allow", "Action": "*", "NotAction": "*",    # 4
             "Resource": "*", "Colour": "blue",                     # 5
             "Condition": {"NumericLessThan": {"secretfs:Uid": "x"},  # 6
                           "StringEquals": {"aws:Nope": "y"}}},       # 7
            {"Effect": "Allow", "Action": "ec2:RunInstances",       # 8
             "Resource": "*", "Principal": "*"},                    # 9
        ],
    }
    errors = validate_policy(document, resource_policy=False)
    assert len(errors) == 9, errors
    assert {error.location for error in errors} == {
        "$.Version", "$.Extra", "$.Statement[0].Effect", "$.Statement[1].Action",
        "$.Statement[1].Colour", "$.Statement[1].Condition.NumericLessThan.secretfs:Uid",
        "$.Statement[1].Condition.StringEquals.aws:Nope", "$.Statement[2].Action",
        "$.Statement[2].Principal"}
    with pytest.raises(MalformedPolicyDocumentException, match="9 error"):
        parse_policy(document, resource_policy=False)


@pytest.mark.parametrize("document", [
    GOOD_RESOURCE_POLICY,
    json.dumps(GOOD_RESOURCE_POLICY, indent=2),
    {"Statement": {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "*",
                   "Resource": "*"}},
    doc(allow(
        Principal=unix("uid:1", "user:a", "gid:2", "group:g", "unit:x.service", "cgroup:/a/*",
                       "exe:/bin/?h"),
        Condition={"ForAllValues:StringLike": {"secretfs:Group": "*"},
                   "NumericLessThanEquals": {"secretfs:Pid": 10},
                   "DateGreaterThanEquals": {"aws:CurrentTime": 1700000000},
                   "Null": {"secretsmanager:ResourceTag/Team": "false"},
                   "Bool": {"aws:SecureTransport": True},
                   "StringNotEqualsIgnoreCase": {"secretfs:Source": "HTTP"}})),
    json.dumps(GOOD_RESOURCE_POLICY).ljust(POLICY_MAX),
], ids=["object", "text", "single statement, AWS *", "every principal and operator kind",
        "exactly the size limit"])
def test_valid_resource_policy_has_no_errors(document):
    assert validate_policy(document, resource_policy=True) == []
    assert parse_policy(document, resource_policy=True).statements


def test_valid_identity_policy_has_no_errors():
    document = doc(allow("secretsmanager:Get*", "prod/*", Sid="Read"),
                   deny(Sid="NoDelete", NotAction=["secretsmanager:Describe*",
                                                   "secretsmanager:Get*"]) | {"Action": None})
    assert validate_policy(_without_none(document), resource_policy=False) == []


def test_grants_public_read():
    public = parse_policy(doc(everyone(allow("secretsmanager:Get*"))), resource_policy=True)
    named = parse_policy(doc(allow(Principal=unix("uid:1000"))), resource_policy=True)
    describe_only = parse_policy(doc(everyone(allow("secretsmanager:DescribeSecret"))),
                                 resource_policy=True)
    public_deny = parse_policy(doc(everyone(deny())), resource_policy=True)
    assert grants_public_read(public)
    assert not grants_public_read(named)
    assert not grants_public_read(describe_only)
    assert not grants_public_read(public_deny)


def test_allow_with_not_principal_is_a_public_read():
    policy = parse_policy(doc(allow("secretsmanager:GetSecretValue",
                                    NotPrincipal=unix("uid:1000"))), resource_policy=True)
    assert grants_public_read(policy)


def test_may_grant_read():
    target = secret()
    other = secret("dev/db", secret_id=2)

    def parsed(document, resource=False):
        return parse_policy(document, resource_policy=resource)

    assert not PolicySet().may_grant_read(target)
    describe = PolicySet(identity={("uid:1", "p"): parsed(doc(allow(
        "secretsmanager:DescribeSecret")))})
    assert not describe.may_grant_read(target)
    elsewhere = PolicySet(identity={("uid:1", "p"): parsed(doc(allow(resource="dev/*")))})
    assert not elsewhere.may_grant_read(target)
    assert elsewhere.may_grant_read(other)
    only_deny = PolicySet(identity={("uid:1", "p"): parsed(doc(deny()))})
    assert not only_deny.may_grant_read(target)
    # Conditions and principals aside: a conditional grant to anyone still counts.
    conditional = PolicySet(identity={("user:nobody", "p"): parsed(doc(when({
        "StringEquals": {"secretsmanager:VersionStage": "AWSPREVIOUS"}})))})
    assert conditional.may_grant_read(target)
    resource = PolicySet(resource={1: parsed(doc(allow(Principal=unix("uid:7"))), True)})
    assert resource.may_grant_read(target)
    assert not resource.may_grant_read(other)


# --- through the service -----------------------------------------------------------------

def resource_policy_text(*statements: dict) -> str:
    return json.dumps(doc(*statements))


READ_FOR_STRANGER = resource_policy_text(
    allow("secretsmanager:GetSecretValue", Sid="Stranger", Principal=unix("uid:54321")))


def test_resource_policy_round_trip(call, svc):
    created = call("CreateSecret", Name="prod/db", SecretString="s3cret")
    assert "ResourcePolicy" not in call("GetResourcePolicy", SecretId="prod/db")
    put = call("PutResourcePolicy", SecretId="prod/db", ResourcePolicy=READ_FOR_STRANGER)
    assert put == {"ARN": created["ARN"], "Name": "prod/db"}
    got = call("GetResourcePolicy", SecretId=created["ARN"])
    assert got["ARN"] == created["ARN"] and got["Name"] == "prod/db"
    assert json.loads(got["ResourcePolicy"]) == json.loads(READ_FOR_STRANGER)
    assert call("GetSecretValue", STRANGER, SecretId="prod/db")["SecretString"] == "s3cret"
    assert call("DeleteResourcePolicy", SecretId="prod/db") == put
    assert "ResourcePolicy" not in call("GetResourcePolicy", SecretId="prod/db")
    with pytest.raises(AccessDeniedException, match="implicit-deny"):
        call("GetSecretValue", STRANGER, SecretId="prod/db")


def test_validate_resource_policy(call):
    bad = json.dumps(doc(statement(Effect="Maybe", Principal=unix("uid:1", "host:x"))))
    result = call("ValidateResourcePolicy", ResourcePolicy=bad)
    assert result["PolicyValidationPassed"] is False
    assert {entry["CheckName"] for entry in result["ValidationErrors"]} == {
        "$.Statement[0].Effect", "$.Statement[0].Principal.Unix[1]"}
    assert all(set(entry) == {"CheckName", "ErrorMessage"} and entry["ErrorMessage"]
               for entry in result["ValidationErrors"])
    good = call("ValidateResourcePolicy", ResourcePolicy=READ_FOR_STRANGER)
    assert good == {"PolicyValidationPassed": True, "ValidationErrors": []}
    call("CreateSecret", Name="s", SecretString="x")
    assert call("ValidateResourcePolicy", SecretId="s",
                ResourcePolicy="{")["PolicyValidationPassed"] is False


def test_malformed_resource_policy_is_refused_and_nothing_stored(call):
    call("CreateSecret", Name="s", SecretString="x")
    call("PutResourcePolicy", SecretId="s", ResourcePolicy=READ_FOR_STRANGER)
    before = call("DescribeSecret", SecretId="s")
    with pytest.raises(MalformedPolicyDocumentException, match="Effect"):
        call("PutResourcePolicy", SecretId="s",
             ResourcePolicy=json.dumps(doc(statement(Effect="Maybe", Principal="*"))))
    assert call("GetResourcePolicy", SecretId="s")["ResourcePolicy"] == READ_FOR_STRANGER
    assert call("DescribeSecret", SecretId="s") == before
    assert call("GetSecretValue", STRANGER, SecretId="s")["SecretString"] == "x"


def test_public_read_policy_needs_block_public_policy_false(call):
    call("CreateSecret", Name="s", SecretString="x")
    public = resource_policy_text(everyone(allow("secretsmanager:GetSecretValue")))
    for block in (None, True):
        params = {} if block is None else {"BlockPublicPolicy": block}
        with pytest.raises(PublicPolicyException):
            call("PutResourcePolicy", SecretId="s", ResourcePolicy=public, **params)
        assert "ResourcePolicy" not in call("GetResourcePolicy", SecretId="s")
    with pytest.raises(AccessDeniedException):
        call("GetSecretValue", STRANGER, SecretId="s")
    call("PutResourcePolicy", SecretId="s", ResourcePolicy=public, BlockPublicPolicy=False)
    assert call("GetSecretValue", STRANGER, SecretId="s")["SecretString"] == "x"
    # Public, but not a read: allowed without asking.
    call("PutResourcePolicy", SecretId="s", ResourcePolicy=resource_policy_text(
        everyone(allow("secretsmanager:DescribeSecret"))))


def test_not_principal_read_policy_is_public(call):
    call("CreateSecret", Name="s", SecretString="x")
    with pytest.raises(PublicPolicyException):
        call("PutResourcePolicy", SecretId="s", ResourcePolicy=resource_policy_text(
            allow("secretsmanager:GetSecretValue", NotPrincipal=unix("uid:1000"))))


def test_identity_policy_put_get_list_delete(call):
    document = json.dumps(doc(allow("secretsmanager:DescribeSecret")))
    assert call("PutIdentityPolicy", Principal="uid:54321", PolicyName="describe",
                PolicyDocument=document) == {"Principal": "uid:54321", "PolicyName": "describe"}
    call("PutIdentityPolicy", Principal="group:www-data", PolicyName="web.read",
         PolicyDocument=document)
    got = call("GetIdentityPolicy", Principal="uid:54321", PolicyName="describe")
    assert got == {"Principal": "uid:54321", "PolicyName": "describe",
                   "PolicyDocument": document}
    listed = call("ListIdentityPolicies")["Policies"]
    assert sorted((entry["Principal"], entry["PolicyName"]) for entry in listed) == [
        ("group:www-data", "web.read"), ("uid:54321", "describe")]
    assert call("ListIdentityPolicies", Principal="group:www-data")["Policies"] == [
        {"Principal": "group:www-data", "PolicyName": "web.read"}]
    # Putting again replaces.
    replaced = json.dumps(doc(allow("secretsmanager:ListSecrets")))
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="describe",
         PolicyDocument=replaced)
    assert call("GetIdentityPolicy", Principal="uid:54321",
                PolicyName="describe")["PolicyDocument"] == replaced
    call("DeleteIdentityPolicy", Principal="uid:54321", PolicyName="describe")
    with pytest.raises(ResourceNotFoundException):
        call("GetIdentityPolicy", Principal="uid:54321", PolicyName="describe")
    with pytest.raises(ResourceNotFoundException):
        call("DeleteIdentityPolicy", Principal="uid:54321", PolicyName="describe")
    assert [entry["Principal"] for entry in call("ListIdentityPolicies")["Policies"]] == [
        "group:www-data"]


@pytest.mark.parametrize(("principal", "name"), [
    ("uid:abc", "p"), ("host:x", "p"), ("", "p"), ("*", "p"), ("user:", "p"),
    ("uid:1", ""), ("uid:1", "a/b"), ("uid:1", "x" * 129), ("uid:1", None),
])
def test_identity_policy_bad_principal_or_name(call, principal, name):
    document = json.dumps(doc(allow()))
    with pytest.raises(InvalidParameterException):
        call("PutIdentityPolicy", Principal=principal, PolicyName=name, PolicyDocument=document)
    with pytest.raises(InvalidParameterException):
        call("GetIdentityPolicy", Principal=principal, PolicyName=name)
    with pytest.raises(InvalidParameterException):
        call("DeleteIdentityPolicy", Principal=principal, PolicyName=name)
    assert call("ListIdentityPolicies")["Policies"] == []


def test_identity_policy_malformed_document(call):
    with pytest.raises(MalformedPolicyDocumentException, match="identity policy"):
        call("PutIdentityPolicy", Principal="uid:1", PolicyName="p",
             PolicyDocument=json.dumps(doc(everyone(allow()))))
    with pytest.raises(InvalidParameterException):
        call("ListIdentityPolicies", Principal="nobody")
    assert call("ListIdentityPolicies")["Policies"] == []


def test_non_root_caller_cannot_manage_policies(call):
    call("CreateSecret", Name="s", SecretString="x")
    with pytest.raises(AccessDeniedException, match="secretfs:PutIdentityPolicy"):
        call("PutIdentityPolicy", STRANGER, Principal="uid:54321", PolicyName="p",
             PolicyDocument=json.dumps(doc(allow())))
    with pytest.raises(AccessDeniedException, match="PutResourcePolicy"):
        call("PutResourcePolicy", STRANGER, SecretId="s", ResourcePolicy=READ_FOR_STRANGER)
    assert call("ListIdentityPolicies")["Policies"] == []


def test_policy_change_takes_effect_on_the_next_call(call):
    call("CreateSecret", Name="app/key", SecretString="v1")
    with pytest.raises(AccessDeniedException, match="uid 54321 is not authorized"):
        call("GetSecretValue", STRANGER, SecretId="app/key")
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="read",
         PolicyDocument=json.dumps(doc(allow("secretsmanager:GetSecretValue", "app/*",
                                             Sid="Read"))))
    assert call("GetSecretValue", STRANGER, SecretId="app/key")["SecretString"] == "v1"
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="deny",
         PolicyDocument=json.dumps(doc(deny(Sid="Stop"))))
    with pytest.raises(AccessDeniedException, match="identity-policy uid:54321/deny#Stop"):
        call("GetSecretValue", STRANGER, SecretId="app/key")
    call("DeleteIdentityPolicy", Principal="uid:54321", PolicyName="deny")
    assert call("GetSecretValue", STRANGER, SecretId="app/key")["SecretString"] == "v1"
    call("DeleteIdentityPolicy", Principal="uid:54321", PolicyName="read")
    with pytest.raises(AccessDeniedException, match="implicit-deny"):
        call("GetSecretValue", STRANGER, SecretId="app/key")


def test_list_secrets_shows_a_non_root_caller_only_what_it_may_describe(call):
    for name in ("prod/db", "prod/api", "dev/db", "team/x"):
        call("CreateSecret", Name=name, SecretString="x")
    with pytest.raises(AccessDeniedException):
        call("ListSecrets", STRANGER)
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="list",
         PolicyDocument=json.dumps(doc(
             allow("secretsmanager:ListSecrets"),
             allow("secretsmanager:DescribeSecret", "prod/*"),
             deny("secretsmanager:DescribeSecret", "prod/api"))))
    call("PutResourcePolicy", SecretId="team/x", ResourcePolicy=resource_policy_text(
        allow("secretsmanager:GetSecretValue", Principal=unix("uid:54321"))))
    listed = {entry["Name"] for entry in call("ListSecrets", STRANGER)["SecretList"]}
    assert listed == {"prod/db", "team/x"}
    assert len(call("ListSecrets")["SecretList"]) == 4


def test_version_stage_condition_through_the_service(call):
    first = call("CreateSecret", Name="s", SecretString="one")["VersionId"]
    second = call("PutSecretValue", SecretId="s", SecretString="two")["VersionId"]
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="current",
         PolicyDocument=json.dumps(doc(when({"StringEquals": {
             "secretsmanager:VersionStage": "AWSCURRENT"}}, "secretsmanager:GetSecretValue"))))
    assert call("GetSecretValue", STRANGER, SecretId="s")["SecretString"] == "two"
    assert call("GetSecretValue", STRANGER, SecretId="s",
                VersionStage="AWSCURRENT")["SecretString"] == "two"
    assert call("GetSecretValue", STRANGER, SecretId="s",
                VersionId=second)["SecretString"] == "two"
    with pytest.raises(AccessDeniedException, match="implicit-deny"):
        call("GetSecretValue", STRANGER, SecretId="s", VersionStage="AWSPREVIOUS")
    with pytest.raises(AccessDeniedException, match="implicit-deny"):
        call("GetSecretValue", STRANGER, SecretId="s", VersionId=first)
    assert call("GetSecretValue", SecretId="s", VersionStage="AWSPREVIOUS")[
        "SecretString"] == "one"


def test_batch_get_honours_a_version_stage_deny(call):
    call("CreateSecret", Name="s", SecretString="current value")
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="p",
         PolicyDocument=json.dumps(doc(
             allow("secretsmanager:*"),
             deny("secretsmanager:GetSecretValue", Sid="NotCurrent", Condition={
                 "StringEquals": {"secretsmanager:VersionStage": "AWSCURRENT"}}))))
    with pytest.raises(AccessDeniedException):
        call("GetSecretValue", STRANGER, SecretId="s")
    got = call("BatchGetSecretValue", STRANGER, SecretIdList=["s"])
    assert got["SecretValues"] == []
    assert [error["ErrorCode"] for error in got["Errors"]] == ["AccessDeniedException"]


def test_policies_survive_a_restart(env, call):
    call("CreateSecret", Name="s", SecretString="x")
    call("PutResourcePolicy", SecretId="s", ResourcePolicy=READ_FOR_STRANGER)
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="describe",
         PolicyDocument=json.dumps(doc(allow("secretsmanager:DescribeSecret"))))
    restarted = env.reopen()
    assert restarted.call("GetSecretValue", {"SecretId": "s"}, STRANGER)["SecretString"] == "x"
    assert restarted.call("DescribeSecret", {"SecretId": "s"}, STRANGER)["Name"] == "s"
    with pytest.raises(AccessDeniedException):
        restarted.call("DeleteSecret", {"SecretId": "s"}, STRANGER)
    stored = restarted.call("GetResourcePolicy", {"SecretId": "s"}, SYSTEM)["ResourcePolicy"]
    assert json.loads(stored) == json.loads(READ_FOR_STRANGER)
    assert restarted.call("ListIdentityPolicies", {}, SYSTEM)["Policies"] == [
        {"Principal": "uid:54321", "PolicyName": "describe"}]


def test_may_be_shared_follows_the_policies(call, svc):
    call("CreateSecret", Name="prod/db", SecretString="x")
    call("CreateSecret", Name="dev/db", SecretString="y")
    prod = svc.catalog.get(svc._lookup("prod/db"))
    dev = svc.catalog.get(svc._lookup("dev/db"))
    assert not svc.may_be_shared(prod)
    call("PutIdentityPolicy", Principal="group:ops", PolicyName="dev",
         PolicyDocument=json.dumps(doc(allow("secretsmanager:Get*", "dev/*"))))
    assert svc.may_be_shared(dev) and not svc.may_be_shared(prod)
    call("PutResourcePolicy", SecretId="prod/db", ResourcePolicy=READ_FOR_STRANGER)
    assert svc.may_be_shared(prod)
    call("DeleteResourcePolicy", SecretId="prod/db")
    assert not svc.may_be_shared(prod)


def test_current_time_condition_follows_the_service_clock(env, call):
    call("CreateSecret", Name="s", SecretString="x")
    call("PutIdentityPolicy", Principal="uid:54321", PolicyName="until",
         PolicyDocument=json.dumps(doc(when({"DateLessThan": {
             "aws:CurrentTime": "2024-05-06T16:30:00Z"}}))))
    assert call("GetSecretValue", STRANGER, SecretId="s")["SecretString"] == "x"
    env.clock.advance(hours=1)
    with pytest.raises(AccessDeniedException, match="implicit-deny"):
        call("GetSecretValue", STRANGER, SecretId="s")


def test_public_read_with_a_condition_on_the_secret_is_still_public(call):
    call("CreateSecret", Name="s", SecretString="x")
    with pytest.raises(PublicPolicyException):
        call("PutResourcePolicy", SecretId="s", ResourcePolicy=resource_policy_text(
            everyone(allow("secretsmanager:GetSecretValue", Condition={"StringEquals": {
                "secretsmanager:VersionStage": "AWSCURRENT"}}))))


@pytest.mark.parametrize("value", [10**20, "99999999999999999999"])
def test_out_of_range_epoch_date_is_a_validation_error(call, value):
    document = json.dumps(doc(everyone(when({"DateLessThan": {"aws:CurrentTime": value}}))))
    result = call("ValidateResourcePolicy", ResourcePolicy=document)
    assert [entry["CheckName"] for entry in result["ValidationErrors"]] == [
        "$.Statement[0].Condition.DateLessThan.aws:CurrentTime"]


def test_deeply_nested_document_is_a_validation_error(call):
    nested = "[" * 10000 + "]" * 10000
    assert len(nested) <= POLICY_MAX
    result = call("ValidateResourcePolicy", ResourcePolicy=nested)
    assert result["PolicyValidationPassed"] is False


def test_duplicate_sid_is_reported_with_other_errors_of_the_statement():
    errors = validate_policy(doc(statement(Sid="Same"), statement(Sid="Same", Effect="Maybe")),
                             resource_policy=False)
    assert {error.location for error in errors} == {"$.Statement", "$.Statement[1].Effect"}
