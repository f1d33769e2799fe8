"""Access decisions.

Until identity and resource policies exist, secretfs fails closed: root (uid 0)
is the administrator and the only principal allowed anything.
"""

from __future__ import annotations

from secretfs.identity import Caller
from secretfs.model import AccessDeniedException


class RootOnly:
    """The fail-closed authorizer: allow uid 0, deny everyone else."""

    def authorize(self, caller: Caller, action: str, resource: str | None = None) -> None:
        if not caller.is_root:
            target = f" on resource: {resource}" if resource else ""
            raise AccessDeniedException(
                f"uid {caller.uid} is not authorized to perform: secretsmanager:{action}{target}")

    def allows(self, caller: Caller, action: str, resource: str | None = None) -> bool:
        return caller.is_root
