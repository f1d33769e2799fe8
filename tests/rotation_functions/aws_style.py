"""A rotation function written the way rotation functions for AWS Lambda are:
boto3's Secrets Manager client pointed at SECRETS_MANAGER_ENDPOINT, settings from
the environment, the checks AWS's published templates make before each step.
Nothing in it knows about secretfs."""

import json
import os

import boto3


def lambda_handler(event, context):
    arn, token, step = event["SecretId"], event["ClientRequestToken"], event["Step"]
    client = boto3.client("secretsmanager", endpoint_url=os.environ["SECRETS_MANAGER_ENDPOINT"])
    metadata = client.describe_secret(SecretId=arn)
    if not metadata["RotationEnabled"]:
        raise ValueError("rotation is not enabled")
    versions = metadata["VersionIdsToStages"]
    if token not in versions:
        raise ValueError("no such version")
    if "AWSCURRENT" in versions[token]:
        return  # already current: a repeated finishSecret
    if "AWSPENDING" not in versions[token]:
        raise ValueError("version not pending")
    if context.get_remaining_time_in_millis() <= 0:
        raise TimeoutError("no time left")
    if os.environ.get("FAIL_AT") == step:
        raise ConnectionRefusedError("the service at password=hunter2 refused")
    {"createSecret": create_secret, "setSecret": lambda *_: None,
     "testSecret": test_secret, "finishSecret": finish_secret}[step](client, arn, token)


def create_secret(client, arn, token):
    current = json.loads(client.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")[
        "SecretString"])
    try:
        client.get_secret_value(SecretId=arn, VersionId=token, VersionStage="AWSPENDING")
        return
    except client.exceptions.ResourceNotFoundException:
        pass
    password = client.get_random_password(
        ExcludeCharacters=os.environ.get("EXCLUDE_CHARACTERS", "/@\"'\\"),
        PasswordLength=int(os.environ.get("PASSWORD_LENGTH", "32")))["RandomPassword"]
    current["password"] = password
    client.put_secret_value(SecretId=arn, ClientRequestToken=token,
                            SecretString=json.dumps(current), VersionStages=["AWSPENDING"])


def test_secret(client, arn, token):
    pending = json.loads(client.get_secret_value(
        SecretId=arn, VersionId=token, VersionStage="AWSPENDING")["SecretString"])
    if not pending.get("password"):
        raise ValueError("pending version has no password")


def finish_secret(client, arn, token):
    versions = client.describe_secret(SecretId=arn)["VersionIdsToStages"]
    current = next(version for version, stages in versions.items() if "AWSCURRENT" in stages)
    if current == token:
        return
    client.update_secret_version_stage(SecretId=arn, VersionStage="AWSCURRENT",
                                       MoveToVersionId=token, RemoveFromVersionId=current)
