"""Signature Version 4 checks on requests botocore signs, altered one way at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from secretfs.api import sigv4
from secretfs.model import UnrecognizedClientException

KEY_ID, SECRET = "AKSFABCDEFGHIJKLMNOP", "s3cr3t-access-key-for-tests-only-000000"
BODY = b'{"SecretId": "prod/db"}'


def signed(body: bytes = BODY, *, region: str = "us-east-1", secret: str = SECRET,
           extra: dict[str, str] | None = None) -> tuple[list[tuple[str, str]], bytes]:
    request = AWSRequest(method="POST", url="https://127.0.0.1:8443/", data=body, headers={
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "secretsmanager.GetSecretValue", **(extra or {})})
    SigV4Auth(Credentials(KEY_ID, secret), "secretsmanager", region).add_auth(request)
    headers = [(name.lower(), value) for name, value in request.headers.items()]
    return [*headers, ("host", "127.0.0.1:8443")], body


def verify(headers, body, *, now: datetime | None = None, known=True):
    return sigv4.verify("POST", "/", headers, body, region="us-east-1", now=now,
                        secret_for=lambda key_id: SECRET if known and key_id == KEY_ID
                        else None)


def replaced(headers, name: str, value: str):
    return [(key, value if key == name else old) for key, old in headers]


def test_a_request_signed_by_botocore_verifies():
    assert verify(*signed()) == KEY_ID


@pytest.mark.parametrize(("alter", "error", "message"), [
    (lambda h, b: (h, b + b" "), sigv4.InvalidSignatureException, "does not match"),
    (lambda h, b: (replaced(h, "x-amz-target", "secretsmanager.DeleteSecret"), b),
     sigv4.InvalidSignatureException, "does not match"),
    (lambda h, b: ([(k, v) for k, v in h if k != "authorization"], b),
     sigv4.MissingAuthenticationTokenException, "Missing Authentication Token"),
    (lambda h, b: (replaced(h, "authorization", "Bearer abc"), b),
     sigv4.IncompleteSignatureException, "AWS4-HMAC-SHA256"),
    (lambda h, b: ([(k, v) for k, v in h if k != "x-amz-date"], b),
     sigv4.IncompleteSignatureException, "X-Amz-Date"),
    (lambda h, b: ([*h, ("x-amz-content-sha256", "0" * 64)], b),
     sigv4.InvalidSignatureException, "X-Amz-Content-SHA256"),
])
def test_an_altered_request_is_refused(alter, error, message):
    headers, body = alter(*signed())
    with pytest.raises(error, match=message):
        verify(headers, body)


def test_host_must_be_signed():
    headers, body = signed()
    authorization = dict(headers)["authorization"].replace("host;", "")
    with pytest.raises(sigv4.IncompleteSignatureException, match="'host' header must be signed"):
        verify(replaced(headers, "authorization", authorization), body)


def test_wrong_secret_wrong_region_and_unknown_key():
    with pytest.raises(sigv4.InvalidSignatureException, match="does not match"):
        verify(*signed(secret="another"))
    with pytest.raises(sigv4.InvalidSignatureException, match="valid region: 'us-east-1'"):
        verify(*signed(region="eu-west-1"))
    with pytest.raises(UnrecognizedClientException):
        verify(*signed(), known=False)


def test_clock_skew_beyond_five_minutes_either_way():
    headers, body = signed()
    now = datetime.now(UTC)
    assert verify(headers, body, now=now + timedelta(minutes=4)) == KEY_ID
    with pytest.raises(sigv4.InvalidSignatureException, match="Signature expired"):
        verify(headers, body, now=now + timedelta(minutes=6))
    with pytest.raises(sigv4.InvalidSignatureException, match="not yet current"):
        verify(headers, body, now=now - timedelta(minutes=6))
