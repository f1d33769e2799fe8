"""TLS material for the HTTPS endpoint: a local CA, its server certificate, the server context.

`secretfs init` calls `create_authority` on `<state-dir>/tls/`, which then holds:

    tls/            0755  (inside the state directory, which stays 0700: root's)
    ├── ca.pem      0644  the local CA: what clients trust (AWS_CA_BUNDLE)
    ├── ca.key      0600  the CA's key, kept to renew the server certificate
    ├── server.pem  0644  the server certificate followed by the CA (the chain sent)
    └── server.key  0600  the server certificate's key

Keys are created 0600 with O_EXCL (never readable by others, not even for an
instant); certificates are public. The state directory itself stays 0700, so
non-root clients do not read ca.pem in place: root publishes it once with
`secretfs ca-bundle > /usr/local/share/ca-certificates/secretfs.crt` (or any
world-readable path) and clients set `AWS_CA_BUNDLE` to that file. An
administrator who makes the state directory traversable (0711, not listable)
lets clients use `<state-dir>/tls/ca.pem` in place: the store, the key file, the
config, the log and the audit directory are 0600/0700 themselves.

`server_context` serves either that pair or a user-supplied certificate and key
(PEM, unencrypted key; any chain after the leaf is sent too): TLS 1.2 and 1.3
only, and on TLS 1.2 only ECDHE key exchange with AEAD ciphers, so every
connection is forward-secret (every TLS 1.3 suite is). Any problem with the
files is one line in a `TLSConfigError`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secretfs.files import fsync_directory

CA_CERTIFICATE = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERTIFICATE = "server.pem"
SERVER_KEY = "server.key"

CA_VALIDITY = timedelta(days=3650)
# 825 days: the longest validity Apple's TLS clients accept for a server certificate.
SERVER_VALIDITY = timedelta(days=825)
# Backdated a little, so a client whose clock is slightly behind accepts it at once.
CLOCK_SKEW = timedelta(minutes=5)

# TLS 1.2: ephemeral ECDH key exchange and AEAD ciphers only. TLS 1.3 suites are
# not set by this string; all of them are forward-secret and AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
# Names that always belong on the server certificate: what a local client dials.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\.?")
_DNS_NAME_MAX = 253
_KEY_MODE = 0o600
_CERTIFICATE_MODE = 0o644
_DIRECTORY_MODE = 0o755


class TLSConfigError(Exception):
    """A certificate or key that can't be served: missing, unreadable, unparsable or
    not a pair. The message is one line naming the file."""


@dataclass(frozen=True)
class TLSFiles:
    """The TLS material's files, as create_authority names them in `directory`."""

    directory: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path

    @classmethod
    def in_directory(cls, directory: Path) -> TLSFiles:
        directory = Path(directory)
        return cls(directory, *(directory / name for name in (
            CA_CERTIFICATE, CA_KEY, SERVER_CERTIFICATE, SERVER_KEY)))


# --- names -----------------------------------------------------------------------------

def _general_name(name: str) -> x509.GeneralName:
    """A SAN entry for a host name or an IP address; ValueError names a bad one."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    dns = name.lower()
    if len(dns) > _DNS_NAME_MAX or not _DNS_NAME.fullmatch(dns):
        raise ValueError(f"{name!r} is neither a host name nor an IP address")
    return x509.DNSName(dns.rstrip("."))


def _host_names() -> list[str]:
    """This host's own names (short and fully qualified), those that are valid names."""
    found = []
    for lookup in (socket.gethostname, socket.getfqdn):
        with contextlib.suppress(OSError):
            found.append(lookup())
    return [name for name in found if name and _valid(name)]


def _valid(name: str) -> bool:
    try:
        _general_name(name)
    except ValueError:
        return False
    return True


def subject_alternative_names(hostnames: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The server certificate's names: the loopback names, this host's names, then
    `hostnames` (host names or IP addresses), each once. ValueError for an invalid one."""
    extra = [_general_name(name) for name in hostnames]
    names: list[x509.GeneralName] = []
    for entry in [*map(_general_name, DEFAULT_NAMES), *map(_general_name, _host_names()),
                  *extra]:
        if entry not in names:
            names.append(entry)
    return names


# --- certificates ----------------------------------------------------------------------

def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, f"secretfs local CA {secrets.token_hex(4)}")])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName],
                        ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                        now: datetime) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secretfs server")]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + SERVER_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate_pem(*chain: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never an existing one), 0600 until written, then `mode`; fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(fd, mode)  # exactly: the umask could only have narrowed it
            os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_all_new(files: list[tuple[Path, bytes, int]]) -> None:
    """Create every file, or (removing those it created) none."""
    created: list[Path] = []
    try:
        for path, data, mode in files:
            _write_new(path, data, mode)
            created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def create_authority(directory: Path, *, hostnames: Iterable[str] = ()) -> TLSFiles:
    """Create a local CA and a server certificate it signs in `directory` (made 0755).

    The server certificate names localhost, 127.0.0.1, ::1, this host's names and
    `hostnames`. FileExistsError if any of the four files exists (nothing is then
    written); ValueError for an invalid host name.
    """
    files = TLSFiles.in_directory(directory)
    names = subject_alternative_names(hostnames)
    for path in (files.ca_certificate, files.ca_key, files.server_certificate,
                 files.server_key):
        if path.exists():
            raise FileExistsError(f"{path} already exists")
    now = datetime.now(UTC)
    ca_key, server_key = _new_key(), _new_key()
    ca = _ca_certificate(ca_key, now)
    server = _server_certificate(server_key, names, ca, ca_key, now)
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Keys first: until the last file exists the directory is 0700 (if it is new).
    _write_all_new([
        (files.ca_key, _key_pem(ca_key), _KEY_MODE),
        (files.server_key, _key_pem(server_key), _KEY_MODE),
        (files.ca_certificate, _certificate_pem(ca), _CERTIFICATE_MODE),
        (files.server_certificate, _certificate_pem(server, ca), _CERTIFICATE_MODE),
    ])
    os.chmod(files.directory, _DIRECTORY_MODE)
    fsync_directory(files.directory)
    return files


def renew_server_certificate(directory: Path, *,
                             hostnames: Iterable[str] | None = None) -> TLSFiles:
    """Replace the server certificate and key in `directory` with new ones from its CA.

    With `hostnames` None the new certificate keeps the current one's names; else it
    names the defaults and `hostnames`. A running server keeps serving the old pair
    until its context is made again.
    """
    files = TLSFiles.in_directory(directory)
    ca = _load_certificates(files.ca_certificate)[0]
    ca_key = _load_private_key(files.ca_key)
    if hostnames is None:
        current = _load_certificates(files.server_certificate)[0]
        hostnames = _names_of(current)
    names = subject_alternative_names(hostnames)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not _same_key(ca, ca_key):
        raise TLSConfigError(f"TLS key {files.ca_key} does not match certificate "
                             f"{files.ca_certificate}")
    server_key = _new_key()
    server = _server_certificate(server_key, names, ca, ca_key, datetime.now(UTC))
    # Written under temporary names, then renamed over the old pair: a reader sees a
    # whole file, old or new (and server_context refuses a moment's mismatched pair).
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"
    key_tmp = files.server_key.with_name(files.server_key.name + suffix)
    cert_tmp = files.server_certificate.with_name(files.server_certificate.name + suffix)
    _write_all_new([(key_tmp, _key_pem(server_key), _KEY_MODE),
                    (cert_tmp, _certificate_pem(server, ca), _CERTIFICATE_MODE)])
    try:
        os.replace(key_tmp, files.server_key)
        os.replace(cert_tmp, files.server_certificate)
    finally:
        key_tmp.unlink(missing_ok=True)
        cert_tmp.unlink(missing_ok=True)
    fsync_directory(files.directory)
    return files


def _names_of(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *map(str, san.get_values_for_type(x509.IPAddress))]


# --- serving ---------------------------------------------------------------------------

def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TLSConfigError(f"TLS {what} {path}: {error.strerror or error}") from None


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path, "certificate"))
    except ValueError:
        raise TLSConfigError(f"TLS certificate {path} is not a PEM certificate") from None


def _load_private_key(path: Path):
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: the daemon starts unattended, with no one to ask
        raise TLSConfigError(
            f"TLS key {path} is encrypted; secretfs needs an unencrypted key (mode 0600)") \
            from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"TLS key {path} is not a PEM private key") from None


def _same_key(certificate: x509.Certificate, key) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def check_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The leaf certificate of `cert_path`, once checked to be a TLS server certificate
    whose key is `key_path`; TLSConfigError (one line) otherwise."""
    leaf = _load_certificates(cert_path)[0]
    key = _load_private_key(key_path)
    if not _same_key(leaf, key):
        raise TLSConfigError(f"TLS key {key_path} does not match certificate {cert_path}")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return leaf
    if ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise TLSConfigError(
            f"TLS certificate {cert_path} is not for servers (no serverAuth extended key usage)")
    return leaf


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A server context for the certificate (chain) and key: TLS 1.2+, forward-secret
    key exchange only, no compression, renegotiation or session tickets."""
    check_pair(cert_path, key_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
                        | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE)
    try:
        # A password that is never right: the key was checked to be unencrypted, and
        # OpenSSL must not prompt on a terminal if it was swapped since.
        context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path), password=b"\0")
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise TLSConfigError(f"TLS certificate {cert_path} and key {key_path} can't be "
                             f"served: {reason}") from None
    return context
