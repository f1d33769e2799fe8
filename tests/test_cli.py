"""Unit tests of the `secretfs` command: flags → (action, params), output, errors.

The client and the daemon are replaced by tiny fakes installed as the modules the
CLI imports lazily; end-to-end runs against a real daemon live elsewhere.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import pytest

import secretfs
from secretfs import cli
from secretfs.model import ResourceNotFoundException
from secretfs.options import MountOptions, OptionsError
from secretfs.state import DEFAULT_ACCOUNT_ID, DEFAULT_REGION

ARN = "arn:aws:secretsmanager:us-east-1:000000000000:secret:prod/db-AbCdEf"
VID = "11111111-2222-3333-4444-555555555555"
TOKEN = "a" * 32
# 2026-11-28T10:00:00.123 UTC
WHEN = datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=UTC).timestamp()


def request(*argv: str) -> tuple[str, dict]:
    built = cli.build_request(list(argv))
    return built.action, built.params


def verb_parser(verb: str | None):
    """The subparser of `verb` (or, for None, the verbs action), built as main() builds it."""
    verbs = cli.build_parser(verb)._subparsers._group_actions[0]
    return verbs if verb is None else verbs.choices[verb]


# --- fakes --------------------------------------------------------------------------

class FakeClientConnectionError(Exception):
    pass


class FakeDaemonNotRunning(FakeClientConnectionError):
    pass


class FakeDaemonError(Exception):
    pass


class Recorder:
    """Answers client calls from `responses` (a list, or a callable) and records them."""

    def __init__(self):
        self.calls: list[tuple[str, dict, bool]] = []
        self.sockets: list[Path] = []
        self.responses: list = []

    def answer(self, action: str, params: dict, extension: bool):
        self.calls.append((action, params, extension))
        response = self.responses.pop(0) if self.responses else {}
        if isinstance(response, Exception):
            raise response
        return response


@pytest.fixture
def client(monkeypatch) -> Recorder:
    recorder = Recorder()

    class Client:
        def __init__(self, socket_path: Path):
            recorder.sockets.append(socket_path)

        def call(self, action: str, params: dict, *, extension: bool = False) -> dict:
            return recorder.answer(action, params, extension)

    module = types.ModuleType("secretfs.api.client")
    module.Client = Client
    module.DaemonNotRunning = FakeDaemonNotRunning
    module.ClientConnectionError = FakeClientConnectionError
    monkeypatch.setitem(sys.modules, "secretfs.api.client", module)
    return recorder


@pytest.fixture
def daemon(monkeypatch) -> types.ModuleType:
    module = types.ModuleType("secretfs.daemon")
    module.DaemonError = FakeDaemonError
    module.calls = []

    def init_state(state_dir, *, region, account_id, tls_hostnames=()):
        module.calls.append(("init_state", state_dir, region, account_id))
        if state_dir.name == "taken":
            raise FileExistsError(state_dir)
        return {"StateDir": str(state_dir), "Region": region, "AccountId": account_id}

    def mount(mountpoint, state_dir, *, foreground, options):
        module.calls.append(("mount", mountpoint, state_dir, foreground, options))
        if mountpoint.name == "busy":
            raise FakeDaemonError(f"{mountpoint} is already mounted\n(see daemon.log)")

    def unmount(mountpoint, *, lazy=False):
        module.calls.append(("unmount", mountpoint, lazy))

    module.init_state, module.mount, module.unmount = init_state, mount, unmount
    monkeypatch.setitem(sys.modules, "secretfs.daemon", module)
    # `from secretfs import daemon` prefers the package attribute when one exists.
    monkeypatch.setattr(secretfs, "daemon", module, raising=False)
    return module


@pytest.fixture
def stdin(monkeypatch):
    def feed(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return feed


@pytest.fixture
def local_tz(monkeypatch):
    def use(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()
    yield use
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(autouse=True)
def no_state_dir_env(monkeypatch):
    monkeypatch.delenv("SECRETFS_STATE_DIR", raising=False)


# --- every exposed verb -------------------------------------------------------------

@pytest.mark.parametrize(("argv", "action", "params"), [
    (["create-secret", "--name", "prod/db", "--secret-string", "pw", "--description", "d",
      "--kms-key-id", "alias/app", "--client-request-token", TOKEN],
     "CreateSecret", {"Name": "prod/db", "SecretString": "pw", "Description": "d",
                      "KmsKeyId": "alias/app", "ClientRequestToken": TOKEN}),
    (["put-secret-value", "--secret-id", "prod/db", "--secret-string", "pw2",
      "--version-stages", "AWSCURRENT", "AWSPENDING"],
     "PutSecretValue", {"SecretId": "prod/db", "SecretString": "pw2",
                        "VersionStages": ["AWSCURRENT", "AWSPENDING"]}),
    (["get-secret-value", "--secret-id", ARN, "--version-stage", "AWSPREVIOUS"],
     "GetSecretValue", {"SecretId": ARN, "VersionStage": "AWSPREVIOUS"}),
    (["get-secret-value", "--secret-id", "prod/db", "--version-id", VID],
     "GetSecretValue", {"SecretId": "prod/db", "VersionId": VID}),
    (["batch-get-secret-value", "--secret-id-list", "a", "b", "c"],
     "BatchGetSecretValue", {"SecretIdList": ["a", "b", "c"]}),
    (["update-secret", "--secret-id", "prod/db", "--description", "new", "--kms-key-id", "k"],
     "UpdateSecret", {"SecretId": "prod/db", "Description": "new", "KmsKeyId": "k"}),
    (["update-secret-version-stage", "--secret-id", "s", "--version-stage", "AWSCURRENT",
      "--move-to-version-id", VID, "--remove-from-version-id", "old"],
     "UpdateSecretVersionStage", {"SecretId": "s", "VersionStage": "AWSCURRENT",
                                  "MoveToVersionId": VID, "RemoveFromVersionId": "old"}),
    (["describe-secret", "--secret-id", "s"], "DescribeSecret", {"SecretId": "s"}),
    (["list-secrets"], "ListSecrets", {}),
    (["list-secrets", "--max-results", "5", "--next-token", "t", "--sort-order", "asc",
      "--sort-by", "name"],
     "ListSecrets", {"MaxResults": 5, "NextToken": "t", "SortOrder": "asc", "SortBy": "name"}),
    (["list-secret-version-ids", "--secret-id", "s", "--include-deprecated"],
     "ListSecretVersionIds", {"SecretId": "s", "IncludeDeprecated": True}),
    (["delete-secret", "--secret-id", "s", "--recovery-window-in-days", "7"],
     "DeleteSecret", {"SecretId": "s", "RecoveryWindowInDays": 7}),
    (["delete-secret", "--secret-id", "s", "--force-delete-without-recovery"],
     "DeleteSecret", {"SecretId": "s", "ForceDeleteWithoutRecovery": True}),
    (["restore-secret", "--secret-id", "s"], "RestoreSecret", {"SecretId": "s"}),
    (["tag-resource", "--secret-id", "s", "--tags", "Key=env,Value=prod"],
     "TagResource", {"SecretId": "s", "Tags": [{"Key": "env", "Value": "prod"}]}),
    (["untag-resource", "--secret-id", "s", "--tag-keys", "env", "team"],
     "UntagResource", {"SecretId": "s", "TagKeys": ["env", "team"]}),
    (["get-random-password", "--password-length", "20", "--exclude-punctuation",
      "--exclude-characters", "abc", "--require-each-included-type"],
     "GetRandomPassword", {"PasswordLength": 20, "ExcludePunctuation": True,
                           "ExcludeCharacters": "abc", "RequireEachIncludedType": True}),
])
def test_aws_verb_translates_to_action_and_params(argv, action, params):
    built = cli.build_request(argv)
    assert (built.action, built.params, built.extension) == (action, params, False)


def test_exposed_verbs_are_exactly_the_listed_actions():
    verbs = set(verb_parser(None).choices)
    assert verbs == {cli.xform_name(action, "-") for action in cli.AWS_ACTIONS} | {
        "init", "ca-bundle", "mount", "umount", "create-key", "list-keys", "export-master-key",
        "version", "audit",
        "put-identity-policy", "get-identity-policy", "delete-identity-policy",
        "list-identity-policies", "create-access-key", "list-access-keys", "delete-access-key",
        "set-presentation",
        "import", "backup", "restore", "status", "refresh", "wait", "rotate-key", "re-encrypt"}


@pytest.mark.parametrize("action", cli.AWS_ACTIONS)
def test_every_model_member_is_a_kebab_flag_and_required_ones_are_required(action):
    shape = cli._service_model().operation_model(action).input_shape
    verb = cli.xform_name(action, "-")
    by_dest = {a.dest: a for a in verb_parser(verb)._actions}
    for name in shape.members:
        flag = "--" + cli.xform_name(name, "-")
        assert flag in by_dest[name].option_strings
        assert by_dest[name].required == (name in shape.required_members)
        assert not re.search(r"</?[a-z]", by_dest[name].help), "help must be stripped of HTML"
        assert "\n" not in by_dest[name].help


def test_flag_names_follow_the_aws_cli():
    flags = {flag for action in verb_parser("delete-secret")._actions
             for flag in action.option_strings}
    assert {"--secret-id", "--force-delete-without-recovery",
            "--no-force-delete-without-recovery", "--recovery-window-in-days"} <= flags


def test_extension_verbs_call_with_extension_flag():
    built = cli.build_request(["create-key", "--alias", "alias/app", "--description", "d"])
    assert (built.action, built.params, built.extension) == (
        "CreateKey", {"Alias": "alias/app", "Description": "d"}, True)
    built = cli.build_request(["list-keys"])
    assert (built.action, built.params, built.extension) == ("ListKeys", {}, True)


def test_local_verb_is_not_a_request():
    with pytest.raises(cli.UsageError):
        cli.build_request(["version"])


# --- booleans, lists, structures ---------------------------------------------------

def test_booleans_are_flag_and_no_flag_and_omitted_when_absent():
    assert request("list-secrets", "--include-planned-deletion")[1] == {"IncludePlannedDeletion": True}
    assert request("list-secrets", "--no-include-planned-deletion")[1] == {
        "IncludePlannedDeletion": False}
    assert "ForceDeleteWithoutRecovery" not in request("delete-secret", "--secret-id", "s")[1]


def test_list_of_strings_takes_several_values_or_json():
    assert request("untag-resource", "--secret-id", "s", "--tag-keys", '["a","b"]')[1][
        "TagKeys"] == ["a", "b"]
    assert request("batch-get-secret-value", "--secret-id-list", "only")[1] == {
        "SecretIdList": ["only"]}


@pytest.mark.parametrize("tags", [
    ['[{"Key":"env","Value":"prod"},{"Key":"team","Value":"db"}]'],
    ['{"Key":"env","Value":"prod"}', '{"Key":"team","Value":"db"}'],
    ["Key=env,Value=prod", "Key=team,Value=db"],
    ["Key=env, Value=prod", "Value=db,Key=team"],
])
def test_tags_take_json_or_shorthand(tags):
    _, params = request("tag-resource", "--secret-id", "s", "--tags", *tags)
    assert sorted(params["Tags"], key=lambda t: t["Key"]) == [
        {"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "db"}]


def test_shorthand_quotes_and_escapes_keep_commas_and_equals():
    _, params = request("tag-resource", "--secret-id", "s", "--tags",
                        'Key=a,Value="x,y"', r"Key=b,Value=p\,q", "Key=c,Value=k=v")
    assert params["Tags"] == [{"Key": "a", "Value": "x,y"}, {"Key": "b", "Value": "p,q"},
                              {"Key": "c", "Value": "k=v"}]


@pytest.mark.parametrize(("filters", "expected"), [
    (["Key=name,Values=prod,dev"], [{"Key": "name", "Values": ["prod", "dev"]}]),
    (["Key=name,Values=[prod,dev]"], [{"Key": "name", "Values": ["prod", "dev"]}]),
    (["Values=prod,dev,Key=name"], [{"Key": "name", "Values": ["prod", "dev"]}]),
    (["Key=name,Values=prod", "Key=tag-key,Values=env"],
     [{"Key": "name", "Values": ["prod"]}, {"Key": "tag-key", "Values": ["env"]}]),
    (['[{"Key":"description","Values":["a b"]}]'], [{"Key": "description", "Values": ["a b"]}]),
])
def test_filters_take_shorthand_or_json(filters, expected):
    assert request("list-secrets", "--filters", *filters)[1]["Filters"] == expected
    assert request("batch-get-secret-value", "--filters", *filters)[1]["Filters"] == expected


@pytest.mark.parametrize(("tags", "fragment"), [
    ("Colour=red", "unknown key 'Colour'; keys are Key, Value"),
    ("justtext", "expected KEY=VALUE"),
    ('[{"Key": "a",', "Invalid JSON"),
    ('{"Key": "a"', "Invalid JSON"),
    ('{"Key": "a"}]', "Invalid JSON"),
])
def test_bad_structures_are_one_line_usage_errors(tags, fragment, capsys):
    assert cli.main(["tag-resource", "--secret-id", "s", "--tags", tags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("Error parsing parameter '--tags': ")
    assert fragment in err


def test_json_passes_through_for_the_api_to_validate():
    # The API validates against the same model; the CLI only checks the JSON's outer type.
    assert request("tag-resource", "--secret-id", "s", "--tags", '["Key=a"]')[1]["Tags"] == [
        "Key=a"]


def test_json_list_file_feeds_a_list_flag(tmp_path):
    tags = tmp_path / "tags.json"
    tags.write_text('[{"Key": "env", "Value": "prod"}]')
    assert request("tag-resource", "--secret-id", "s", "--tags", f"file://{tags}")[1]["Tags"] == [
        {"Key": "env", "Value": "prod"}]


# --- values from files and stdin -------------------------------------------------------

def test_file_uri_is_read_byte_for_byte_with_trailing_newline(tmp_path):
    value = tmp_path / "value"
    value.write_bytes('{"password": "p\u00e4ss"}\r\nsecond line\n'.encode())
    _, params = request("put-secret-value", "--secret-id", "s", "--secret-string",
                        f"file://{value}")
    assert params["SecretString"] == '{"password": "p\u00e4ss"}\r\nsecond line\n'


def test_file_uri_works_for_any_string_flag(tmp_path):
    description = tmp_path / "description"
    description.write_text("from a file\n")
    _, params = request("update-secret", "--secret-id", "s", "--description",
                        f"file://{description}")
    assert params["Description"] == "from a file\n"


def test_fileb_uri_reads_raw_bytes(tmp_path):
    blob = tmp_path / "blob"
    data = bytes(range(256)) + b"\n"
    blob.write_bytes(data)
    _, params = request("create-secret", "--name", "n", "--secret-binary", f"fileb://{blob}")
    assert params["SecretBinary"] == data


def test_literal_secret_binary_is_base64_like_aws_cli_v2():
    _, params = request("create-secret", "--name", "n", "--secret-binary",
                        base64.b64encode(b"\x00\xffbin").decode())
    assert params["SecretBinary"] == b"\x00\xffbin"


def test_stdin_dash_reads_secret_string_as_text(stdin):
    stdin("hunter2 \u00e9\n".encode())
    _, params = request("put-secret-value", "--secret-id", "s", "--secret-string", "-")
    assert params["SecretString"] == "hunter2 \u00e9\n"


def test_stdin_dash_reads_secret_binary_as_raw_bytes(stdin):
    stdin(b"\x00\x01\xfe\xff\n")
    _, params = request("put-secret-value", "--secret-id", "s", "--secret-binary", "-")
    assert params["SecretBinary"] == b"\x00\x01\xfe\xff\n"


def test_dash_is_a_plain_value_for_other_flags(stdin):
    stdin(b"must not be read")
    assert request("update-secret", "--secret-id", "s", "--description", "-")[1][
        "Description"] == "-"


def test_missing_file_is_a_one_line_error_exit_1(tmp_path, capsys, client):
    missing = tmp_path / "nope"
    code = cli.main(["create-secret", "--name", "n", "--secret-string", f"file://{missing}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE
    assert err == (f"Error parsing parameter '--secret-string': Unable to load paramfile "
                   f"file://{missing}: No such file or directory\n")
    assert client.calls == []


def test_non_utf8_file_for_a_string_is_an_error(tmp_path, capsys, client):
    value = tmp_path / "bin"
    value.write_bytes(b"\xff\xfe")
    assert cli.main(["create-secret", "--name", "n", "--secret-string",
                     f"file://{value}"]) == cli.EXIT_FAILURE
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_invalid_base64_does_not_echo_the_value(capsys, client):
    code = cli.main(["create-secret", "--name", "n", "--secret-binary", "s3cr3t!value"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "Invalid base64" in err and "s3cr3t" not in err
    assert err.count("\n") == 1


def test_fileb_for_a_string_flag_is_refused(tmp_path, capsys):
    assert cli.main(["create-secret", "--name", "n", "--secret-string",
                     f"fileb://{tmp_path}"]) == cli.EXIT_USAGE
    assert "use file://" in capsys.readouterr().err


# --- output ------------------------------------------------------------------------

GET_RESPONSE = {"ARN": ARN, "Name": "prod/db", "VersionId": VID, "SecretString": "pa\tss\n",
                "VersionStages": ["AWSCURRENT"], "CreatedDate": WHEN}

LIST_RESPONSE = {"SecretList": [
    {"ARN": ARN, "Name": "prod/db", "LastChangedDate": WHEN,
     "Tags": [{"Key": "env", "Value": "prod"}],
     "SecretVersionsToStages": {VID: ["AWSCURRENT"]}},
    {"ARN": ARN + "2", "Name": "prod/api", "Description": "api key"},
]}


def render(action: str | None, response: dict, *options: str) -> str:
    built = cli.build_request(["list-secrets", *options])
    return cli.format_response(response, built.output, action)


def test_json_output_is_indented_4_with_iso_dates(local_tz):
    local_tz("UTC")
    out = render("GetSecretValue", GET_RESPONSE)
    assert out == json.dumps({**GET_RESPONSE, "CreatedDate": "2026-11-28T10:00:00.123000+00:00"},
                             indent=4) + "\n"


@pytest.mark.parametrize(("tz", "epoch", "expected"), [
    ("UTC", WHEN, "2026-11-28T10:00:00.123000+00:00"),
    ("EET-2", WHEN, "2026-11-28T12:00:00.123000+02:00"),
    ("UTC", int(WHEN), "2026-11-28T10:00:00+00:00"),
])
def test_timestamps_use_the_local_offset(local_tz, tz, epoch, expected):
    local_tz(tz)
    out = json.loads(render("DescribeSecret", {"Name": "n", "CreatedDate": epoch,
                                               "VersionIdsToStages": {VID: ["AWSCURRENT"]}}))
    assert out == {"Name": "n", "CreatedDate": expected, "VersionIdsToStages": {VID: ["AWSCURRENT"]}}


def test_nested_timestamps_and_blobs_follow_the_output_shape(local_tz):
    local_tz("UTC")
    response = {"SecretValues": [{"Name": "b", "SecretBinary": b"\x00\xff", "CreatedDate": WHEN}],
                "Errors": []}
    out = json.loads(render("BatchGetSecretValue", response))
    assert out["SecretValues"][0] == {"Name": "b", "SecretBinary": "AP8=",
                                      "CreatedDate": "2026-11-28T10:00:00.123000+00:00"}


def test_extension_responses_convert_dates_and_bytes_by_convention(local_tz):
    local_tz("UTC")
    out = json.loads(render(None, {"Keys": [{"Alias": "alias/a", "CreationDate": WHEN,
                                            "Material": b"\x01"}]}))
    assert out == {"Keys": [{"Alias": "alias/a", "CreationDate": "2026-11-28T10:00:00.123000+00:00",
                             "Material": "AQ=="}]}


def test_query_with_text_output_prints_the_bare_value():
    assert render("GetSecretValue", GET_RESPONSE, "--query", "SecretString",
                  "--output", "text") == "pa\tss\n\n"


def test_query_applies_before_json_output():
    assert render("ListSecrets", LIST_RESPONSE, "--query", "SecretList[].Name") == (
        '[\n    "prod/db",\n    "prod/api"\n]\n')


def test_query_sees_binary_as_base64():
    out = render("GetSecretValue", {"Name": "b", "SecretBinary": b"\x00\xff"},
                 "--query", "SecretBinary", "--output", "text")
    assert out == "AP8=\n"


def test_text_output_is_aws_cli_style(local_tz):
    # Rows of one list share its sorted scalar keys; nested values follow their row.
    local_tz("UTC")
    out = render("ListSecrets", LIST_RESPONSE, "--output", "text")
    assert out.splitlines() == [
        f"SECRETLIST\t{ARN}\t\t2026-11-28T10:00:00.123000+00:00\tprod/db",
        f"{VID.upper()}\tAWSCURRENT",
        "TAGS\tenv\tprod",
        f"SECRETLIST\t{ARN}2\tapi key\t\tprod/api",
    ]


def test_text_output_rows_and_lists():
    out = render("DescribeSecret", {"Name": "n", "RotationEnabled": False,
                                    "Tags": [{"Key": "env", "Value": "prod"},
                                             {"Key": "team", "Value": "db"}],
                                    "VersionIdsToStages": {VID: ["AWSCURRENT", "AWSPENDING"]}},
                 "--output", "text")
    assert out.splitlines() == [
        "n\tFalse",
        "TAGS\tenv\tprod",
        "TAGS\tteam\tdb",
        f"{VID.upper()}\tAWSCURRENT",
        f"{VID.upper()}\tAWSPENDING",
    ]


def test_text_output_of_a_scalar_list_is_one_line():
    assert render("ListSecrets", LIST_RESPONSE, "--query", "SecretList[].Name",
                  "--output", "text") == "prod/db\tprod/api\n"


def test_bad_query_is_a_usage_error(capsys):
    assert cli.main(["list-secrets", "--query", "foo bar"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "Bad value for --query foo bar: Unexpected token: bar\n"


# --- running client verbs -----------------------------------------------------------

def test_main_calls_the_daemon_on_the_state_dir_socket(client, capsys, tmp_path, local_tz):
    local_tz("UTC")
    client.responses = [GET_RESPONSE]
    code = cli.main(["get-secret-value", "--secret-id", "prod/db", "--state-dir", str(tmp_path)])
    assert code == 0
    assert client.sockets == [tmp_path / "control.sock"]
    assert client.calls == [("GetSecretValue", {"SecretId": "prod/db"}, False)]
    assert json.loads(capsys.readouterr().out)["CreatedDate"] == "2026-11-28T10:00:00.123000+00:00"


def test_state_dir_comes_from_the_environment_else_the_default(client, monkeypatch, tmp_path):
    client.responses = [{}, {}]
    cli.main(["list-keys"])
    monkeypatch.setenv("SECRETFS_STATE_DIR", str(tmp_path))
    cli.main(["list-keys"])
    assert client.sockets == [Path("/var/lib/secretfs/control.sock"), tmp_path / "control.sock"]
    assert client.calls[0] == ("ListKeys", {}, True)


def test_service_error_is_one_aws_style_line_exit_254(client, capsys):
    client.responses = [ResourceNotFoundException("Secrets Manager can't find the specified secret.")]
    code = cli.main(["get-secret-value", "--secret-id", "nope"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SERVICE_ERROR == 254
    assert captured.out == ""
    assert captured.err == ("An error occurred (ResourceNotFoundException) when calling the "
                            "GetSecretValue operation: Secrets Manager can't find the specified "
                            "secret.\n")


def test_extension_service_error_names_its_action(client, capsys):
    from secretfs.model import ResourceExistsException

    client.responses = [ResourceExistsException("alias/app exists")]
    assert cli.main(["create-key", "--alias", "alias/app"]) == 254
    assert capsys.readouterr().err == ("An error occurred (ResourceExistsException) when calling "
                                       "the CreateKey operation: alias/app exists\n")


def test_daemon_not_running_is_one_line_exit_1(client, capsys):
    client.responses = [FakeDaemonNotRunning("secretfs daemon is not running (no /x/control.sock)")]
    assert cli.main(["list-secrets"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "secretfs daemon is not running (no /x/control.sock)\n"


def test_list_secrets_follows_next_token_like_the_aws_cli(client, capsys):
    client.responses = [
        {"SecretList": [{"Name": "a"}], "NextToken": "t1"},
        {"SecretList": [{"Name": "b"}], "NextToken": "t2"},
        {"SecretList": [{"Name": "c"}]},
    ]
    assert cli.main(["list-secrets", "--filters", "Key=name,Values=x",
                     "--query", "SecretList[].Name", "--output", "text"]) == 0
    assert capsys.readouterr().out == "a\tb\tc\n"
    filters = [{"Key": "name", "Values": ["x"]}]
    assert client.calls == [
        ("ListSecrets", {"Filters": filters}, False),
        ("ListSecrets", {"Filters": filters, "NextToken": "t1"}, False),
        ("ListSecrets", {"Filters": filters, "NextToken": "t2"}, False),
    ]


@pytest.mark.parametrize("page_flag", [["--max-results", "1"], ["--next-token", "t0"]])
def test_asking_for_a_page_turns_pagination_off(client, capsys, page_flag):
    client.responses = [{"SecretList": [{"Name": "a"}], "NextToken": "t1"}]
    assert cli.main(["list-secrets", *page_flag]) == 0
    assert json.loads(capsys.readouterr().out)["NextToken"] == "t1"
    assert len(client.calls) == 1


# --- usage errors -------------------------------------------------------------------

def test_missing_required_flag_is_one_line_exit_252(capsys):
    assert cli.main(["get-secret-value"]) == cli.EXIT_USAGE == 252
    err = capsys.readouterr().err
    assert err == ("secretfs get-secret-value: error: the following arguments are required: "
                   "--secret-id\n")


def test_unknown_flag_names_the_flag_but_not_the_value(capsys):
    assert cli.main(["put-secret-value", "--secret-id", "s", "--secret-strng", "hunter2"]) == 252
    err = capsys.readouterr().err
    assert err == "secretfs put-secret-value: error: unrecognized arguments: --secret-strng\n"


def test_unknown_verb_and_no_verb_are_usage_errors(capsys):
    assert cli.main(["get-secret"]) == 252
    assert "invalid choice: 'get-secret'" in capsys.readouterr().err
    assert cli.main([]) == 252
    assert capsys.readouterr().err.count("\n") == 1


def test_no_abbreviated_flags(capsys):
    assert cli.main(["get-secret-value", "--secret", "s"]) == 252


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "create-secret" in capsys.readouterr().out
    assert cli.main(["create-secret", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--secret-string" in out and "<p>" not in out and "file://PATH" in out


# --- local verbs -------------------------------------------------------------------

def test_init_prints_the_summary_as_json(daemon, capsys, tmp_path):
    assert cli.main(["init", "--state-dir", str(tmp_path), "--region", "eu-west-1",
                     "--account-id", "123456789012"]) == 0
    assert daemon.calls == [("init_state", tmp_path, "eu-west-1", "123456789012")]
    assert json.loads(capsys.readouterr().out) == {
        "StateDir": str(tmp_path), "Region": "eu-west-1", "AccountId": "123456789012"}


def test_init_defaults(daemon, capsys, tmp_path):
    assert cli.main(["init", "--state-dir", str(tmp_path)]) == 0
    assert daemon.calls == [("init_state", tmp_path, DEFAULT_REGION, DEFAULT_ACCOUNT_ID)]


def test_init_twice_is_one_line_exit_1(daemon, capsys, tmp_path):
    taken = tmp_path / "taken"
    assert cli.main(["init", "--state-dir", str(taken)]) == 1
    assert capsys.readouterr().err == f"{taken} is already initialized\n"


def test_mount_and_umount_call_the_daemon(daemon, tmp_path):
    assert cli.main(["mount", str(tmp_path / "mnt"), "--state-dir", str(tmp_path),
                     "--foreground", "--debug"]) == 0
    assert cli.main(["mount", str(tmp_path / "mnt"), "--listen", "127.0.0.1:8443",
                     "--strict-names"]) == 0
    assert cli.main(["umount", str(tmp_path / "mnt"), "--lazy"]) == 0
    assert daemon.calls == [
        ("mount", tmp_path / "mnt", tmp_path, True, MountOptions(debug=True)),
        ("mount", tmp_path / "mnt", Path("/var/lib/secretfs"), False,
         MountOptions(strict_names=True, listen="127.0.0.1:8443")),
        ("unmount", tmp_path / "mnt", True),
    ]


def test_mount_options_reach_the_daemon_process_whole():
    """The detached daemon gets the options as flags: what it parses is what was given."""
    import argparse

    given = MountOptions(debug=True, strict_names=True, listen="[::1]:8443",
                         tls_certificate="/etc/c.pem", tls_key="/etc/k.pem")
    parser = argparse.ArgumentParser()
    MountOptions.add_arguments(parser)
    assert MountOptions.from_args(parser.parse_args(given.argv())) == given
    assert given.endpoint() == ("::1", 8443)
    assert MountOptions(listen="127.0.0.1:80", plain_http=True).endpoint() == ("127.0.0.1", 80)
    for listen, plain in (("8443", False), ("host:99999", False), ("10.0.0.1:80", True)):
        with pytest.raises(OptionsError):
            MountOptions(listen=listen, plain_http=plain).endpoint()
    config = {"Listen": "127.0.0.1:9443", "PlainHttp": True}
    assert MountOptions().with_config(config) == MountOptions(listen="127.0.0.1:9443",
                                                              plain_http=True)
    assert MountOptions(listen="127.0.0.1:1").with_config(config).listen == "127.0.0.1:1"


def test_daemon_error_is_one_line_exit_1(daemon, capsys, tmp_path):
    assert cli.main(["mount", str(tmp_path / "busy")]) == 1
    assert capsys.readouterr().err == f"{tmp_path / 'busy'} is already mounted (see daemon.log)\n"


def test_version(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("secretfs ")


def test_local_verbs_load_neither_the_model_nor_the_client_and_client_verbs_not_the_daemon():
    script = (
        "import sys\n"
        "from secretfs import cli\n"
        "cli.parse_args(['umount', '/mnt'])\n"
        "assert 'botocore.session' not in sys.modules\n"
        "cli.build_request(['list-secrets'])\n"
        "assert 'botocore.session' in sys.modules\n"
        "assert 'secretfs.daemon' not in sys.modules and 'pyfuse3' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
