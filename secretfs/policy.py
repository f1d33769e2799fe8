"""Access policies in IAM's grammar with Unix principals, and the decision.

Two kinds of documents, both IAM JSON (`Version`, `Statement[]` with `Sid`,
`Effect`, `Action`/`NotAction`, `Resource`/`NotResource`, `Condition`):

- identity policies, attached to a principal (`uid:1000`, `user:alice`,
  `gid:33`, `group:www-data`, `unit:nginx.service`, `cgroup:/system.slice/*`,
  `exe:/usr/bin/app`, and `rotator:<name>` for the rotators of issue-style
  rotation, e.g. `rotator:secretfs:postgresql-*`) — they have no `Principal` element;
- a resource policy on one secret, whose statements name who they apply to in
  `Principal` (`"*"` or `{"Unix": [...]}` with the same principal forms).

The decision, as IAM evaluates within one account:

1. uid 0 is the administrator: allowed, decided by "root". A rotator is never root.
2. Collect the statements that apply: those of every identity policy whose
   principal matches the caller, and those of the secret's resource policy
   whose `Principal` matches the caller.
3. A statement matches a request when its action, its resource and every
   condition match (`NotAction`/`NotResource` match what they don't name).
4. Any matching Deny decides: denied (an explicit Deny beats every Allow).
5. Otherwise any matching Allow decides: allowed.
6. Otherwise a rotator is allowed what rotating its one secret takes (DescribeSecret,
   GetSecretValue, PutSecretValue and UpdateSecretVersionStage on that secret, and
   GetRandomPassword), as AWS's rotation role grants: "rotation-session". Anything
   else it needs (the master secret of alternating users) takes a policy.
7. Otherwise: denied by default ("implicit-deny").

Actions without a resource (ListSecrets, GetRandomPassword, BatchGetSecretValue)
are matched against the resource "*", so only statements with `Resource: "*"`
apply to them, as in IAM. Condition operators: String*, Numeric*, Date*, Bool,
IpAddress/NotIpAddress, Null, each with `...IfExists`, and the `ForAnyValue:`/
`ForAllValues:` set prefixes. A key with several values (a caller's groups, the
stages of a version read through the filesystem) matches a positive operator
when any value matches, a negated one when none does.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from secretfs.identity import Identity
from secretfs.model import AccessDeniedException, SecretsManagerError

POLICY_MAX = 20480
VERSIONS = ("2012-10-17", "2008-10-17")
_STATEMENT_KEYS = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource",
                   "Principal", "NotPrincipal", "Condition"}
_PRINCIPAL_KINDS = ("uid", "user", "gid", "group", "unit", "cgroup", "exe", "rotator")
# What a rotator may do to the secret it rotates without any policy saying so.
ROTATION_SESSION_ACTIONS = frozenset({
    "DescribeSecret", "GetSecretValue", "PutSecretValue", "UpdateSecretVersionStage"})

# Condition keys this service provides; the part after '/' of a tag key is free.
CONDITION_KEYS = {
    "aws:currenttime": "date", "aws:epochtime": "numeric", "aws:sourceip": "ip",
    "aws:securetransport": "bool",
    "secretsmanager:name": "string", "secretsmanager:secretid": "string",
    "secretsmanager:versionstage": "string", "secretsmanager:versionid": "string",
    "secretfs:uid": "numeric", "secretfs:gid": "numeric", "secretfs:user": "string",
    "secretfs:group": "string", "secretfs:pid": "numeric", "secretfs:exe": "string",
    "secretfs:unit": "string", "secretfs:cgroup": "string", "secretfs:source": "string",
    "secretfs:rotator": "string",
}
_TAG_KEY_PREFIXES = ("secretsmanager:resourcetag/", "aws:resourcetag/")

_OPERATORS = {
    "StringEquals": ("string", False), "StringNotEquals": ("string", True),
    "StringEqualsIgnoreCase": ("string", False), "StringNotEqualsIgnoreCase": ("string", True),
    "StringLike": ("string", False), "StringNotLike": ("string", True),
    "NumericEquals": ("numeric", False), "NumericNotEquals": ("numeric", True),
    "NumericLessThan": ("numeric", False), "NumericLessThanEquals": ("numeric", False),
    "NumericGreaterThan": ("numeric", False), "NumericGreaterThanEquals": ("numeric", False),
    "DateEquals": ("date", False), "DateNotEquals": ("date", True),
    "DateLessThan": ("date", False), "DateLessThanEquals": ("date", False),
    "DateGreaterThan": ("date", False), "DateGreaterThanEquals": ("date", False),
    "Bool": ("bool", False), "IpAddress": ("ip", False), "NotIpAddress": ("ip", True),
    "Null": ("null", False),
}

# Actions that read a secret's value: a resource policy granting them to
# everyone is refused unless the caller asks to allow a public policy.
_READ_ACTIONS = ("secretsmanager:GetSecretValue", "secretsmanager:BatchGetSecretValue")


class MalformedPolicyDocumentException(SecretsManagerError):
    """The resource policy has syntax errors."""

    code, status = "MalformedPolicyDocumentException", 400


class PublicPolicyException(SecretsManagerError):
    """The BlockPublicPolicy parameter is set to true, and the policy grants broad access."""

    code, status = "PublicPolicyException", 400


@dataclass(frozen=True, slots=True)
class PolicyError:
    location: str
    message: str


# Decision and Request are named tuples rather than frozen dataclasses: one of each is
# made per file open, and a frozen dataclass costs several times as much to build.
class Decision(NamedTuple):
    allowed: bool
    decided_by: str


ROOT_DECISION = Decision(True, "root")


class Request(NamedTuple):
    """What is being asked: an action on a secret (or on no resource)."""

    action: str                      # e.g. "GetSecretValue"
    secret: object | None = None     # a model.Secret
    stages: tuple[str, ...] = ()     # secretsmanager:VersionStage values
    version_id: str | None = None
    now: datetime | None = None


# --- patterns ----------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _glob(pattern: str, ignore_case: bool = False) -> re.Pattern:
    """IAM wildcards: '*' any run of characters (including '/'), '?' one character."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _matches(pattern: str, value: str, ignore_case: bool = False) -> bool:
    return _glob(pattern, ignore_case).fullmatch(value) is not None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _qualified(action: str) -> str:
    return action if ":" in action else f"secretsmanager:{action}"


# --- principals ----------------------------------------------------------------------

def parse_principal(text: object) -> tuple[str, str]:
    """'user:alice' -> ('user', 'alice'); '*' -> ('*', '*'). ValueError when malformed."""
    if text == "*":
        return "*", "*"
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"principal {text!r} must look like KIND:VALUE with KIND one of "
                         f"{', '.join(_PRINCIPAL_KINDS)}, or be '*'")
    kind, _, value = text.partition(":")
    if kind not in _PRINCIPAL_KINDS or not value:
        raise ValueError(f"principal {text!r}: KIND must be one of {', '.join(_PRINCIPAL_KINDS)}"
                         " and VALUE non-empty")
    if kind in ("uid", "gid") and not value.isdigit():
        raise ValueError(f"principal {text!r}: {kind} takes a number")
    return kind, value


def principal_matches(principal: tuple[str, str], who: Identity) -> bool:
    kind, value = principal
    if kind == "*":
        return True
    rotator = who.caller.rotator
    if kind == "rotator" or rotator is not None:
        # Rotators are matched by name only; they have no Unix identity to match.
        return kind == "rotator" and rotator is not None and _matches(value, rotator)
    if kind == "uid":
        return who.uid == int(value)
    if kind == "gid":
        return int(value) in who.gids
    if kind == "user":
        return who.user == value
    if kind == "group":
        return value in who.groups
    attribute = {"unit": who.unit, "cgroup": who.cgroup, "exe": who.exe}[kind]
    return attribute is not None and _matches(value, attribute)


# --- documents ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Condition:
    operator: str          # the base operator, e.g. "StringLike"
    key: str               # lower-cased key
    values: tuple
    if_exists: bool
    set_operator: str | None  # "ForAnyValue" | "ForAllValues" | None


@dataclass(frozen=True, slots=True)
class Statement:
    sid: str | None
    allow: bool
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    principals: tuple[tuple[str, str], ...] | None  # None in identity policies
    not_principal: bool
    conditions: tuple[Condition, ...]

    def applies_to(self, who: Identity) -> bool:
        if self.principals is None:
            return True
        hit = any(principal_matches(principal, who) for principal in self.principals)
        return hit != self.not_principal

    def matches(self, request: Request, context: Callable[[str], tuple | None]) -> bool:
        return self.covers(request) and all(
            _condition_holds(condition, context) for condition in self.conditions)

    def covers(self, request: Request) -> bool:
        """Whether the request's action and resource are this statement's (conditions aside)."""
        return self.covers_action(request.action) and self._resource_matches(request.secret)

    def covers_action(self, action: str) -> bool:
        action = _qualified(action)
        hit = any(_matches(pattern, action, ignore_case=True) for pattern in self.actions)
        return hit != self.not_action

    def _resource_matches(self, secret) -> bool:
        candidates = ("*",) if secret is None else (secret.arn, secret.name)
        hit = any(_matches(pattern, candidate) for pattern in self.resources
                  for candidate in candidates if pattern == "*" or candidate != "*")
        return hit != self.not_resource


@dataclass(frozen=True, slots=True)
class Policy:
    statements: tuple[Statement, ...]
    text: str
    # (action, resource ARN) -> the statements whose Action and Resource cover it, with
    # their index: what a decision still checks principals and conditions of. A policy
    # never changes (a new document is a new Policy), so the answers stay true.
    _covering: dict = field(default_factory=dict, compare=False, repr=False)

    def covering(self, request: Request) -> tuple[tuple[int, Statement], ...]:
        secret = request.secret
        key = (request.action, None if secret is None else (secret.arn, secret.name))
        found = self._covering.get(key)
        if found is None:
            if len(self._covering) > 65536:
                self._covering.clear()
            found = self._covering[key] = tuple(
                (index, statement) for index, statement in enumerate(self.statements)
                if statement.covers(request))
        return found


def parse_policy(document: object, *, resource_policy: bool) -> Policy:
    """Parse and validate; MalformedPolicyDocumentException lists every error."""
    policy, errors = _parse(document, resource_policy=resource_policy)
    if errors:
        details = "; ".join(f"{error.location}: {error.message}" for error in errors)
        raise MalformedPolicyDocumentException(
            f"This policy contains {len(errors)} error(s): {details}")
    return policy


def validate_policy(document: object, *, resource_policy: bool) -> list[PolicyError]:
    return _parse(document, resource_policy=resource_policy)[1]


def _parse(document: object, *, resource_policy: bool) -> tuple[Policy | None, list[PolicyError]]:
    errors: list[PolicyError] = []
    if isinstance(document, str):
        if len(document) > POLICY_MAX:
            return None, [PolicyError("$", f"the policy is {len(document)} characters; the "
                                           f"maximum is {POLICY_MAX}")]
        try:
            parsed = json.loads(document)
        except RecursionError:
            return None, [PolicyError("$", "the document is nested too deeply")]
        except ValueError as error:
            return None, [PolicyError(f"line {getattr(error, 'lineno', '?')} column "
                                      f"{getattr(error, 'colno', '?')}",
                                      f"not valid JSON: {getattr(error, 'msg', error)}")]
        text = document
    else:
        parsed, text = document, json.dumps(document, separators=(",", ":"))
        if len(text) > POLICY_MAX:
            return None, [PolicyError("$", f"the policy is {len(text)} characters; the "
                                           f"maximum is {POLICY_MAX}")]
    if not isinstance(parsed, dict):
        return None, [PolicyError("$", "a policy must be a JSON object")]
    for key in parsed:
        if key not in ("Version", "Id", "Statement"):
            errors.append(PolicyError(f"$.{key}", "unknown element"))
    version = parsed.get("Version")
    if version is not None and version not in VERSIONS:
        errors.append(PolicyError("$.Version", f"must be one of {', '.join(VERSIONS)}"))
    if "Id" in parsed and not isinstance(parsed["Id"], str):
        errors.append(PolicyError("$.Id", "must be a string"))
    raw_statements = parsed.get("Statement")
    if raw_statements is None:
        errors.append(PolicyError("$.Statement", "is required"))
        return None, errors
    statements = []
    for index, raw in enumerate(_as_list(raw_statements)):
        statement = _parse_statement(raw, f"$.Statement[{index}]", resource_policy, errors)
        if statement is not None:
            statements.append(statement)
    sids = [raw.get("Sid") for raw in _as_list(raw_statements)
            if isinstance(raw, dict) and isinstance(raw.get("Sid"), str) and raw.get("Sid")]
    for sid in sorted({sid for sid in sids if sids.count(sid) > 1}):
        errors.append(PolicyError("$.Statement", f"duplicate Sid {sid!r}"))
    if errors:
        return None, errors
    return Policy(tuple(statements), text), []


def _strings(value, location: str, errors: list[PolicyError]) -> tuple[str, ...] | None:
    items = _as_list(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        errors.append(PolicyError(location, "must be a non-empty string or list of strings"))
        return None
    return tuple(items)


def _parse_statement(raw, where: str, resource_policy: bool,
                     errors: list[PolicyError]) -> Statement | None:
    if not isinstance(raw, dict):
        errors.append(PolicyError(where, "a statement must be a JSON object"))
        return None
    before = len(errors)
    for key in raw:
        if key not in _STATEMENT_KEYS:
            errors.append(PolicyError(f"{where}.{key}", "unknown element"))
    sid = raw.get("Sid")
    if sid is not None and (not isinstance(sid, str) or not re.fullmatch(r"[A-Za-z0-9]*", sid)):
        errors.append(PolicyError(f"{where}.Sid", "must be a string of letters and digits"))
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        errors.append(PolicyError(f"{where}.Effect", "must be \"Allow\" or \"Deny\""))
    actions, not_action = _pair(raw, "Action", "NotAction", where, errors)
    for action in actions or ():
        if action != "*" and not re.fullmatch(r"(?i)(secretsmanager|secretfs):[A-Za-z*?]+",
                                               action):
            errors.append(PolicyError(f"{where}.{'NotAction' if not_action else 'Action'}",
                                      f"{action!r} is not a secretsmanager action"))
    resources, not_resource = _pair(raw, "Resource", "NotResource", where, errors)
    principals, not_principal = None, False
    if resource_policy:
        principals, not_principal = _principals(raw, where, errors)
    elif "Principal" in raw or "NotPrincipal" in raw:
        errors.append(PolicyError(f"{where}.Principal",
                                  "an identity policy names no Principal: it applies to the "
                                  "principal it is attached to"))
    conditions = _conditions(raw.get("Condition"), f"{where}.Condition", errors)
    if len(errors) > before:
        return None
    return Statement(sid, effect == "Allow", actions, not_action, resources, not_resource,
                     principals, not_principal, conditions)


def _pair(raw: dict, name: str, negated: str, where: str, errors: list[PolicyError]):
    if (name in raw) == (negated in raw):
        errors.append(PolicyError(f"{where}.{name}", f"exactly one of {name} and {negated} "
                                                     "is required"))
        return None, False
    key = name if name in raw else negated
    return _strings(raw[key], f"{where}.{key}", errors), key == negated


def _principals(raw: dict, where: str, errors: list[PolicyError]):
    if ("Principal" in raw) == ("NotPrincipal" in raw):
        errors.append(PolicyError(f"{where}.Principal",
                                  "a resource policy statement needs exactly one of Principal "
                                  "and NotPrincipal"))
        return None, False
    key = "Principal" if "Principal" in raw else "NotPrincipal"
    value, location = raw[key], f"{where}.{key}"
    if value == "*" or value == {"AWS": "*"}:
        return (("*", "*"),), key == "NotPrincipal"
    if not isinstance(value, dict) or set(value) != {"Unix"}:
        errors.append(PolicyError(location, 'must be "*" or {"Unix": [principals]}'))
        return None, False
    parsed = []
    for index, text in enumerate(_as_list(value["Unix"])):
        try:
            parsed.append(parse_principal(text))
        except ValueError as error:
            errors.append(PolicyError(f"{location}.Unix[{index}]", str(error)))
    if not _as_list(value["Unix"]):
        errors.append(PolicyError(f"{location}.Unix", "names no principal"))
    return tuple(parsed), key == "NotPrincipal"


def _conditions(raw, where: str, errors: list[PolicyError]) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        errors.append(PolicyError(where, "must be an object of operators"))
        return ()
    conditions = []
    for name, block in raw.items():
        location = f"{where}.{name}"
        set_operator, _, operator = name.rpartition(":")
        if set_operator not in ("", "ForAnyValue", "ForAllValues"):
            errors.append(PolicyError(location, f"unknown set operator {set_operator!r}"))
            continue
        if_exists = operator.endswith("IfExists") and operator != "IfExists"
        base = operator[:-len("IfExists")] if if_exists else operator
        if base not in _OPERATORS or (if_exists and base == "Null"):
            errors.append(PolicyError(location, f"unknown condition operator {name!r}"))
            continue
        if not isinstance(block, dict) or not block:
            errors.append(PolicyError(location, "must map condition keys to values"))
            continue
        kind = _OPERATORS[base][0]
        for key, values in block.items():
            key_location = f"{location}.{key}"
            lowered = key.lower() if isinstance(key, str) else ""
            if lowered not in CONDITION_KEYS and not (
                    lowered.startswith(_TAG_KEY_PREFIXES) and "/" in key
                    and key.split("/", 1)[1]):
                errors.append(PolicyError(key_location, f"unknown condition key {key!r}"))
                continue
            items = _as_list(values)
            if not items or not all(isinstance(item, str | int | float | bool) for item in items):
                errors.append(PolicyError(key_location, "values must be strings, numbers or "
                                                        "booleans"))
                continue
            try:
                converted = tuple(_convert(kind, item) for item in items)
            except ValueError as error:
                errors.append(PolicyError(key_location, str(error)))
                continue
            conditions.append(Condition(base, lowered if lowered in CONDITION_KEYS else
                                        key.split("/", 1)[0].lower() + "/" + key.split("/", 1)[1],
                                        converted, if_exists, set_operator or None))
    return tuple(conditions)


def _convert(kind: str, value):
    if kind == "numeric":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if kind == "date":
        return _date(value)
    if kind in ("bool", "null"):
        text = str(value).lower()
        if text not in ("true", "false"):
            raise ValueError(f"{value!r} is not true or false")
        return text == "true"
    if kind == "ip":
        try:
            return ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    return str(value)


def _date(value) -> datetime:
    text = str(value)
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if text.isdigit():
            return datetime.fromtimestamp(int(text), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{value!r} is not an ISO 8601 date or epoch seconds") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _condition_holds(condition: Condition, context: Callable[[str], tuple | None]) -> bool:
    present = context(condition.key)
    if condition.operator == "Null":
        return (present is None or present == ()) == condition.values[0]
    if present is None or present == ():
        if condition.set_operator == "ForAllValues":
            return True
        return condition.if_exists or _OPERATORS[condition.operator][1]
    kind, negated = _OPERATORS[condition.operator]
    try:
        actual = [_convert(kind, value) for value in present]
    except ValueError:
        return False
    if condition.set_operator == "ForAllValues":
        return all(_compare(condition.operator, value, condition.values) for value in actual)
    if condition.set_operator == "ForAnyValue":
        return any(_compare(condition.operator, value, condition.values) for value in actual)
    if negated:
        return all(_compare(condition.operator, value, condition.values) for value in actual)
    return any(_compare(condition.operator, value, condition.values) for value in actual)


def _compare(operator: str, actual, expected: tuple) -> bool:
    """Whether one context value satisfies the operator against the policy's values."""
    if operator == "StringEquals":
        return actual in expected
    if operator == "StringNotEquals":
        return actual not in expected
    if operator == "StringEqualsIgnoreCase":
        return actual.lower() in {value.lower() for value in expected}
    if operator == "StringNotEqualsIgnoreCase":
        return actual.lower() not in {value.lower() for value in expected}
    if operator == "StringLike":
        return any(_matches(value, actual) for value in expected)
    if operator == "StringNotLike":
        return not any(_matches(value, actual) for value in expected)
    if operator in ("IpAddress", "NotIpAddress"):
        hit = any(actual.network_address in value for value in expected)
        return hit if operator == "IpAddress" else not hit
    if operator == "Bool":
        return actual in expected
    if operator.endswith("NotEquals"):
        return actual not in expected
    comparisons = {
        "Equals": lambda a, b: a == b, "LessThan": lambda a, b: a < b,
        "LessThanEquals": lambda a, b: a <= b, "GreaterThan": lambda a, b: a > b,
        "GreaterThanEquals": lambda a, b: a >= b,
    }
    suffix = operator.removeprefix("Numeric").removeprefix("Date")
    return any(comparisons[suffix](actual, value) for value in expected)


# --- the decision --------------------------------------------------------------------

def _context(who: Identity, request: Request) -> Callable[[str], tuple | None]:
    secret = request.secret
    tags = dict(secret.tags) if secret is not None else {}

    def value(key: str) -> tuple | None:
        if key.startswith(_TAG_KEY_PREFIXES):
            tag = key.split("/", 1)[1]
            return (tags[tag],) if tag in tags else None
        now = request.now or datetime.now(UTC)
        lookup = {
            "aws:currenttime": lambda: (now,),
            "aws:epochtime": lambda: (now.timestamp(),),
            "aws:sourceip": lambda: (who.caller.address,) if who.caller.address else None,
            # Local transports and TLS are private; only plain HTTP is not.
            "aws:securetransport": lambda: (who.source != "http",),
            "secretsmanager:name": lambda: (secret.name,) if secret else None,
            "secretsmanager:secretid": lambda: (secret.arn,) if secret else None,
            "secretsmanager:versionstage": lambda: request.stages or None,
            "secretsmanager:versionid": lambda: (request.version_id,)
            if request.version_id else None,
            "secretfs:uid": lambda: (who.uid,) if who.uid >= 0 else None,
            "secretfs:gid": lambda: tuple(sorted(who.gids)) if who.gid >= 0 else None,
            "secretfs:user": lambda: (who.user,) if who.user else None,
            "secretfs:group": lambda: tuple(sorted(who.groups)) or None,
            "secretfs:pid": lambda: (who.pid,) if who.pid > 0 else None,
            "secretfs:exe": lambda: (who.exe,) if who.exe else None,
            "secretfs:unit": lambda: (who.unit,) if who.unit else None,
            "secretfs:cgroup": lambda: (who.cgroup,) if who.cgroup else None,
            "secretfs:source": lambda: (who.source,),
            "secretfs:rotator": lambda: (who.caller.rotator,) if who.caller.rotator else None,
        }
        return lookup[key]()

    return value


class PolicySet:
    """The loaded policies: identity policies by (principal, name), resource policies by
    secret id. Replaced wholesale on change, so a decision never sees half an update."""

    def __init__(self, identity: dict[tuple[str, str], Policy] | None = None,
                 resource: dict[int, Policy] | None = None):
        self.identity = dict(identity or {})
        self.resource = dict(resource or {})
        self._principals = {(principal, name): parse_principal(principal)
                            for principal, name in self.identity}

    def decide(self, who: Identity, request: Request) -> Decision:
        if who.caller.is_root:
            return ROOT_DECISION
        context = _context(who, request)
        allowed_by = None
        for (principal, name), policy in self.identity.items():
            if not principal_matches(self._principals[(principal, name)], who):
                continue
            found = self._evaluate(policy, who, request, context,
                                   f"identity-policy {principal}/{name}")
            if found is not None and not found.allowed:
                return found
            allowed_by = allowed_by or found
        secret = request.secret
        policy = self.resource.get(secret.secret_id) if secret is not None else None
        if policy is not None:
            found = self._evaluate(policy, who, request, context, "resource-policy")
            if found is not None and not found.allowed:
                return found
            allowed_by = allowed_by or found
        return allowed_by or _rotation_session(who, request) or Decision(False, "implicit-deny")

    @staticmethod
    def _evaluate(policy: Policy, who: Identity, request: Request, context,
                  label: str) -> Decision | None:
        allowed = None
        for index, statement in policy.covering(request):
            if not statement.applies_to(who) or not all(
                    _condition_holds(condition, context) for condition in statement.conditions):
                continue
            by = f"{label}#{statement.sid or index}"
            if not statement.allow:
                return Decision(False, by)
            allowed = allowed or Decision(True, by)
        return allowed

    @property
    def is_empty(self) -> bool:
        return not self.identity and not self.resource

    def may_grant_read(self, secret) -> bool:
        """Whether any Allow could let a non-root caller read the secret's value
        (principals and conditions aside): what a file's mode bits should admit."""
        request = Request("GetSecretValue", secret)
        policies = [*self.identity.values()]
        if secret.secret_id in self.resource:
            policies.append(self.resource[secret.secret_id])
        for policy in policies:
            for statement in policy.statements:
                if statement.allow and statement.covers(request):
                    return True
        return False


def _rotation_session(who: Identity, request: Request) -> Decision | None:
    """A rotator's standing grant: what rotating its own secret takes."""
    caller = who.caller
    if caller.rotator is None:
        return None
    if request.secret is None:
        granted = request.action == "GetRandomPassword"
    else:
        granted = (request.action in ROTATION_SESSION_ACTIONS
                   and request.secret.arn == caller.scope)
    return Decision(True, "rotation-session") if granted else None


# Condition keys that, with a positive operator, narrow who is asking.
_CALLER_KEYS = {"secretfs:uid", "secretfs:gid", "secretfs:user", "secretfs:group",
                "secretfs:unit", "secretfs:cgroup", "secretfs:exe", "secretfs:pid",
                "aws:sourceip"}


def _reaches_everyone(statement: Statement) -> bool:
    if statement.not_principal:
        return True  # everyone but a few
    if not any(kind == "*" or (kind in ("unit", "cgroup", "exe") and set(value) <= {"*"})
               for kind, value in statement.principals or ()):
        return False
    return not any(condition.key in _CALLER_KEYS and not _OPERATORS[condition.operator][1]
                   and not condition.if_exists for condition in statement.conditions)


def grants_public_read(policy: Policy) -> bool:
    """Whether a resource policy lets everyone ("*", or everyone but a few) read the
    secret's value: conditions count only when they narrow who is asking."""
    for statement in policy.statements:
        if statement.allow and _reaches_everyone(statement) and any(
                statement.covers_action(action) for action in _READ_ACTIONS):
            return True
    return False


def deny(decision: Decision, who: Identity, action: str, resource: str | None) -> None:
    if not decision.allowed:
        target = f" on resource: {resource}" if resource else ""
        if who.caller.rotator is not None:
            principal = f"rotator {who.caller.rotator}"
        else:
            principal = f"uid {who.uid}" + (f" ({who.user})" if who.user else "")
        raise AccessDeniedException(
            f"{principal} is not authorized to perform: {_qualified(action)}"
            f"{target} ({decision.decided_by})")


class Authorizer:
    """Who is asking, the decision, and its audit record: one call per access check."""

    def __init__(self, *, audit=None, clock: Callable[[], datetime] | None = None):
        self.policies = PolicySet()
        self.audit = audit
        self.clock = clock or (lambda: datetime.now(UTC))

    def decide(self, caller, action: str, secret=None, *, stages: tuple[str, ...] = (),
               version_id: str | None = None) -> tuple[Decision, Identity]:
        who = Identity(caller)
        if caller.is_root:  # before building the request: this is most opens on a host
            return ROOT_DECISION, who
        request = Request(action, secret, tuple(stages), version_id, self.clock())
        return self.policies.decide(who, request), who

    def check(self, caller, action: str, secret=None, *, stages: tuple[str, ...] = (),
              version_id: str | None = None, event: str | None = None,
              probe: bool = False) -> Decision:
        """Decide, audit the decision, and raise AccessDeniedException on deny.

        A probe (access(2), as `test -r` asks) is audited as one, and never raises."""
        decision, who = self.decide(caller, action, secret, stages=stages,
                                    version_id=version_id)
        if self.audit is not None:
            self.audit.record_keyed(
                decision_key(who, event or action, secret, decision, version_id=version_id,
                             stages=stages, probe=probe), decision_record)
        if not (probe or decision.allowed):
            deny(decision, who, action, secret.arn if secret is not None else None)
        return decision

    def record_mutation(self, caller, action: str, params: dict, result: dict) -> None:
        """One audit record for a change that succeeded: what it changed, never a value."""
        if self.audit is None:
            return
        who = Identity(caller)
        record = decision_event(who, action, None, Decision(True, "mutation"))
        resources = {key: result[source] for key, source in (
            ("arn", "ARN"), ("name", "Name"), ("versionId", "VersionId"),
            ("versionStage", "VersionStages"), ("keyId", "KeyId")) if source in result}
        for key, source in (("versionStage", "VersionStage"), ("moveTo", "MoveToVersionId"),
                            ("removeFrom", "RemoveFromVersionId"),
                            ("principal", "Principal"), ("policyName", "PolicyName")):
            if source in params:
                resources[key] = params[source]
        if resources:
            record["resources"] = resources
        record["mutation"] = True
        self.audit.record(record)

    def allows(self, caller, action: str, secret=None, **request) -> bool:
        """A decision that is not an access by itself (filtering a listing): not audited."""
        return self.decide(caller, action, secret, **request)[0].allowed


def decision_key(who: Identity, event: str, secret, decision: Decision, *,
                 version_id: str | None = None, stages: tuple[str, ...] = (),
                 error_code: str | None = None, probe: bool = False) -> tuple:
    """Everything a decision's audit record says, as a hashable tuple (its time and
    chain aside): the record is `decision_record(key)`. A process opening the same
    file again makes an equal key, which the audit log encodes once."""
    caller = who.caller
    return (event, who.source, decision.allowed, decision.decided_by, who.described(),
            caller.access_key, caller.address,
            None if secret is None else (secret.arn, secret.name),
            version_id, tuple(stages), error_code, probe)


def decision_record(key: tuple) -> dict:
    (event, source, allowed, decided_by, identity, access_key, address, secret,
     version_id, stages, error_code, probe) = key
    identity = dict(identity)
    if access_key:
        identity["accessKeyId"] = access_key
    if address:
        identity["sourceIPAddress"] = address
    record = {"eventName": event, "eventSource": source, "userIdentity": identity,
              "decision": "allow" if allowed else "deny", "decidedBy": decided_by}
    resources = {}
    if secret is not None:
        resources = {"arn": secret[0], "name": secret[1]}
    if version_id:
        resources["versionId"] = version_id
    if stages:
        resources["versionStage"] = list(stages)
    if resources:
        record["resources"] = resources
    if not allowed:
        record["errorCode"] = "AccessDeniedException"
    elif error_code:
        record["errorCode"] = error_code
    if probe:
        record["probe"] = "access"
    return record


def decision_event(who: Identity, event: str, secret, decision: Decision, *,
                   version_id: str | None = None, stages: tuple[str, ...] = (),
                   error_code: str | None = None) -> dict:
    return decision_record(decision_key(who, event, secret, decision, version_id=version_id,
                                        stages=stages, error_code=error_code))
