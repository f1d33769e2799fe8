"""The state directory: where the store, the keys, the control socket and the logs live.

Every client verb finds the daemon through --state-dir, else $SECRETFS_STATE_DIR,
else /var/lib/secretfs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from secretfs.files import fsync_directory

DEFAULT_STATE_DIR = "/var/lib/secretfs"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT_ID = "000000000000"


def resolve_state_dir(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("SECRETFS_STATE_DIR") or DEFAULT_STATE_DIR)


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def database(self) -> Path:
        return self.root / "secrets.db"

    @property
    def store_password_file(self) -> Path:
        """A PostgreSQL store's password, in libpq's password file format (0600)."""
        return self.root / "pgpass"

    def store_url(self, config: dict) -> str:
        """The store config.json names (StoreUrl), else the SQLite file here."""
        return config.get("StoreUrl") or f"sqlite://{self.database.absolute()}"

    @property
    def keys(self) -> Path:
        return self.root / "keys.json"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def audit_dir(self) -> Path:
        """The audit log's files (see secretfs.audit)."""
        return self.root / "audit"

    @property
    def hooks_dir(self) -> Path:
        """Change hooks, one JSON file each (see secretfs.hooks); root's alone."""
        return self.root / "hooks.d"

    @property
    def tls_dir(self) -> Path:
        """The HTTPS endpoint's CA and server certificate (see secretfs.tls)."""
        return self.root / "tls"

    @property
    def ca_certificate(self) -> Path:
        """The local CA clients trust (AWS_CA_BUNDLE); 0644, printed by `secretfs ca-bundle`."""
        return self.tls_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def server_certificate(self) -> Path:
        """The server certificate followed by the CA."""
        return self.tls_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    def exists(self) -> bool:
        return self.config.exists()

    def read_config(self) -> dict:
        try:
            return json.loads(self.config.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.root} is not a secretfs state directory (run 'secretfs init')") from None
        except ValueError:
            raise ValueError(f"{self.config} is not valid JSON: fix it, or restore it from "
                             "a backup") from None

    def write_config(self, config: dict) -> None:
        """Replace config.json whole and durably: a crash leaves the old file or the new."""
        tmp = self.config.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(config, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.config)
        fsync_directory(self.root)
