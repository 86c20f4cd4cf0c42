"""A stand-in for an S3 object store on 127.0.0.1: moto's S3 server, over HTTPS with a certificate made for the
test, so that LitData runs its real transfers against it (its Rust client speaks HTTPS only, and trusts the test's
certificate through SSL_CERT_FILE; boto3 through AWS_CA_BUNDLE). `s3_standin(folder, monkeypatch)` starts it,
points the environment at it (the endpoint, dummy credentials, the certificate) and creates the bucket `bucket`;
it stops when the `with` block ends. With `check_keys`, it answers only requests signed with the keys it made (an
IAM user's, allowed every S3 action), as a real store does: others get InvalidAccessKeyId or SignatureDoesNotMatch.
`unreachable_endpoint` and `silent_endpoint` point the environment at a closed port and at a server that never
answers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.server import DomainDispatcherApplication, MotoRequestHandler, ThreadedMotoServer, create_backend_app
from werkzeug.serving import make_server


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(server certificate for 127.0.0.1, its key, the authority that signed it): rustls refuses a
    self-signed certificate used as a server's own, so there are two."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def sign(subject, issuer, public_key, key, authority: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True)
        )
        if not authority:
            address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
        return builder.sign(key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ddpm-lightning test authority")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    paths = folder / "server.pem", folder / "server.key", folder / "authority.pem"
    paths[0].write_bytes(
        sign(server_name, ca_name, key.public_key(), ca_key, False).public_bytes(serialization.Encoding.PEM)
    )
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].write_bytes(
        sign(ca_name, ca_name, ca_key.public_key(), ca_key, True).public_bytes(serialization.Encoding.PEM)
    )
    return paths


class TLSMotoServer(ThreadedMotoServer):
    """moto's threaded server, serving HTTPS."""

    def __init__(self, certificate: Path, key: Path):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler, ssl_context=self.context
        )
        self._server_ready_event.set()
        self._server.serve_forever()


def s3_environment(monkeypatch, endpoint: str, authority: Path | None = None) -> None:
    """Point boto3 and LitData at `endpoint`, with dummy credentials (and trusting `authority`)."""
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    if authority is not None:
        settings |= {"AWS_CA_BUNDLE": str(authority), "SSL_CERT_FILE": str(authority)}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def unreachable_endpoint(monkeypatch) -> Iterator[str]:
    """An endpoint on 127.0.0.1 where nothing listens (a stopped server): connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"https://127.0.0.1:{port}"
    s3_environment(monkeypatch, endpoint)
    yield endpoint


@contextmanager
def silent_endpoint(monkeypatch) -> Iterator[str]:
    """An endpoint on 127.0.0.1 that takes connections and never answers (a hung server, a black-holed route)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # (never accepted: the kernel completes the connections, nobody reads them)
        endpoint = f"https://127.0.0.1:{server.getsockname()[1]}"
        s3_environment(monkeypatch, endpoint)
        yield endpoint


def _check_keys(monkeypatch) -> None:
    """Make an IAM user allowed all of S3, use its keys, and have the server check every request's signature."""
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam")
    user = f"trainer-{uuid.uuid4().hex[:8]}"  # (the server's accounts outlive it: one user per test)
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    keys = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # (it holds the credentials it first found)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)


@contextmanager
def s3_standin(folder: Path, monkeypatch, check_keys: bool = False) -> Iterator[str]:
    """Start the server, set the environment for it, create `bucket`; yields the endpoint URL."""
    folder.mkdir(parents=True, exist_ok=True)
    certificate, key, authority = certificates(folder)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = TLSMotoServer(certificate, key)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"https://{host}:{port}"
        s3_environment(monkeypatch, endpoint, authority)
        # moto's stores live in this process, not in the server: empty them, as a new server would be
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, context=ssl.create_default_context(cafile=authority)).close()
        import boto3

        boto3.client("s3").create_bucket(Bucket="bucket")
        if check_keys:
            _check_keys(monkeypatch)
        yield endpoint
    finally:
        server.stop()
