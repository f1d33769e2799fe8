"""The `secretfs` command: argument parsing, request building and output formatting.

Owns the verbs `init`, `ca-bundle`, `mount`, `umount`, `version`, the key verbs
`create-key`, `list-keys` and `export-master-key`, the client verbs named like `aws secretsmanager`, whose flags are
derived from botocore's service model so they match the AWS CLI flag for flag, and
`audit verify|tail|search`. Client verbs only talk to the daemon through
`secretfs.api.client`; the audit verbs read the audit log's files directly (through
`secretfs.audit`), so they work with the daemon stopped. Nothing here touches the
store or the keys. `import` (secretfs.migrate) is a client of the daemon too;
`backup` and `restore` (secretfs.backup) copy the state directory's files;
`rotate-key` and `re-encrypt` (secretfs.rekey) ask the daemon to rotate master keys.

Exit codes follow the AWS CLI: 0 success, 252 bad usage, 254 a service error; 1 for
local failures (no daemon, a daemon or mount error, an unreadable file://, an audit
log that fails verification).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import html
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore import xform_name

from secretfs.model import SecretsManagerError
from secretfs.options import MountOptions
from secretfs.state import DEFAULT_ACCOUNT_ID, DEFAULT_REGION, StateDir, resolve_state_dir

# The Secrets Manager actions exposed as verbs; exposing another is one line here.
AWS_ACTIONS = (
    "CreateSecret",
    "PutSecretValue",
    "GetSecretValue",
    "BatchGetSecretValue",
    "UpdateSecret",
    "UpdateSecretVersionStage",
    "DescribeSecret",
    "ListSecrets",
    "ListSecretVersionIds",
    "DeleteSecret",
    "RestoreSecret",
    "TagResource",
    "UntagResource",
    "GetRandomPassword",
    "PutResourcePolicy",
    "GetResourcePolicy",
    "DeleteResourcePolicy",
    "ValidateResourcePolicy",
    "RotateSecret",
    "CancelRotateSecret",
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_USAGE = 252
EXIT_SERVICE_ERROR = 254

# Only the secret value members read stdin for '-': elsewhere a lone '-' may be a
# legitimate value (a description, a filter value).
STDIN_MEMBERS = frozenset({"SecretString", "SecretBinary"})
OUTPUT_FORMATS = ("json", "text")


class UsageError(Exception):
    """The command line cannot be turned into a request (exit 252)."""


class CommandError(Exception):
    """A local failure: no daemon, a mount or init error, an unreadable file (exit 1)."""


@dataclass(frozen=True)
class OutputOptions:
    format: str = "json"
    query: str | None = None


@dataclass(frozen=True)
class Request:
    """One call to the daemon, as built from the command line."""

    action: str
    params: dict[str, Any]
    extension: bool
    output: OutputOptions
    state_dir: Path


@dataclass(frozen=True)
class _Member:
    """One flag of a client verb: the request member it fills and the shape it follows."""

    name: str
    flag: str
    shape: Any = None  # a botocore Shape; None for secretfs's own verbs (plain strings)


@dataclass(frozen=True)
class _ExtensionVerb:
    action: str
    help: str
    members: tuple[tuple[str, bool, str], ...] = ()  # (name, required, help)


EXTENSION_VERBS = {
    "create-key": _ExtensionVerb(
        "CreateKey",
        "Create a named encryption key to use as a secret's --kms-key-id.",
        (("Alias", True, "The key's alias, alias/NAME."),
         ("Description", False, "A description of the key.")),
    ),
    "list-keys": _ExtensionVerb("ListKeys", "List the encryption keys."),
    "put-identity-policy": _ExtensionVerb(
        "PutIdentityPolicy",
        "Attach (or replace) a named identity policy on a Unix principal.",
        (("Principal", True, "uid:N, user:NAME, gid:N, group:NAME, unit:GLOB, cgroup:GLOB "
                             "or exe:GLOB."),
         ("PolicyName", True, "The policy's name, unique per principal."),
         ("PolicyDocument", True, "The IAM JSON document (file://path reads a file).")),
    ),
    "get-identity-policy": _ExtensionVerb(
        "GetIdentityPolicy", "Show one identity policy of a principal.",
        (("Principal", True, "The principal the policy is attached to."),
         ("PolicyName", True, "The policy's name.")),
    ),
    "delete-identity-policy": _ExtensionVerb(
        "DeleteIdentityPolicy", "Detach and delete an identity policy.",
        (("Principal", True, "The principal the policy is attached to."),
         ("PolicyName", True, "The policy's name.")),
    ),
    "create-access-key": _ExtensionVerb(
        "CreateAccessKey",
        "Create an access key for the network endpoint; its secret is shown only now.",
        (("Principal", True, "The Unix user the key acts as: user:NAME or uid:N."),),
    ),
    "list-access-keys": _ExtensionVerb(
        "ListAccessKeys", "List access keys (never their secrets).",
        (("Principal", False, "Only this principal's keys."),),
    ),
    "delete-access-key": _ExtensionVerb(
        "DeleteAccessKey", "Delete an access key; requests signed with it fail at once.",
        (("AccessKeyId", True, "The key's id."),),
    ),
    "list-identity-policies": _ExtensionVerb(
        "ListIdentityPolicies", "List identity policies, of one principal or of all.",
        (("Principal", False, "Only this principal's policies."),),
    ),
}


# --- the service model (loaded only by the verbs that need it) --------------------

@functools.cache
def _service_model():
    import botocore.session

    return botocore.session.get_session().get_service_model("secretsmanager")


@functools.cache
def _paginator(action: str) -> dict | None:
    import botocore.session

    try:
        return botocore.session.get_session().get_paginator_model("secretsmanager").get_paginator(action)
    except ValueError:
        return None


def _verb_name(action: str) -> str:
    return xform_name(action, "-")


def _plain_text(documentation: str) -> tuple[str, str]:
    """(first sentence, first paragraph) of a model documentation string, as one line each."""
    paragraphs = re.split(r"</p>", documentation or "")
    first = paragraphs[0]
    if first.rstrip().endswith(":") and len(paragraphs) > 1:
        first += " " + paragraphs[1]  # "for example:" needs its example
    # Block tags separate words; inline ones (<code>, <a>) sit inside a sentence.
    first = re.sub(r"</?(?:p|li|ul|ol|br|note|important)\b[^>]*>", " ", first)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", first)).split())
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence, text


def _shorthand_syntax(shape) -> str:
    parts = []
    for name, member in shape.members.items():
        if member.type_name == "list":
            parts.append(f"{name}={member.member.type_name},{member.member.type_name}")
        elif member.type_name == "structure":
            parts.append(f"{name}={{{_shorthand_syntax(member)}}}")
        else:
            parts.append(f"{name}={member.type_name}")
    return ",".join(parts)


# --- the parser -------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line instead of argparse's usage screen; main() maps this to 252.
        raise UsageError(f"{self.prog}: error: {message}")


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="The state directory (default: $SECRETFS_STATE_DIR, else /var/lib/secretfs).")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=OUTPUT_FORMATS, default="json",
                        help="Output format (default: json).")
    parser.add_argument("--query", metavar="JMESPATH",
                        help="A JMESPath query applied to the response before output.")


def _add_member_flag(parser: argparse.ArgumentParser, member: _Member, required: bool,
                     help_text: str) -> None:
    kind = member.shape.type_name if member.shape is not None else "string"
    if member.name == "SecretString":
        help_text += " file://PATH reads it from a file, - from stdin (byte for byte)."
    elif member.name == "SecretBinary":
        help_text += (" fileb://PATH reads raw bytes from a file, - from stdin;"
                      " a literal value is base64.")
    elif kind in ("list", "structure") and _struct_of(member.shape) is not None:
        help_text += f" JSON, or shorthand: {_shorthand_syntax(_struct_of(member.shape))}"
    kwargs: dict[str, Any] = {"dest": member.name, "required": required,
                              "help": help_text.replace("%", "%%")}
    if kind == "boolean":
        parser.add_argument(member.flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif kind in ("integer", "long"):
        parser.add_argument(member.flag, type=int, metavar="N", **kwargs)
    elif kind == "list":
        parser.add_argument(member.flag, nargs="+", metavar="VALUE", **kwargs)
    else:
        parser.add_argument(member.flag, metavar="VALUE", **kwargs)


def _struct_of(shape):
    """The structure a list-of-structures or structure member holds, if any."""
    if shape.type_name == "list":
        shape = shape.member
    return shape if shape.type_name == "structure" else None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The `secretfs` parser. Only `verb` (every verb when None, for the full help) gets
    its flags from the service model, so local verbs never load botocore's model."""
    parser = _Parser(prog="secretfs", allow_abbrev=False,
                     description="AWS Secrets Manager on a Linux host, served as a filesystem.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    for action in AWS_ACTIONS:
        name = _verb_name(action)
        if verb is not None and verb != name:
            # Known by name, so a typo still gets "invalid choice"; never parsed.
            verbs.add_parser(name, allow_abbrev=False)
            continue
        operation = _service_model().operation_model(action)
        summary, description = _plain_text(operation.documentation)
        sub = verbs.add_parser(name, help=summary, description=description, allow_abbrev=False)
        shape = operation.input_shape
        members = tuple(_Member(m, "--" + xform_name(m, "-"), s) for m, s in shape.members.items())
        for member in members:
            _add_member_flag(sub, member, member.name in shape.required_members,
                             _plain_text(member.shape.documentation)[1])
        _add_state_dir(sub)
        _add_output_options(sub)
        sub.set_defaults(action=action, extension=False, members=members)

    for name, spec in EXTENSION_VERBS.items():
        sub = verbs.add_parser(name, help=spec.help, description=spec.help, allow_abbrev=False)
        members = tuple(_Member(m, "--" + xform_name(m, "-")) for m, _, _ in spec.members)
        for member, (_, required, help_text) in zip(members, spec.members, strict=True):
            _add_member_flag(sub, member, required, help_text)
        _add_state_dir(sub)
        _add_output_options(sub)
        sub.set_defaults(action=spec.action, extension=True, members=members)

    sub = verbs.add_parser("init", help="Create a state directory: store, keys and config.",
                           allow_abbrev=False)
    _add_state_dir(sub)
    sub.add_argument("--region", default=DEFAULT_REGION,
                     help=f"The region in ARNs (default: {DEFAULT_REGION}).")
    sub.add_argument("--account-id", default=DEFAULT_ACCOUNT_ID,
                     help=f"The account id in ARNs (default: {DEFAULT_ACCOUNT_ID}).")
    sub.add_argument("--tls-hostname", action="append", default=[], metavar="NAME",
                     dest="tls_hostnames",
                     help="Another host name or IP address for the HTTPS endpoint's "
                          "certificate, besides localhost, 127.0.0.1, ::1 and this host's "
                          "names (repeatable).")
    sub.add_argument("--master-key-from-credential", action="store_true",
                     help="Keep the master key out of keys.json: print it (and nothing "
                          "else) on standard output for 'systemd-creds encrypt "
                          "--name=secretfs-master-key - FILE'; the daemon then needs that "
                          "credential. The summary goes to standard error.")
    sub.add_argument("--store", metavar="URL",
                     help="The store: sqlite:///ABSOLUTE/PATH (default: secrets.db in the "
                          "state directory) or postgresql://USER@HOST[:PORT]/DBNAME[?...] "
                          "(an empty database; see the README's PostgreSQL store). A "
                          "password, in the URL or PGPASSWORD, goes to STATE_DIR/pgpass "
                          "(0600), never into config.json.")
    sub.add_argument("--join", action="store_true",
                     help="Another host of a fleet: --store names the fleet's existing "
                          "PostgreSQL store (its region and account id are used) and "
                          "--keys-from a copy of the first host's key file (with "
                          "--key-provider kms: no key file; the fleet's default KMS key).")
    sub.add_argument("--keys-from", metavar="FILE", type=Path,
                     help="With --join: the fleet's key file (keys.json of the host that "
                          "ran init first), copied into this state directory.")
    sub.add_argument("--key-provider", choices=("local", "passphrase", "kms"),
                     help="Where the master keys live: local, a key file in the state "
                          "directory (default); passphrase, that key file with its keys "
                          "sealed under a passphrase the daemon is given at start; kms, "
                          "AWS KMS.")
    sub.add_argument("--passphrase-file", metavar="FILE",
                     help="With --key-provider passphrase: read the passphrase from this "
                          "file's first line ('-': stdin); without it, it is asked twice "
                          "on the terminal.")
    sub.add_argument("--kms-key-id", metavar="ID",
                     help="With --key-provider kms: the KMS key that protects secrets "
                          "without a KmsKeyId of their own (key id, key ARN, alias/NAME or "
                          "alias ARN); it must be an enabled symmetric key.")
    sub.add_argument("--kms-endpoint-url", metavar="URL",
                     help="With --key-provider kms: the KMS endpoint (a VPC endpoint, a "
                          "local KMS); default: the AWS SDK's for the region.")
    sub.add_argument("--kms-region", metavar="REGION",
                     help="With --key-provider kms: KMS's region (default: the AWS SDK's "
                          "configured region, else --region).")
    _add_output_options(sub)
    sub.set_defaults(run=_run_init)

    sub = verbs.add_parser(
        "export-master-key", allow_abbrev=False,
        help="Print the master key, the content of the systemd credential "
             "secretfs-master-key.",
        description="Print the local master key (base64) for 'systemd-creds encrypt "
                    "--name=secretfs-master-key - /etc/credstore.encrypted/"
                    "secretfs-master-key'. keys.json is unchanged until the daemon "
                    "first starts with that credential, which then seals keys.json's "
                    "key material under it.")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_export_master_key)

    sub = verbs.add_parser(
        "ca-bundle", allow_abbrev=False,
        help="Print the local CA certificate that HTTPS clients trust (for AWS_CA_BUNDLE).",
        description="Print the local CA certificate (PEM) that signed the HTTPS endpoint's "
                    "certificate. The state directory is root's, so publish it where "
                    "clients can read it, e.g. 'secretfs ca-bundle > "
                    "/usr/local/share/ca-certificates/secretfs.crt', and point their "
                    "AWS_CA_BUNDLE at that file.")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_ca_bundle)

    sub = verbs.add_parser(
        "set-presentation", allow_abbrev=False,
        help="Set the owner, group and mode a secret's files show in the mount.",
        description="Write the secret's secretfs:owner, secretfs:group and secretfs:mode "
                    "tags (with --key, secretfs:owner:KEY etc. for one JSON key's file). "
                    "Presentation only: the policies still decide every open.")
    sub.add_argument("--secret-id", required=True, help="The secret's name or ARN.")
    sub.add_argument("--owner", help="A user name or uid.")
    sub.add_argument("--group", help="A group name or gid.")
    sub.add_argument("--mode", help="Read bits only, in octal: 0400, 0440 or 0444.")
    sub.add_argument("--key", help="Only this JSON key's file.")
    sub.add_argument("--clear", action="store_true",
                     help="Remove these tags instead (the secret's files, or --key's).")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_set_presentation)

    sub = verbs.add_parser("mount", help="Start the daemon and mount the secrets filesystem.",
                           allow_abbrev=False)
    sub.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    _add_state_dir(sub)
    sub.add_argument("--foreground", action="store_true",
                     help="Stay in the foreground instead of detaching.")
    sub.add_argument("--passphrase-file", metavar="FILE",
                     help="With the passphrase key provider: read the passphrase from this "
                          "file's first line ('-': stdin); without it, it comes from the "
                          "systemd credential secretfs-passphrase, else the terminal.")
    MountOptions.add_arguments(sub)
    sub.set_defaults(run=_run_mount)

    sub = verbs.add_parser("umount", help="Unmount the secrets filesystem and stop the daemon.",
                           allow_abbrev=False)
    sub.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    sub.add_argument("--lazy", action="store_true",
                     help="Detach now even if the filesystem is busy.")
    sub.set_defaults(run=_run_umount)

    sub = verbs.add_parser("version", help="Print the secretfs version.", allow_abbrev=False)
    sub.set_defaults(run=_run_version)

    _add_audit_verbs(verbs)
    # Verbs with modules of their own: import (migrate), backup and restore (backup),
    # status, refresh and wait for a running daemon (operate), and rotate-key and
    # re-encrypt (rekey).
    from secretfs import backup, migrate, operate, rekey

    for module in (migrate, backup, operate, rekey):
        module.add_parsers(verbs, _add_state_dir)
    return parser


def _add_audit_verbs(verbs) -> None:
    audit = verbs.add_parser(
        "audit", allow_abbrev=False,
        help="Verify and read the audit log (reads its files; no daemon needed).",
        description="Verify and read the audit log in the state directory's audit/.")
    actions = audit.add_subparsers(dest="audit_verb", metavar="ACTION", required=True)

    sub = actions.add_parser(
        "verify", allow_abbrev=False,
        help="Check the hash chain: exit 0 if intact, else 1 naming the first bad record.")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_audit_verify)

    sub = actions.add_parser("tail", allow_abbrev=False,
                             help="Print the last records as JSON lines.")
    sub.add_argument("-n", type=_count, default=20, metavar="N",
                     help="How many records (default: 20).")
    sub.add_argument("--follow", action="store_true",
                     help="Then print records as they are written, until interrupted.")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_audit_tail)

    sub = actions.add_parser("search", allow_abbrev=False,
                             help="Print the matching records as JSON lines, oldest first.")
    sub.add_argument("--secret", metavar="NAME|ARN", help="Records about this secret.")
    sub.add_argument("--uid", type=int, metavar="N", help="Records of this caller's uid.")
    sub.add_argument("--denied-only", action="store_true", help="Only denied requests.")
    sub.add_argument("--since", type=_iso_time, metavar="ISO",
                     help="From this time on (ISO 8601; without an offset, UTC).")
    sub.add_argument("--until", type=_iso_time, metavar="ISO",
                     help="Before this time (ISO 8601; without an offset, UTC).")
    _add_state_dir(sub)
    sub.set_defaults(run=_run_audit_search)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count (0 or more), got {text!r}")
    return value


def _iso_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time, got {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; raises UsageError with a one-line message."""
    verb = argv[0] if argv and not argv[0].startswith("-") else None
    args, extras = build_parser(verb).parse_known_args(argv)
    if extras:
        # Name only the unknown options: the values after them may be secrets.
        options = [token.split("=", 1)[0] for token in extras if token.startswith("-")]
        what = " ".join(options) if options else f"{len(extras)} unexpected value(s)"
        raise UsageError(f"secretfs {args.verb}: error: unrecognized arguments: {what}")
    return args


# --- turning flags into request members ---------------------------------------------

def _read_file(flag: str, uri: str) -> bytes:
    path = uri.split("://", 1)[1]
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise CommandError(f"Error parsing parameter '{flag}': Unable to load paramfile "
                           f"{uri}: {exc.strerror or exc}") from None


def _decode(flag: str, data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(f"Error parsing parameter '{flag}': {source} is not UTF-8 text"
                           " (binary data goes in --secret-binary fileb://PATH)") from None


def _text(member: _Member, value: str) -> str:
    """A string flag's value; file:// is read byte for byte (a trailing newline is kept)."""
    if value.startswith("file://"):
        return _decode(member.flag, _read_file(member.flag, value), value)
    if value.startswith("fileb://"):
        raise UsageError(f"Error parsing parameter '{member.flag}': it takes text;"
                         " use file:// instead of fileb://")
    if value == "-" and member.name in STDIN_MEMBERS:
        return _decode(member.flag, sys.stdin.buffer.read(), "stdin")
    return value


def _blob(member: _Member, value: str) -> bytes:
    if value.startswith("fileb://"):
        return _read_file(member.flag, value)
    if value == "-" and member.name in STDIN_MEMBERS:
        return sys.stdin.buffer.read()
    # Like AWS CLI v2 (cli_binary_format=base64): a literal, or file:// text, is base64.
    text = _text(member, value)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        # The value itself is not shown: it is a secret.
        raise UsageError(f"Error parsing parameter '{member.flag}': Invalid base64"
                         " (use fileb://PATH or - for raw bytes)") from None


def _json(member: _Member, text: str, expected: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"Error parsing parameter '{member.flag}': Invalid JSON: "
                         f"{exc.msg} (line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, expected):
        kind = "list" if expected is list else "object"
        raise UsageError(f"Error parsing parameter '{member.flag}': expected a JSON {kind}")
    return value


def _split_top_level(text: str) -> list[str]:
    """Split shorthand at commas outside quotes, [lists] and {structures}."""
    parts, current, depth, quote, escaped = [], [], 0, "", False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text)


def _shorthand_scalar(member: _Member, shape, text: str, key: str) -> Any:
    value = _unquote(text)
    if shape.type_name == "string":
        return value
    if shape.type_name in ("integer", "long"):
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"Error parsing parameter '{member.flag}': "
                             f"{key} takes an integer") from None
    if shape.type_name == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UsageError(f"Error parsing parameter '{member.flag}': "
                     f"{key} takes a {shape.type_name}; use JSON")


def _shorthand(member: _Member, shape, text: str) -> dict:
    """AWS CLI shorthand for one structure: `Key=k,Value=v`, `Key=name,Values=a,b`.

    Knowing the members from the model, a comma-separated part that does not start
    with `Member=` continues the list member before it.
    """
    result: dict[str, Any] = {}
    current = None
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        key = key.strip()
        if sep and key in shape.members:
            current = key
            child = shape.members[key]
            value = value.strip()
            if child.type_name == "list":
                items = _split_top_level(value[1:-1]) if value.startswith("[") else [value]
                result[key] = [_shorthand_scalar(member, child.member, item, key)
                               for item in items if item.strip()]
            elif child.type_name == "structure" and value.startswith("{"):
                result[key] = _shorthand(member, child, value[1:-1])
            else:
                result[key] = _shorthand_scalar(member, child, value, key)
        elif current is not None and shape.members[current].type_name == "list":
            list_shape = shape.members[current].member
            result[current].append(_shorthand_scalar(member, list_shape, part, current))
        else:
            expected = ", ".join(shape.members)
            problem = f"unknown key {key!r}" if sep else "expected KEY=VALUE"
            raise UsageError(f"Error parsing parameter '{member.flag}': {problem};"
                             f" keys are {expected}")
    return result


def _structure(member: _Member, shape, token: str) -> dict:
    text = _text(member, token)
    if text.lstrip().startswith("{"):
        return _json(member, text, dict)
    return _shorthand(member, shape, text)


def _member_value(member: _Member, raw: Any) -> Any:
    shape = member.shape
    kind = shape.type_name if shape is not None else "string"
    if kind == "blob":
        return _blob(member, raw)
    if kind == "structure":
        return _structure(member, shape, raw)
    if kind == "list":
        # One token may be the whole list as JSON (also from file://), as in the AWS CLI.
        if len(raw) == 1:
            text = _text(member, raw[0])
            if text.lstrip().startswith("["):
                return _json(member, text, list)
        if shape.member.type_name == "structure":
            return [_structure(member, shape.member, token) for token in raw]
        return [_text(member, token) for token in raw]
    if kind == "string":
        return _text(member, raw)
    return raw  # integers and booleans: argparse converted them already


def _output_options(args: argparse.Namespace) -> OutputOptions:
    if args.query is not None:
        import jmespath

        try:
            jmespath.compile(args.query)
        except jmespath.exceptions.JMESPathError as exc:
            detail = getattr(exc, "message", None) or getattr(exc, "msg", str(exc))
            raise UsageError(f"Bad value for --query {args.query}: {detail}") from None
    return OutputOptions(args.output, args.query)


def request_from_args(args: argparse.Namespace) -> Request:
    """The daemon call a parsed client verb asks for; reads file://, fileb:// and stdin."""
    if not hasattr(args, "action"):
        raise UsageError(f"secretfs {args.verb}: error: not a client verb")
    params = {member.name: _member_value(member, getattr(args, member.name))
              for member in args.members if getattr(args, member.name) is not None}
    return Request(args.action, params, args.extension, _output_options(args),
                   resolve_state_dir(args.state_dir))


def build_request(argv: list[str]) -> Request:
    """Translate a client verb's command line into (action, params, output options)."""
    return request_from_args(parse_args(argv))


# --- output -----------------------------------------------------------------------

def _timestamp(epoch: float) -> str:
    # The AWS CLI prints timestamps in ISO 8601 with the local offset.
    return datetime.fromtimestamp(epoch, tz=UTC).astimezone().isoformat()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cli_values(value: Any, shape) -> Any:
    """The response as the AWS CLI shows it: timestamps as ISO 8601, blobs as base64.

    Without a shape (secretfs's own actions, or members the model lacks) a number
    under a `...Date` key is a timestamp, as in every Secrets Manager response.
    """
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    kind = shape.type_name if shape is not None else None
    if kind == "timestamp" and _is_number(value):
        return _timestamp(value)
    if isinstance(value, dict):
        if kind == "map":
            return {key: _cli_values(item, shape.value) for key, item in value.items()}
        members = shape.members if kind == "structure" else {}
        return {key: (_timestamp(item) if members.get(key) is None and key.endswith("Date")
                      and _is_number(item) else _cli_values(item, members.get(key)))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_cli_values(item, shape.member if kind == "list" else None) for item in value]
    return value


def _text_lines(item: Any, identifier: str | None = None,
                scalar_keys: list[str] | None = None) -> list[str]:
    """The AWS CLI's text output: a dict's scalars on one tab-separated line (sorted by
    key, led by the upper-cased key it sits under), then its lists and dicts."""
    if isinstance(item, dict):
        if scalar_keys is None:
            keys = sorted(key for key, value in item.items() if not isinstance(value, dict | list))
        else:
            keys = scalar_keys
        nested = sorted(key for key in item if key not in keys)
        lines = []
        if keys:
            row = [str(item.get(key, "")) for key in keys]
            lines.append("\t".join(([identifier.upper()] if identifier else []) + row))
        for key in nested:
            lines += _text_lines(item[key], key)
        return lines
    if isinstance(item, list):
        if any(isinstance(element, dict) for element in item):
            # Rows of one list line up: each gets every scalar key any element has.
            keys = sorted({key for element in item if isinstance(element, dict)
                           for key, value in element.items()
                           if not isinstance(value, dict | list)})
            return [line for element in item
                    for line in _text_lines(element, identifier, keys)]
        scalars = [element for element in item if not isinstance(element, list)]
        lines = []
        if scalars:
            if identifier:
                lines += [f"{identifier.upper()}\t{element}" for element in scalars]
            else:
                lines.append("\t".join(str(element) for element in scalars))
        for element in item:
            if isinstance(element, list):
                lines += _text_lines(element, identifier)
        return lines
    return [str(item)]


def format_response(response: Any, output: OutputOptions, action: str | None = None) -> str:
    """Render a response like the AWS CLI; `action` names the model shape to follow."""
    shape = _service_model().operation_model(action).output_shape if action else None
    result = _cli_values(response, shape)
    if isinstance(result, dict):
        result.pop("ResponseMetadata", None)
    if output.query is not None:
        import jmespath

        result = jmespath.search(output.query, result)
    if output.format == "text":
        lines = _text_lines(result)
        return "".join(line + "\n" for line in lines)
    if result == {}:
        return ""
    return json.dumps(result, indent=4, ensure_ascii=False) + "\n"


# --- running verbs ----------------------------------------------------------------

def _call(client, request: Request) -> dict:
    """One call, or every page of a paginated list when the caller did not ask for a
    page (no --next-token, --max-results): the AWS CLI paginates the same way."""
    response = client.call(request.action, request.params, extension=request.extension)
    paginator = None if request.extension else _paginator(request.action)
    if paginator is None or {paginator["input_token"], paginator.get("limit_key")} & request.params.keys():
        return response
    token_in, token_out, results = (paginator["input_token"], paginator["output_token"],
                                    paginator["result_key"])
    while response.get(token_out):
        page = client.call(request.action, {**request.params, token_in: response[token_out]})
        response[results] = response.get(results, []) + page.get(results, [])
        response[token_out] = page.get(token_out)
    response.pop(token_out, None)
    return response


def service_error(action: str, error: SecretsManagerError) -> int:
    """The AWS CLI's line for an error answer to `action`, on stderr; the exit code."""
    print(f"An error occurred ({error.code}) when calling the {action} operation: "
          f"{_one_line(error.message)}", file=sys.stderr)
    return EXIT_SERVICE_ERROR


def _run_client_verb(request: Request) -> int:
    from secretfs.api.client import Client, ClientConnectionError

    try:
        response = _call(Client(StateDir(request.state_dir).socket), request)
    except ClientConnectionError as exc:  # no daemon, no permission, a dropped connection
        raise CommandError(str(exc)) from None
    except SecretsManagerError as exc:
        return service_error(request.action, exc)
    sys.stdout.write(format_response(response, request.output,
                                     None if request.extension else request.action))
    return EXIT_OK


def _run_set_presentation(args: argparse.Namespace) -> int:
    from secretfs import presentation

    suffix = f":{args.key}" if args.key is not None else ""
    chosen = {presentation.OWNER: args.owner, presentation.GROUP: args.group,
              presentation.MODE: args.mode}
    if args.clear:
        if any(value is not None for value in chosen.values()):
            raise UsageError("secretfs set-presentation: --clear takes no --owner, --group "
                             "or --mode")
        action, params = "UntagResource", {"TagKeys": [key + suffix for key in chosen]}
    else:
        tags = [{"Key": key + suffix, "Value": value}
                for key, value in chosen.items() if value is not None]
        if not tags:
            raise UsageError("secretfs set-presentation: give --owner, --group, --mode "
                             "or --clear")
        action, params = "TagResource", {"Tags": tags}
    return _run_client_verb(Request(action, {"SecretId": args.secret_id, **params}, False,
                                    OutputOptions(), resolve_state_dir(args.state_dir)))


def _run_init(args: argparse.Namespace) -> int:
    from secretfs import daemon

    output = _output_options(args)
    state_dir = resolve_state_dir(args.state_dir)
    try:
        summary = daemon.init_state(state_dir, region=args.region, account_id=args.account_id,
                                    tls_hostnames=tuple(args.tls_hostnames),
                                    **_given(sealed=args.master_key_from_credential,
                                             store_url=args.store, join=args.join,
                                             keys_from=args.keys_from,
                                             key_provider=args.key_provider,
                                             kms_key_id=args.kms_key_id,
                                             kms_endpoint_url=args.kms_endpoint_url,
                                             kms_region=args.kms_region,
                                             passphrase=_init_passphrase(args)))
    except FileExistsError:
        raise CommandError(f"{state_dir} is already initialized") from None
    except daemon.DaemonError as exc:
        raise CommandError(str(exc)) from None
    master_key = summary.pop("MasterKey", None)
    if master_key is not None:
        sys.stderr.write(format_response(summary, output))
        _write_binary(master_key)
        return EXIT_OK
    sys.stdout.write(format_response(summary, output))
    return EXIT_OK


def _init_passphrase(args: argparse.Namespace) -> bytes | None:
    """The passphrase that seals a new key file (confirmed on a terminal), or that opens
    the fleet's copy a joining host installs."""
    from secretfs.crypto.passphrase import PassphraseError, read_passphrase

    if args.key_provider != "passphrase":
        if args.passphrase_file:
            raise UsageError("secretfs init: --passphrase-file goes with --key-provider "
                             "passphrase")
        return None
    try:
        return read_passphrase(args.passphrase_file, prompt="Passphrase for the key file: ",
                               confirm=not args.join)
    except PassphraseError as exc:
        raise CommandError(f"secretfs init: {exc}") from None


def _given(**options) -> dict:
    """The options a command line set (init passes on only those: the rest keep
    init_state's defaults)."""
    return {name: value for name, value in options.items() if value}


def _write_binary(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _run_export_master_key(args: argparse.Namespace) -> int:
    from secretfs.crypto.local import export_master_key

    state = StateDir(resolve_state_dir(args.state_dir))
    try:
        config = state.read_config()
        if config.get("KeyProvider", "local") != "local":
            raise CommandError(f"{state.root} uses the {config['KeyProvider']} key provider: "
                               "its master keys never leave it")
        key = export_master_key(state.keys, region=config["Region"],
                                account_id=config["AccountId"])
    except (ValueError, KeyError) as exc:
        raise CommandError(str(exc)) from None
    _write_binary(key)
    return EXIT_OK


def _run_ca_bundle(args: argparse.Namespace) -> int:
    path = StateDir(resolve_state_dir(args.state_dir)).ca_certificate
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{path}: no local CA certificate (run 'secretfs init')") from None
    sys.stdout.flush()
    sys.stdout.buffer.write(pem)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _run_mount(args: argparse.Namespace) -> int:
    from secretfs import daemon

    try:
        daemon.mount(args.mountpoint, resolve_state_dir(args.state_dir),
                     foreground=args.foreground, options=MountOptions.from_args(args),
                     **({"passphrase_file": args.passphrase_file} if args.passphrase_file
                        else {}))
    except daemon.DaemonError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK


def _run_umount(args: argparse.Namespace) -> int:
    from secretfs import daemon

    try:
        daemon.unmount(args.mountpoint, lazy=args.lazy)
    except daemon.DaemonError as exc:
        raise CommandError(str(exc)) from None
    return EXIT_OK


def _run_version(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"secretfs {version('secretfs')}")
    except PackageNotFoundError:
        print("secretfs (not installed)")
    return EXIT_OK


def _audit_dir(args: argparse.Namespace) -> Path:
    return StateDir(resolve_state_dir(args.state_dir)).audit_dir


def _print_records(records) -> None:
    for record in records:
        # Flushed per line: `tail --follow` feeds pipes that wait for each record.
        print(json.dumps(record, sort_keys=True, separators=(",", ":")), flush=True)


def _run_audit_verify(args: argparse.Namespace) -> int:
    from secretfs import audit

    result = audit.verify(_audit_dir(args))
    if not result.ok:
        raise CommandError(f"audit log FAILED: {result.problem}")
    anchor = f" ({result.anchor})" if result.anchor else ""
    print(f"audit log OK: {result.records} records in {len(result.files)} files{anchor}")
    return EXIT_OK


def _run_audit_tail(args: argparse.Namespace) -> int:
    from secretfs import audit

    directory = _audit_dir(args)
    records = audit.last_records(directory, args.n)
    _print_records(records)
    if args.follow:
        after = records[-1].get("seq") if records else None
        _print_records(audit.follow_records(directory, after=after))
    return EXIT_OK


def _run_audit_search(args: argparse.Namespace) -> int:
    from secretfs import audit

    _print_records(audit.read_records(
        _audit_dir(args), secret=args.secret, uid=args.uid, denied_only=args.denied_only,
        since=args.since, until=args.until))
    return EXIT_OK


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_text(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc.strerror or exc)


def main(argv: list[str] | None = None) -> int:
    """The `secretfs` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if hasattr(args, "run"):
            return args.run(args)
        return _run_client_verb(request_from_args(args))
    except SystemExit as exc:  # --help, printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except UsageError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"secretfs: {_one_line(_os_error_text(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
