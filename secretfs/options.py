"""How a daemon serves: the options of `secretfs mount` (and of config.json)."""

from __future__ import annotations

import argparse
import ipaddress
import math
from dataclasses import dataclass, fields, replace


class OptionsError(ValueError):
    """Options that can't be served; one line for the CLI."""


@dataclass(frozen=True)
class MountOptions:
    """How a daemon serves: given to `secretfs mount`, handed on to the detached child.
    The network endpoint may also come from the state directory's config.json
    ("Listen", "TlsCertificate", "TlsKey", "PlainHttp"), and so may "LockMemory": true,
    the metrics listener ("MetricsListen", "MetricsAllowRemote"), "LogFormat" and
    "MaxStaleness"; flags win."""

    debug: bool = False
    strict_names: bool = False
    listen: str | None = None  # HOST:PORT of the HTTPS (or loopback HTTP) endpoint
    tls_certificate: str | None = None
    tls_key: str | None = None
    plain_http: bool = False
    lock_memory: bool = False  # mlockall: keep plaintext out of swap (a warning if refused)
    metrics_listen: str | None = None  # HOST:PORT of /metrics and /healthz (secretfs/metrics.py)
    metrics_allow_remote: bool = False  # metrics name secrets: loopback only, unless this
    log_format: str | None = None  # text, json or journal; None: journal under journald, else text
    max_staleness: str | None = None  # seconds; see staleness_bound()

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
        parser.add_argument(
            "--metrics-listen", metavar="HOST:PORT",
            help="Serve Prometheus metrics at /metrics and a health check at /healthz "
                 "here (plain HTTP; a loopback address, e.g. 127.0.0.1:9464).")
        parser.add_argument(
            "--metrics-allow-remote", action="store_true",
            help="Let --metrics-listen take a non-loopback address (metrics name secrets).")
        parser.add_argument(
            "--log-format", choices=("text", "json", "journal"),
            help="The daemon's log lines on stderr: text, json (one object a line) or "
                 "journal (<N> priority prefixes); default: journal when stderr is "
                 "systemd's journal, else text.")
        parser.add_argument(
            "--max-staleness", metavar="SECONDS",
            help="With a shared PostgreSQL store: how long to keep serving what this host "
                 "knows while it hears nothing from the store (default 60); past it, "
                 "secret files answer EIO until the store is back.")

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
        if options.metrics_listen is None and config.get("MetricsListen"):
            options = replace(options, metrics_listen=config["MetricsListen"],
                              metrics_allow_remote=self.metrics_allow_remote
                              or config.get("MetricsAllowRemote") is True)
        if options.log_format is None and config.get("LogFormat"):
            options = replace(options, log_format=config["LogFormat"])
        if options.max_staleness is None and config.get("MaxStaleness") is not None:
            options = replace(options, max_staleness=str(config["MaxStaleness"]))
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
        host, port = _host_port("--listen", self.listen, "127.0.0.1:8443")
        if self.plain_http and not _is_loopback(host):
            raise OptionsError(f"--plain-http serves only a loopback address, not {host}")
        return host, port

    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(host, port) of --metrics-listen, checked: loopback unless allowed, since
        metrics name secrets."""
        if self.metrics_listen is None:
            return None
        host, port = _host_port("--metrics-listen", self.metrics_listen, "127.0.0.1:9464")
        if not self.metrics_allow_remote and not _is_loopback(host):
            raise OptionsError(
                f"--metrics-listen {host} is not a loopback address: metrics name secrets, "
                "so serving them beyond this host takes --metrics-allow-remote")
        return host, port

    def staleness_bound(self) -> float:
        """--max-staleness in seconds, checked (secretfs/fleet.py says why 60 s)."""
        from secretfs.fleet import DEFAULT_MAX_STALENESS, MIN_STALENESS

        if self.max_staleness is None:
            return DEFAULT_MAX_STALENESS
        try:
            seconds = float(self.max_staleness)
        except ValueError:
            seconds = math.nan
        if not MIN_STALENESS <= seconds < math.inf:
            raise OptionsError(f"--max-staleness {self.max_staleness!r}: give a number of "
                               f"seconds, at least {MIN_STALENESS:g}")
        return seconds


def _host_port(flag: str, value: str, example: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionsError(f"{flag} {value!r}: give HOST:PORT, e.g. {example}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


DEFAULT_OPTIONS = MountOptions()
