"""RotateSecret and CancelRotateSecret: AWS's rotation semantics in the service.

Rotation functions written for AWS depend on these: the new version's id is the
token, it starts empty under AWSPENDING, createSecret's PutSecretValue fills it,
finishSecret's label move completes the rotation and AWSPENDING goes away.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from secretfs.model import (
    InvalidParameterException,
    InvalidRequestException,
    ResourceNotFoundException,
)

pytest_plugins = ["_service_fixtures"]

TOKEN = "11111111-2222-3333-4444-555555555555"
ROTATOR = "secretfs:random-password"


def stages(call, name: str) -> dict:
    return call("DescribeSecret", SecretId=name)["VersionIdsToStages"]


def rotate(call, **params) -> dict:
    return call("RotateSecret", SecretId="db", RotationLambdaARN=ROTATOR,
                RotationRules={"AutomaticallyAfterDays": 30}, **params)


@pytest.fixture
def current(call) -> str:
    return call("CreateSecret", Name="db", SecretString="old")["VersionId"]


def test_rotate_creates_an_empty_pending_version_named_by_the_token(call, current):
    started = rotate(call, ClientRequestToken=TOKEN)
    assert started["VersionId"] == TOKEN
    assert stages(call, "db") == {current: ["AWSCURRENT"], TOKEN: ["AWSPENDING"]}
    with pytest.raises(ResourceNotFoundException):
        call("GetSecretValue", SecretId="db", VersionStage="AWSPENDING")
    assert call("GetSecretValue", SecretId="db")["SecretString"] == "old"


def test_the_four_steps_as_an_aws_rotation_function_calls_them(env, call, current):
    rotate(call, ClientRequestToken=TOKEN)
    # createSecret: fill the pending version with the same token; no conflict.
    put = call("PutSecretValue", SecretId="db", ClientRequestToken=TOKEN, SecretString="new",
               VersionStages=["AWSPENDING"])
    assert put["VersionId"] == TOKEN and put["VersionStages"] == ["AWSPENDING"]
    assert call("GetSecretValue", SecretId="db", VersionStage="AWSPENDING")[
        "SecretString"] == "new"
    # setSecret / testSecret read AWSPENDING; AWSCURRENT still serves the old value.
    assert call("GetSecretValue", SecretId="db")["SecretString"] == "old"
    env.clock.advance(minutes=5)
    # finishSecret: move AWSCURRENT; AWSPREVIOUS follows, AWSPENDING goes away.
    call("UpdateSecretVersionStage", SecretId="db", VersionStage="AWSCURRENT",
         MoveToVersionId=TOKEN, RemoveFromVersionId=current)
    assert stages(call, "db") == {TOKEN: ["AWSCURRENT"], current: ["AWSPREVIOUS"]}
    described = call("DescribeSecret", SecretId="db")
    assert described["RotationEnabled"] is True
    assert described["RotationLambdaARN"] == ROTATOR
    assert described["RotationRules"]["AutomaticallyAfterDays"] == 30
    assert described["LastRotatedDate"] == env.clock.now
    next_date = described["NextRotationDate"]
    # The window is the day 30 days after the rotation; the start is inside it.
    day = (env.clock.now + timedelta(days=30)).replace(hour=0, minute=0, second=0,
                                                       microsecond=0)
    assert day <= next_date < day + timedelta(days=1)


def test_a_second_rotation_while_one_is_pending_fails_as_in_aws(call, current):
    rotate(call, ClientRequestToken=TOKEN)
    before = stages(call, "db")
    with pytest.raises(InvalidRequestException, match="previous rotation isn't complete"):
        rotate(call)
    assert stages(call, "db") == before
    # The same request again (same token) is not a second rotation.
    assert rotate(call, ClientRequestToken=TOKEN)["VersionId"] == TOKEN


def test_rotation_may_start_when_pending_is_on_the_current_version(call, current):
    call("UpdateSecretVersionStage", SecretId="db", VersionStage="AWSPENDING",
         MoveToVersionId=current)
    started = rotate(call)
    assert stages(call, "db")[started["VersionId"]] == ["AWSPENDING"]


def test_a_manual_promotion_keeps_awspending(call, current):
    """Outside a rotation, AWSPENDING is an ordinary label a person moves."""
    new = call("PutSecretValue", SecretId="db", SecretString="new",
               VersionStages=["AWSPENDING"])["VersionId"]
    call("UpdateSecretVersionStage", SecretId="db", VersionStage="AWSCURRENT",
         MoveToVersionId=new, RemoveFromVersionId=current)
    assert stages(call, "db") == {new: ["AWSCURRENT", "AWSPENDING"], current: ["AWSPREVIOUS"]}


def test_rotate_later_schedules_without_a_new_version(env, call, current):
    response = call("RotateSecret", SecretId="db", RotationLambdaARN=ROTATOR,
                    RotationRules={"ScheduleExpression": "cron(0 16 1,15 * ? *)",
                                   "Duration": "2h"}, RotateImmediately=False)
    assert "VersionId" not in response
    assert stages(call, "db") == {current: ["AWSCURRENT"]}
    described = call("DescribeSecret", SecretId="db")
    next_date = described["NextRotationDate"]
    assert next_date > env.clock.now and next_date.hour in (16, 17) and next_date.day in (1, 15)
    assert described["RotationRules"]["ScheduleExpression"] == "cron(0 16 1,15 * ? *)"


def test_cancel_turns_rotation_off(call, current):
    rotate(call, ClientRequestToken=TOKEN)
    cancelled = call("CancelRotateSecret", SecretId="db")
    assert cancelled["VersionId"] == TOKEN
    described = call("DescribeSecret", SecretId="db")
    assert described["RotationEnabled"] is False
    assert "NextRotationDate" not in described
    with pytest.raises(InvalidRequestException):
        call("CancelRotateSecret", SecretId="db")


@pytest.mark.parametrize(("params", "error"), [
    ({"RotationLambdaARN": "arn:aws:lambda:us-east-1:1:function:f"}, InvalidParameterException),
    ({"RotationLambdaARN": "secretfs:no-such"}, InvalidParameterException),
    ({"RotationLambdaARN": ROTATOR, "RotationRules": {"ScheduleExpression": "rate(0 days)"}},
     InvalidParameterException),
    ({"RotationLambdaARN": ROTATOR, "RotationRules": {"ScheduleExpression": "cron(0 * * * ? *)"}},
     InvalidParameterException),
    ({"RotationLambdaARN": ROTATOR, "RotationRules": {
        "AutomaticallyAfterDays": 1, "ScheduleExpression": "rate(2 days)"}},
     InvalidParameterException),
    ({}, InvalidRequestException),  # no rotator was ever configured
])
def test_bad_rotation_requests_change_nothing(env, call, current, params, error):
    before = env.snapshot("db")
    with pytest.raises(error):
        call("RotateSecret", SecretId="db", **params)
    assert env.snapshot("db") == before


def test_rotating_a_secret_without_a_value_is_refused(call):
    call("CreateSecret", Name="empty")
    with pytest.raises(InvalidRequestException):
        call("RotateSecret", SecretId="empty", RotationLambdaARN=ROTATOR)
