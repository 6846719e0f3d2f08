"""Secured nats-servers for the NATS security tests.

Each mode is a real nats-server on a free loopback port, configured from a generated file:
an nkey user, TLS with a client certificate, and operator mode with a user creds file (the
JWTs are signed here with `nkeys`). Each mode also has credentials the server refuses.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys
from conftest import Nats, free_port, wait_port

import msgscript

# msgscript's flag for each credential file, and the environment variable it stands for
ENV_VARS = {
    "natscreds": "NATS_CREDS",
    "natsnkey": "NATS_NKEY",
    "natstls-ca": "NATS_TLS_CA",
    "natstls-cert": "NATS_TLS_CERT",
    "natstls-key": "NATS_TLS_KEY",
}


class ConfiguredNatsServer:
    """nats-server started with `config` (plus a listen line) in `directory`."""

    def __init__(self, directory: Path, config: str, scheme: str = "nats"):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        conf = directory / "nats.conf"
        conf.write_text(f'listen: "127.0.0.1:{self.port}"\n{config}')
        self.log_path = directory / "nats-server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([msgscript.find_nats_server(), "-c", str(conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"nats-server did not start ({e}):\n{self.log_path.read_text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class SecureNats:
    """A secured nats-server with credentials it accepts and credentials it refuses.

    `credentials` maps msgscript flag names (without dashes) to files; `client_options` are the
    same credentials as `nats.connect` keyword arguments.
    """

    mode: str
    server: ConfiguredNatsServer
    credentials: dict[str, Path]
    wrong_credentials: dict[str, Path]
    client_options: dict
    wrong_client_options: dict

    @property
    def url(self) -> str:
        return self.server.url

    def server_flags(self, credentials: dict[str, Path] | None = None) -> list[str]:
        """`msgscript server` flags: -natsurl and one -FLAG FILE per credential."""
        return ["-natsurl", self.url, *_flag_args("-", self.credentials if credentials is None else credentials)]

    def cli_flags(self, credentials: dict[str, Path] | None = None) -> list[str]:
        """`msgscript cli` flags: -u URL and one --FLAG FILE per credential."""
        return ["-u", self.url, *_flag_args("--", self.credentials if credentials is None else credentials)]

    def env(self) -> dict[str, str]:
        """The credentials as environment variables (NATS_NKEY=FILE, ...)."""
        return {ENV_VARS[name]: str(path) for name, path in self.credentials.items()}

    def client(self) -> AuthenticatedNats:
        return AuthenticatedNats(self.url, **self.client_options)

    def stop(self) -> None:
        self.server.stop()


def _flag_args(dashes: str, credentials: dict[str, Path]) -> list[str]:
    return [arg for name, path in credentials.items() for arg in (dashes + name, str(path))]


class AuthenticatedNats(Nats):
    """conftest's synchronous nats-py client, connected with `nats.connect` options."""

    def __init__(self, url: str, **options):
        import nats

        self.loop = asyncio.new_event_loop()
        try:
            self.nc = self.run(nats.connect(url, **options))
        except BaseException:
            self.loop.close()
            raise


def connect_error(url: str, **options) -> Exception | None:
    """The exception a single nats-py connection attempt fails with (None if it connects)."""
    import nats

    async def quiet(_error):
        pass

    async def attempt():
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
                                error_cb=quiet, **options)
        await nc.close()

    try:
        asyncio.run(asyncio.wait_for(attempt(), 10))
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return e
    return None


# nkey user -------------------------------------------------------------------------------------


def new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey of one role (nkeys.PREFIX_BYTE_USER, _ACCOUNT, _OPERATOR)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def write_seed(path: Path, keypair: nkeys.KeyPair) -> Path:
    path.write_bytes(keypair.seed + b"\n")
    return path


def nkey_server(directory: Path) -> SecureNats:
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    seed = write_seed(directory / "user.nk", user)
    # a well-formed user seed the server does not know
    wrong = write_seed(directory / "stranger.nk", new_keypair(nkeys.PREFIX_BYTE_USER))
    config = f'authorization {{\n  users = [ {{ nkey: "{user.public_key.decode()}" }} ]\n}}\n'
    return SecureNats("nkey", ConfiguredNatsServer(directory, config),
                      credentials={"natsnkey": seed}, wrong_credentials={"natsnkey": wrong},
                      client_options={"nkeys_seed": str(seed)}, wrong_client_options={"nkeys_seed": str(wrong)})


# TLS with a client certificate -------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, with_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key, ca_cert = _certificate("msgscript test CA", None, None, ca=True)
    server_names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server_key, server_cert = _certificate("127.0.0.1", ca_key, ca_cert, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                           names=server_names)
    client_key, client_cert = _certificate("msgscript test client", ca_key, ca_cert,
                                           usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = TlsFiles(*(directory / name for name in ("ca.pem", "server-cert.pem", "server-key.pem",
                                                     "client-cert.pem", "client-key.pem")))
    _write_pem(files.ca, ca_cert)
    _write_pem(files.server_cert, server_cert)
    _write_pem(files.server_key, server_key)
    _write_pem(files.client_cert, client_cert)
    _write_pem(files.client_key, client_key)
    return files


def _certificate(common_name, issuer_key, issuer_cert, *, ca=False, usage=None, names=()):
    """(key, certificate) signed by the issuer, or self-signed when the issuer is None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_key = issuer_key or key
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, obj) -> None:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)


def tls_server(directory: Path) -> SecureNats:
    files = make_tls_files(directory)
    config = (f'tls {{\n  cert_file: "{files.server_cert}"\n  key_file: "{files.server_key}"\n'
              f'  ca_file: "{files.ca}"\n  verify: true\n  timeout: 3\n}}\n')
    return SecureNats("tls", ConfiguredNatsServer(directory, config, scheme="tls"),
                      credentials={"natstls-ca": files.ca, "natstls-cert": files.client_cert,
                                   "natstls-key": files.client_key},
                      wrong_credentials={"natstls-ca": files.ca},  # trusts the server, has no certificate
                      client_options={"tls": files.client_context()},
                      wrong_client_options={"tls": files.client_context(with_cert=False)})


# operator, account and user JWTs with a creds file -----------------------------------------------

JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(value: dict) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def encode_jwt(subject: nkeys.KeyPair, signer: nkeys.KeyPair, name: str, nats_claims: dict) -> str:
    """A NATS JWT (v2) about `subject`, signed by `signer`, as nats-io/jwt encodes it."""
    claims = {"iat": int(time.time()), "iss": signer.public_key.decode(), "name": name,
              "sub": subject.public_key.decode()}
    # jti only has to identify the token; like nats-io/jwt, take a hash of the other claims
    claims["jti"] = base64.b32encode(hashlib.sha256(_b64json(claims).encode()).digest()).rstrip(b"=").decode()
    claims["nats"] = {**nats_claims, "version": 2}
    signed = f"{_b64json(JWT_HEADER)}.{_b64json(claims)}"
    return f"{signed}.{_b64url(signer.sign(signed.encode()))}"


@dataclass
class Operator:
    """An operator with one account (APP) and one user in it."""

    operator: nkeys.KeyPair
    account: nkeys.KeyPair
    user: nkeys.KeyPair
    operator_jwt: str
    account_jwt: str
    user_jwt: str

    @classmethod
    def create(cls) -> Operator:
        operator = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
        account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        user = new_keypair(nkeys.PREFIX_BYTE_USER)
        return cls(operator, account, user,
                   encode_jwt(operator, operator, "test-operator", {"type": "operator"}),
                   encode_jwt(account, operator, "APP", {"type": "account", "limits": UNLIMITED}),
                   encode_jwt(user, account, "app-user", {"type": "user", "pub": {}, "sub": {},
                                                          "subs": -1, "data": -1, "payload": -1}))

    def write_creds(self, path: Path) -> Path:
        """The user's creds file in the format `nsc` writes."""
        path.write_text(f"""-----BEGIN NATS USER JWT-----
{self.user_jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{self.user.seed.decode()}
------END USER NKEY SEED------

*************************************************************
""")
        return path


def creds_server(directory: Path) -> SecureNats:
    trusted = Operator.create()
    operator_jwt = directory / "operator.jwt"
    operator_jwt.write_text(trusted.operator_jwt)
    config = (f'operator: "{operator_jwt}"\nresolver: MEMORY\n'
              f'resolver_preload: {{\n  {trusted.account.public_key.decode()}: "{trusted.account_jwt}"\n}}\n')
    creds = trusted.write_creds(directory / "user.creds")
    # a valid chain of JWTs, but under an operator this server does not trust
    wrong = Operator.create().write_creds(directory / "stranger.creds")
    return SecureNats("creds", ConfiguredNatsServer(directory, config),
                      credentials={"natscreds": creds}, wrong_credentials={"natscreds": wrong},
                      client_options={"user_credentials": str(creds)},
                      wrong_client_options={"user_credentials": str(wrong)})


MODES = {"nkey": nkey_server, "tls": tls_server, "creds": creds_server}
