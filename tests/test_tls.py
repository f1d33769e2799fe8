"""The HTTPS endpoint's TLS material and server context, proven with real handshakes.

Each test serves `secretfs.tls.server_context` (or, as a control, a deliberately
permissive context with the same certificate) on a loopback socket in a thread and
connects real clients: Python's ssl module and `openssl s_client`. Where a client is
refused, the control shows the same client succeeding against a server that allows
it, so the refusal is the server's configuration and not the client's inability.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from secretfs import tls
from secretfs.state import StateDir

SECRETFS = [sys.executable, "-m", "secretfs.cli"]
EXTRA_NAME = "secretfs.test"
TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256",
                "TLS_AES_128_CCM_8_SHA256"}


# --- a TLS server in a thread, and clients -------------------------------------------

@dataclass
class Server:
    address: tuple[str, int]
    outcomes: queue.Queue

    def outcome(self):
        """What the server saw of the next connection: (version, cipher) or the error."""
        return self.outcomes.get(timeout=10)


@contextlib.contextmanager
def serving(context: ssl.SSLContext, host: str = "127.0.0.1") -> Iterator[Server]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    listener.settimeout(0.1)
    stop = threading.Event()
    outcomes: queue.Queue = queue.Queue()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(10)
                try:
                    with context.wrap_socket(connection, server_side=True) as secure:
                        outcomes.put((secure.version(), secure.cipher()[0]))
                        secure.sendall(b"hello")
                except (ssl.SSLError, OSError) as error:
                    outcomes.put(error)

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield Server(listener.getsockname()[:2], outcomes)
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def handshake(server: Server, context: ssl.SSLContext, hostname: str = "localhost"):
    """Connect, verify, read the server's greeting; (version, cipher)."""
    with socket.create_connection(server.address, timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=hostname) as secure:
        received = b""
        while len(received) < 5:
            chunk = secure.recv(5 - len(received))
            if not chunk:
                break
            received += chunk
        assert received == b"hello"
        return secure.version(), secure.cipher()[0]


def refused(server: Server, context: ssl.SSLContext, hostname: str = "localhost"):
    """The client's error and the server's, for a handshake that must fail."""
    with pytest.raises((ssl.SSLError, ConnectionError)) as client_error:
        handshake(server, context, hostname)
    return client_error.value, server.outcome()


def client_context(cafile: Path, *, minimum=None, maximum=None,
                   ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=os.fspath(cafile))
    with warnings.catch_warnings():  # TLS 1.0/1.1 on purpose: they must be refused
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def legacy_client(cafile: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that speaks only `version` (TLS 1.0 or 1.1): OpenSSL 3 needs security
    level 0 to even offer them."""
    return client_context(cafile, minimum=version, maximum=version,
                          ciphers="DEFAULT:@SECLEVEL=0")


def permissive_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The control: the same certificate, served with every protocol and cipher allowed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(cert, key)
    return context


def s_client(server: Server, cafile: Path, *options: str) -> str | None:
    """`openssl s_client -brief`'s report of a verified handshake, or None if none was
    established (its exit status also counts the test server's close without
    close_notify as a failure, so the report is what tells)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    host, port = server.address
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", "localhost",
         "-CAfile", os.fspath(cafile), "-verify_return_error", "-brief", *options],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    report = result.stdout + result.stderr
    if "CONNECTION ESTABLISHED" in report and "Verification: OK" in report:
        return report
    return None


def is_forward_secret(version: str, cipher: str) -> bool:
    if version == "TLSv1.3":
        return cipher in TLS13_SUITES  # every TLS 1.3 key exchange is (EC)DHE
    return cipher.startswith(("ECDHE-", "DHE-"))


# --- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def authority(tmp_path) -> tls.TLSFiles:
    return tls.create_authority(tmp_path / "tls", hostnames=[EXTRA_NAME])


@pytest.fixture
def server(authority) -> Iterator[Server]:
    with serving(tls.server_context(authority.server_certificate, authority.server_key)) as up:
        yield up


@pytest.fixture
def trusting(authority) -> ssl.SSLContext:
    return client_context(authority.ca_certificate)


@pytest.fixture
def rsa_pair(tmp_path) -> tuple[Path, Path]:
    """A user-supplied, self-signed RSA certificate and key, made by openssl: RSA so
    that non-forward-secret (RSA key exchange) suites are possible at all."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "user.pem", tmp_path / "user.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "extendedKeyUsage=serverAuth"],
        check=True, capture_output=True)
    return cert, key


# --- the files -------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(files: tls.TLSFiles) -> dict[str, int]:
    return {path.name: mode(path) for path in (
        files.directory, files.ca_key, files.server_key, files.ca_certificate,
        files.server_certificate)}


EXPECTED_MODES = {"tls": 0o755, "ca.key": 0o600, "server.key": 0o600, "ca.pem": 0o644,
                  "server.pem": 0o644}


def test_keys_are_0600_and_certificates_readable_by_others(authority):
    assert modes(authority) == EXPECTED_MODES


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_the_modes_are_exact_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        files = tls.create_authority(tmp_path / "tls")
    finally:
        os.umask(old)
    assert modes(files) == EXPECTED_MODES


def test_the_ca_and_the_server_certificate(authority):
    (ca,) = x509.load_pem_x509_certificates(authority.ca_certificate.read_bytes())
    leaf, chained_ca = x509.load_pem_x509_certificates(
        authority.server_certificate.read_bytes())
    assert chained_ca == ca  # server.pem is the leaf followed by the CA
    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string().startswith("CN=secretfs local CA ")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3651

    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    assert {"localhost", EXTRA_NAME, socket.gethostname().lower()} <= set(dns)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        san.get_values_for_type(x509.IPAddress))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 825 <= lifetime.days <= 826
    # Both keys are EC P-256.
    assert ca.public_key().curve.name == leaf.public_key().curve.name == "secp256r1"


def test_each_authority_is_its_own(tmp_path):
    one = tls.create_authority(tmp_path / "one")
    two = tls.create_authority(tmp_path / "two")
    assert one.ca_certificate.read_bytes() != two.ca_certificate.read_bytes()
    assert one.ca_key.read_bytes() != two.ca_key.read_bytes()


def test_an_existing_authority_is_never_overwritten(authority):
    before = {path: path.read_bytes() for path in authority.directory.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        tls.create_authority(authority.directory)
    assert {path: path.read_bytes() for path in authority.directory.iterdir()} == before


def test_an_invalid_host_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="neither a host name nor an IP address"):
        tls.create_authority(tmp_path / "tls", hostnames=["not a name"])
    assert not (tmp_path / "tls").exists()


def test_state_dir_paths_are_where_create_authority_writes(tmp_path):
    state = StateDir(tmp_path)
    files = tls.TLSFiles.in_directory(state.tls_dir)
    assert (state.ca_certificate, state.ca_key, state.server_certificate, state.server_key) == (
        files.ca_certificate, files.ca_key, files.server_certificate, files.server_key)


# --- handshakes --------------------------------------------------------------------------

@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", EXTRA_NAME,
                                      socket.gethostname()])
def test_a_client_trusting_ca_pem_verifies_the_server(server, trusting, hostname):
    version, cipher = handshake(server, trusting, hostname)
    assert server.outcome() == (version, cipher)
    assert is_forward_secret(version, cipher)


def test_a_client_verifies_the_server_over_ipv6_loopback(authority, trusting):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    context = tls.server_context(authority.server_certificate, authority.server_key)
    with serving(context, host="::1") as server:
        handshake(server, trusting, "::1")


def test_a_name_not_on_the_certificate_fails_verification(server, trusting):
    client, _ = refused(server, trusting, "example.com")
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert "example.com" in str(client)


def test_a_client_without_the_ca_fails_verification(server):
    client, seen = refused(server, ssl.create_default_context())
    assert isinstance(client, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(client)
    assert isinstance(seen, ssl.SSLError)  # the server saw the client's alert


def test_a_client_trusting_another_local_ca_fails_verification(server, tmp_path):
    other = tls.create_authority(tmp_path / "other")
    client, _ = refused(server, client_context(other.ca_certificate))
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_tls12_ecdhe_succeeds(server, authority):
    tls12 = client_context(authority.ca_certificate, maximum=ssl.TLSVersion.TLSv1_2)
    version, cipher = handshake(server, tls12)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher)
    assert server.outcome() == (version, cipher)


def test_tls13_succeeds(server, authority):
    version, cipher = handshake(server, client_context(authority.ca_certificate,
                                                       minimum=ssl.TLSVersion.TLSv1_3))
    assert version == "TLSv1.3" and cipher in TLS13_SUITES
    assert server.outcome() == (version, cipher)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls10_and_tls11_are_refused_by_the_server(authority, version):
    client = legacy_client(authority.ca_certificate, version)
    control = permissive_context(authority.server_certificate, authority.server_key)
    with serving(control) as server:
        expected = {ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"}[version]
        assert handshake(server, client)[0] == expected  # the client can speak it
    context = tls.server_context(authority.server_certificate, authority.server_key)
    with serving(context) as server:
        _, seen = refused(server, client)
    assert isinstance(seen, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(seen) or "VERSION_TOO_LOW" in str(seen), seen


def test_openssl_tls11_client_is_refused(authority):
    legacy = ("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    control = permissive_context(authority.server_certificate, authority.server_key)
    with serving(control) as server:
        report = s_client(server, authority.ca_certificate, *legacy)
        assert report is not None and "Protocol version: TLSv1.1" in report
    context = tls.server_context(authority.server_certificate, authority.server_key)
    with serving(context) as server:
        assert s_client(server, authority.ca_certificate, *legacy) is None
        assert isinstance(server.outcome(), ssl.SSLError)


def test_tls12_suites_without_forward_secrecy_are_refused(rsa_pair):
    cert, key = rsa_pair
    static_rsa = client_context(cert, maximum=ssl.TLSVersion.TLSv1_2,
                                ciphers="AES128-GCM-SHA256:AES256-GCM-SHA384")
    with serving(permissive_context(cert, key)) as server:
        assert handshake(server, static_rsa) in {("TLSv1.2", "AES128-GCM-SHA256"),
                                                 ("TLSv1.2", "AES256-GCM-SHA384")}
    with serving(tls.server_context(cert, key)) as server:
        _, seen = refused(server, static_rsa)
    assert isinstance(seen, ssl.SSLError) and "NO_SHARED_CIPHER" in str(seen), seen


def test_openssl_tls12_rsa_key_exchange_is_refused(rsa_pair):
    cert, key = rsa_pair
    with serving(permissive_context(cert, key)) as server:
        report = s_client(server, cert, "-tls1_2", "-cipher", "AES128-GCM-SHA256")
        assert report is not None and "Ciphersuite: AES128-GCM-SHA256" in report
    with serving(tls.server_context(cert, key)) as server:
        assert s_client(server, cert, "-tls1_2", "-cipher", "AES128-GCM-SHA256") is None
        assert "NO_SHARED_CIPHER" in str(server.outcome())
        report = s_client(server, cert, "-tls1_2")
        assert report is not None and "Ciphersuite: ECDHE-RSA-" in report


def test_a_tls12_cbc_suite_is_refused_even_with_ecdhe(server, authority):
    cbc = client_context(authority.ca_certificate, maximum=ssl.TLSVersion.TLSv1_2,
                         ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    _, seen = refused(server, cbc)
    assert "NO_SHARED_CIPHER" in str(seen)


def test_a_user_supplied_certificate_and_key_work(rsa_pair):
    cert, key = rsa_pair
    with serving(tls.server_context(cert, key)) as server:
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            version, cipher = handshake(server, client_context(cert, maximum=maximum),
                                        "127.0.0.1")
            assert is_forward_secret(version, cipher)
            assert server.outcome() == (version, cipher)
        assert version == "TLSv1.3"


def test_the_server_context_settings(authority):
    context = tls.server_context(authority.server_certificate, authority.server_key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    for option in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET):
        assert context.options & option
    for suite in context.get_ciphers():
        assert suite["protocol"] == "TLSv1.3" or (
            suite["kea"] == "kx-ecdhe" and suite["aead"]), suite["name"]


# --- one-line errors -----------------------------------------------------------------------

def one_line_error(cert, key) -> str:
    with pytest.raises(tls.TLSConfigError) as error:
        tls.server_context(cert, key)
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_a_mismatched_certificate_and_key_is_one_line(authority):
    message = one_line_error(authority.server_certificate, authority.ca_key)
    assert message == (f"TLS key {authority.ca_key} does not match certificate "
                       f"{authority.server_certificate}")


def test_a_mismatched_user_pair_is_one_line(authority, rsa_pair):
    cert, _ = rsa_pair
    assert "does not match" in one_line_error(cert, authority.server_key)


def test_a_missing_file_is_one_line(authority, tmp_path):
    missing = tmp_path / "nowhere.pem"
    assert one_line_error(missing, authority.server_key) == (
        f"TLS certificate {missing}: No such file or directory")
    assert one_line_error(authority.server_certificate, missing) == (
        f"TLS key {missing}: No such file or directory")


def test_unusable_files_are_one_line(authority, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    assert "is not a PEM certificate" in one_line_error(garbage, authority.server_key)
    assert "is not a PEM private key" in one_line_error(authority.server_certificate, garbage)
    assert "Is a directory" in one_line_error(tmp_path, authority.server_key)
    if shutil.which("openssl") is None:
        return
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", authority.server_key, "-out", encrypted,
                    "-aes256", "-passout", "pass:secret"], check=True, capture_output=True)
    assert "is encrypted" in one_line_error(authority.server_certificate, encrypted)



# --- renewal -----------------------------------------------------------------------------

def test_renewing_the_server_certificate_keeps_the_ca_and_the_names(authority, trusting):
    old_leaf = x509.load_pem_x509_certificates(authority.server_certificate.read_bytes())[0]
    old_key, ca = authority.server_key.read_bytes(), authority.ca_certificate.read_bytes()
    tls.renew_server_certificate(authority.directory)
    leaf = x509.load_pem_x509_certificates(authority.server_certificate.read_bytes())[0]
    assert authority.server_key.read_bytes() != old_key
    assert authority.ca_certificate.read_bytes() == ca
    assert leaf.serial_number != old_leaf.serial_number
    names = x509.SubjectAlternativeName
    assert (leaf.extensions.get_extension_for_class(names).value
            == old_leaf.extensions.get_extension_for_class(names).value)
    assert (mode(authority.server_key), mode(authority.server_certificate)) == (0o600, 0o644)
    assert sorted(p.name for p in authority.directory.iterdir()) == [
        "ca.key", "ca.pem", "server.key", "server.pem"]
    context = tls.server_context(authority.server_certificate, authority.server_key)
    with serving(context) as server:
        handshake(server, trusting, EXTRA_NAME)


def test_renewing_with_new_names(authority, trusting):
    tls.renew_server_certificate(authority.directory, hostnames=["renewed.test"])
    context = tls.server_context(authority.server_certificate, authority.server_key)
    with serving(context) as server:
        handshake(server, trusting, "renewed.test")
        refused(server, trusting, EXTRA_NAME)


# --- the command line --------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SECRETFS, *args], capture_output=True, timeout=60)


def test_init_creates_the_tls_material_and_names_the_ca(tmp_path):
    state_dir = tmp_path / "state"
    result = cli("init", "--state-dir", str(state_dir), "--tls-hostname", "api.test",
                 "--tls-hostname", "192.0.2.7")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    state = StateDir(state_dir)
    assert summary["CaBundle"] == str(state.ca_certificate)
    assert summary["ServerCertificate"] == str(state.server_certificate)
    for path in (state.ca_certificate, state.ca_key, state.server_certificate,
                 state.server_key):
        assert path.is_file(), path
    assert mode(state.root) == 0o700  # the state directory stays root's
    assert (mode(state.ca_key), mode(state.server_key)) == (0o600, 0o600)
    leaf = x509.load_pem_x509_certificates(state.server_certificate.read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "api.test" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("192.0.2.7") in san.get_values_for_type(x509.IPAddress)
    with serving(tls.server_context(state.server_certificate, state.server_key)) as server:
        handshake(server, client_context(state.ca_certificate), "api.test")

    again = cli("init", "--state-dir", str(state_dir))
    assert again.returncode == 1
    assert again.stderr.decode() == f"{state_dir} is already initialized\n"


def test_init_refuses_an_invalid_tls_hostname_in_one_line(tmp_path):
    state_dir = tmp_path / "state"
    result = cli("init", "--state-dir", str(state_dir), "--tls-hostname", "bad name")
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") == 1
    assert "invalid TLS host name" in result.stderr.decode()
    assert not state_dir.exists()


def test_ca_bundle_prints_exactly_ca_pem(tmp_path):
    state_dir = tmp_path / "state"
    assert cli("init", "--state-dir", str(state_dir)).returncode == 0
    result = cli("ca-bundle", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == StateDir(state_dir).ca_certificate.read_bytes()
    assert result.stderr == b""
    env = dict(os.environ, SECRETFS_STATE_DIR=str(state_dir))
    from_env = subprocess.run([*SECRETFS, "ca-bundle"], capture_output=True, env=env,
                              timeout=60)
    assert from_env.stdout == result.stdout


def test_ca_bundle_without_a_ca_is_one_line_exit_1(tmp_path):
    result = cli("ca-bundle", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"{StateDir(tmp_path).ca_certificate}: no local CA certificate "
        "(run 'secretfs init')\n")
