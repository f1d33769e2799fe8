"""A PostgreSQL single-user rotation function in the shape of AWS's published
template: a Lambda handler that talks to Secrets Manager only through boto3 (at
SECRETS_MANAGER_ENDPOINT) and to the database with its own driver. Nothing in it
knows about secretfs."""

import json
import os

import boto3
import psycopg
from psycopg import sql


def lambda_handler(event, context):
    arn, token, step = event["SecretId"], event["ClientRequestToken"], event["Step"]
    service = boto3.client("secretsmanager",
                           endpoint_url=os.environ["SECRETS_MANAGER_ENDPOINT"])
    metadata = service.describe_secret(SecretId=arn)
    if not metadata["RotationEnabled"]:
        raise ValueError("rotation is not enabled")
    stages = metadata["VersionIdsToStages"].get(token)
    if stages is None:
        raise ValueError("the token is no version of the secret")
    if "AWSCURRENT" in stages:
        return
    if "AWSPENDING" not in stages:
        raise ValueError("the version is not pending")
    steps = {"createSecret": create_secret, "setSecret": set_secret,
             "testSecret": test_secret, "finishSecret": finish_secret}
    steps[step](service, arn, token)


def get_secret_dict(service, arn, stage, token=None):
    asked = {"SecretId": arn, "VersionStage": stage}
    if token:
        asked["VersionId"] = token
    secret = json.loads(service.get_secret_value(**asked)["SecretString"])
    for key in ("host", "username", "password"):
        if key not in secret:
            raise KeyError(f"{key} is missing from the secret")
    return secret


def create_secret(service, arn, token):
    current = get_secret_dict(service, arn, "AWSCURRENT")
    try:
        get_secret_dict(service, arn, "AWSPENDING", token)
        return
    except service.exceptions.ResourceNotFoundException:
        pass
    exclude = os.environ.get("EXCLUDE_CHARACTERS", "/@\"'\\")
    current["password"] = service.get_random_password(ExcludeCharacters=exclude)[
        "RandomPassword"]
    service.put_secret_value(SecretId=arn, ClientRequestToken=token,
                             SecretString=json.dumps(current), VersionStages=["AWSPENDING"])


def connect(secret):
    try:
        return psycopg.connect(host=secret["host"], port=int(secret.get("port", 5432)),
                               user=secret["username"], password=secret["password"],
                               dbname=secret.get("dbname", "postgres"), connect_timeout=5)
    except psycopg.OperationalError:
        return None


def set_secret(service, arn, token):
    pending = get_secret_dict(service, arn, "AWSPENDING", token)
    connection = connect(pending)
    if connection is not None:
        connection.close()
        return  # already set: a repeated setSecret
    connection = connect(get_secret_dict(service, arn, "AWSCURRENT"))
    if connection is None:
        try:
            connection = connect(get_secret_dict(service, arn, "AWSPREVIOUS"))
        except service.exceptions.ResourceNotFoundException:
            connection = None
    if connection is None:
        raise ValueError("can't log in with the current or previous secret")
    with connection:
        connection.execute(sql.SQL("ALTER USER {} WITH PASSWORD {}").format(
            sql.Identifier(pending["username"]), sql.Literal(pending["password"])))


def test_secret(service, arn, token):
    connection = connect(get_secret_dict(service, arn, "AWSPENDING", token))
    if connection is None:
        raise ValueError("can't log in with the pending secret")
    with connection:
        connection.execute("SELECT now()")


def finish_secret(service, arn, token):
    versions = service.describe_secret(SecretId=arn)["VersionIdsToStages"]
    current = next(version for version, stages in versions.items() if "AWSCURRENT" in stages)
    if current != token:
        service.update_secret_version_stage(SecretId=arn, VersionStage="AWSCURRENT",
                                            MoveToVersionId=token,
                                            RemoveFromVersionId=current)
