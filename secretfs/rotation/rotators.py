"""The rotators a secret may name in RotationLambdaARN, and how their names read.

Built-ins are `secretfs:<name>`; `exec:/path/to/program` runs any executable once
per step; `python:package.module:function` runs an AWS Lambda-style handler.
"""

from __future__ import annotations

import re

from secretfs.model import InvalidParameterException

BUILT_IN = frozenset({
    "random-password", "postgresql-single-user", "postgresql-alternating-users",
    "mysql-single-user", "mysql-alternating-users",
})
_PYTHON = re.compile(r"python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_rotator(name: str) -> str:
    """The rotator's name if it is one secretfs can run; InvalidParameterException if not."""
    if name.startswith("secretfs:") and name.removeprefix("secretfs:") in BUILT_IN:
        return name
    if name.startswith("exec:/") and len(name) > len("exec:/"):
        return name
    if _PYTHON.fullmatch(name):
        return name
    raise InvalidParameterException(
        f"RotationLambdaARN {name!r} names no rotator: use secretfs:<"
        f"{'|'.join(sorted(BUILT_IN))}>, exec:/absolute/path or python:module:function.")
