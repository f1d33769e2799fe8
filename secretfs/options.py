"""How a daemon serves: the options of `secretfs mount` (and of config.json)."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, fields, replace


class OptionsError(ValueError):
    """Options that can't be served; one line for the CLI."""


@dataclass(frozen=True)
class MountOptions:
    """How a daemon serves: given to `secretfs mount`, handed on to the detached child.
    The network endpoint may also come from the state directory's config.json
    ("Listen", "TlsCertificate", "TlsKey", "PlainHttp"), and so may "LockMemory": true;
    flags win."""

    debug: bool = False
    strict_names: bool = False
    listen: str | None = None  # HOST:PORT of the HTTPS (or loopback HTTP) endpoint
    tls_certificate: str | None = None
    tls_key: str | None = None
    plain_http: bool = False
    lock_memory: bool = False  # mlockall: keep plaintext out of swap (a warning if refused)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--debug", action="store_true", help="Log FUSE requests.")
        parser.add_argument(
            "--strict-names", action="store_true",
            help="Hide names from callers who may not see them, even on exact lookups "
                 "(directories are then never cached by the kernel).")
        parser.add_argument(
            "--listen", metavar="HOST:PORT",
            help="Also serve the Secrets Manager API over HTTPS (SigV4 access keys) here.")
        parser.add_argument("--tls-cert", dest="tls_certificate", metavar="PEM",
                            help="The endpoint's certificate chain (default: the one "
                                 "'secretfs init' made).")
        parser.add_argument("--tls-key", dest="tls_key", metavar="PEM",
                            help="The key of --tls-cert.")
        parser.add_argument("--plain-http", action="store_true",
                            help="Serve --listen without TLS (loopback addresses only).")
        parser.add_argument(
            "--lock-memory", action="store_true",
            help="Lock the daemon's memory (mlockall) so secrets are never swapped out; "
                 "needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK, else it warns "
                 "and serves unlocked.")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MountOptions:
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def argv(self) -> list[str]:
        out = []
        for field in fields(self):
            value = getattr(self, field.name)
            flag = "--" + {"tls_certificate": "tls-cert"}.get(
                field.name, field.name.replace("_", "-"))
            if value is True:
                out.append(flag)
            elif isinstance(value, str):
                out += [flag, value]
        return out

    def with_config(self, config: dict) -> MountOptions:
        """The settings of config.json where no flag gave them."""
        options = self
        if config.get("LockMemory") is True:
            options = replace(options, lock_memory=True)
        if options.listen is not None or not config.get("Listen"):
            return options
        return replace(options, listen=config["Listen"],
                       tls_certificate=self.tls_certificate or config.get("TlsCertificate"),
                       tls_key=self.tls_key or config.get("TlsKey"),
                       plain_http=self.plain_http or bool(config.get("PlainHttp")))

    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) of --listen, checked: plain HTTP is for loopback only."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise OptionsError(f"--listen {self.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8443")
        if self.plain_http:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise OptionsError(f"--plain-http serves only a loopback address, not {host}")
        return host, int(port)


DEFAULT_OPTIONS = MountOptions()
