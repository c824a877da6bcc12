"""Every way in of DESIGN.md's "NATS connection security", against a real nats-server
configured that way; a refused login ends every `svc` command at once with one line."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats.errors
import nkeys
import pytest

from services.runtime.bus import TolerantClient, connect, denial, permission_message
from services.runtime.errors import NatsRefusedError
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import NatsSecurity, Secret
from tests.conftest import Processes, run_svc

PASSWORD = "pw-that-must-never-be-printed"
TOKEN = "token-that-must-never-be-printed"
# Far longer than a refusal may take: a client that retried until its connect timeout
# could not pass for one that stopped at the server's answer.
CONNECT_TIMEOUT = "30"


@asynccontextmanager
async def server_with(tmp_path: Path, config: str) -> AsyncIterator[str]:
    """A JetStream nats-server on a free port running `config`; yields its URL."""
    conf = tmp_path / "server.conf"
    conf.write_text(config)
    async with EmbeddedNats(tmp_path / "nats", port=0, extra_args=("-c", str(conf))) as server:
        yield server.url


def nkey_seed(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A fresh user nkey: (its seed file, its public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path / f"{name}.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return path, nkeys.from_seed(seed).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[bytes, nkeys.KeyPair, str]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(seed)
    return seed, pair, pair.public_key.decode()


def _jwt(signer: nkeys.KeyPair, issuer: str, subject: str, nats_claims: dict[str, object]) -> str:
    """A NATS JWT (ed25519-nkey) signed by `signer`, as `nsc` would write it."""
    claims = {"iat": int(time.time()), "iss": issuer, "sub": subject, "name": subject[:8]}
    claims["jti"] = _b64(os.urandom(16))
    claims["nats"] = {**nats_claims, "version": 2}
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}  # fmt: skip


def operator_mode(tmp_path: Path) -> tuple[str, Path, Path]:
    """Decentralized auth: (server config, a user's .creds, a .creds of an unknown account)."""
    _, operator, op_pub = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account, acct_pub = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, _, sys_pub = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, stranger, stranger_pub = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account_jwt = _jwt(operator, op_pub, acct_pub,
                       {"type": "account", "limits": {**_UNLIMITED, **jetstream}})  # fmt: skip
    system_jwt = _jwt(operator, op_pub, sys_pub, {"type": "account", "limits": _UNLIMITED})
    config = (
        f"operator: {_jwt(operator, op_pub, op_pub, {'type': 'operator'})}\n"
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {acct_pub}: {account_jwt}, {sys_pub}: {system_jwt} }}\n"
    )

    def creds(signer: nkeys.KeyPair, issuer: str, name: str) -> Path:
        seed, _, user_pub = _keypair(nkeys.PREFIX_BYTE_USER)
        limits = {"subs": -1, "data": -1, "payload": -1}
        user = _jwt(signer, issuer, user_pub, {"type": "user", "pub": {}, "sub": {}, **limits})
        path = tmp_path / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        return path

    return config, creds(account, acct_pub, "user"), creds(stranger, stranger_pub, "stranger")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(tmp_path: Path) -> Path:
    """A self-signed CA and, signed by it, a server cert for 127.0.0.1 and a client cert."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the openssl CLI: not found")
    certs = tmp_path / "certs"
    certs.mkdir(parents=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", f"{certs}/ca.key", "-out", f"{certs}/ca.pem",
            "-days", "1", "-subj", "/CN=switchboard test CA")  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        openssl("req", *ec, "-keyout", f"{certs}/{name}.key", "-out", f"{certs}/{name}.csr",
                "-subj", f"/CN={name}")  # fmt: skip
        extfile = certs / f"{name}.ext"
        extfile.write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{certs}/{name}.csr", "-CA", f"{certs}/ca.pem",
                "-CAkey", f"{certs}/ca.key", "-CAcreateserial", "-days", "1",
                "-out", f"{certs}/{name}.pem", "-extfile", str(extfile))  # fmt: skip
    return certs


def tls_config(certs: Path, *, verify: bool) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{certs}/server.pem"\n'
        f'  key_file: "{certs}/server.key"\n'
        f'  ca_file: "{certs}/ca.pem"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 2\n"
        "}\n"
    )


async def assert_logs_in(url: str, security: NatsSecurity) -> None:
    """A client with `security` connects and uses JetStream."""
    async with connect(url, name="t", timeout=5, security=security) as bus:
        info = await bus.js.account_info()
        assert info.limits is not None


# -- every way in works -------------------------------------------------------------------


async def test_user_and_password_log_in(tmp_path: Path) -> None:
    config = f'authorization {{ users = [ {{user: a, password: "{PASSWORD}"}} ] }}\n'
    async with server_with(tmp_path, config) as url:
        await assert_logs_in(url, NatsSecurity(user="a", password=Secret(PASSWORD)))


async def test_a_token_logs_in(tmp_path: Path) -> None:
    async with server_with(tmp_path, f'authorization {{ token: "{TOKEN}" }}\n') as url:
        await assert_logs_in(url, NatsSecurity(token=Secret(TOKEN)))


async def test_an_nkey_seed_logs_in(tmp_path: Path) -> None:
    seed, public = nkey_seed(tmp_path, "user")
    async with server_with(
        tmp_path, f"authorization {{ users = [ {{nkey: {public}}} ] }}\n"
    ) as url:
        await assert_logs_in(url, NatsSecurity(nkey_seed=seed))


async def test_a_creds_file_logs_in_and_one_of_an_unknown_account_is_refused(
    tmp_path: Path, processes: Processes
) -> None:
    config, creds, stranger = operator_mode(tmp_path)
    async with server_with(tmp_path, config) as url:
        await assert_logs_in(url, NatsSecurity(creds=creds))
        ensured = run_svc(
            "streams", "ensure", env=processes.env(NATS_URL=url, NATS_CREDS=str(creds))
        )
        assert ensured.returncode == 0, ensured.stderr.decode()
        refused = run_svc(
            "status",
            env=processes.env(
                NATS_URL=url, NATS_CREDS=str(stranger), NATS_CONNECT_TIMEOUT=CONNECT_TIMEOUT
            ),
        )
    stderr = refused.stderr.decode()
    assert refused.returncode != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "refused the connection: authorization failed" in stderr
    seed = stranger.read_text().split("-----BEGIN USER NKEY SEED-----\n")[1].split()[0]
    assert seed not in stderr


async def test_tls_with_our_ca_logs_in(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    async with server_with(tmp_path, tls_config(certs, verify=False)) as url:
        await assert_logs_in(url, NatsSecurity(tls_ca=certs / "ca.pem"))


async def test_mutual_tls_with_a_client_cert_logs_in(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    async with server_with(tmp_path, tls_config(certs, verify=True)) as url:
        await assert_logs_in(
            url,
            NatsSecurity(
                tls_ca=certs / "ca.pem",
                tls_cert=certs / "client.pem",
                tls_key=certs / "client.key",
            ),
        )


async def test_a_svc_command_logs_in_with_each_way_from_the_environment(
    tmp_path: Path, processes: Processes
) -> None:
    # Given a server that takes a password, an nkey and TLS with a client cert
    certs = make_certs(tmp_path)
    seed, public = nkey_seed(tmp_path, "user")
    config = tls_config(certs, verify=True) + (
        f'authorization {{ users = [ {{user: a, password: "{PASSWORD}"}}, {{nkey: {public}}} ] }}\n'
    )
    tls = {
        "NATS_TLS_CA": str(certs / "ca.pem"),
        "NATS_TLS_CERT": str(certs / "client.pem"),
        "NATS_TLS_KEY": str(certs / "client.key"),
    }
    async with server_with(tmp_path, config) as url:
        for login in ({"NATS_USER": "a", "NATS_PASSWORD": PASSWORD}, {"NATS_NKEY_SEED": str(seed)}):
            # When `svc streams ensure` runs with those variables
            result = run_svc("streams", "ensure", env=processes.env(NATS_URL=url, **tls, **login))
            # Then it logs in and provisions
            assert result.returncode == 0, result.stderr.decode()


# -- a refused login is one line, at once ---------------------------------------------------


async def test_a_wrong_password_is_refused_at_once_by_connect(tmp_path: Path) -> None:
    config = f'authorization {{ users = [ {{user: a, password: "{PASSWORD}"}} ] }}\n'
    async with server_with(tmp_path, config) as url:
        started = time.monotonic()
        with pytest.raises(NatsRefusedError, match="authorization failed") as refused:
            async with connect(
                url, name="t", timeout=30, security=NatsSecurity(user="a", password=Secret("x"))
            ):
                pass
        elapsed = time.monotonic() - started
    print(f"wrong password refused by connect() in {elapsed * 1000:.0f} ms")
    # Measured 4 ms; a client retrying until its timeout would take 30 s.
    assert elapsed < 1, f"took {elapsed:.1f}s: retried instead of stopping at the refusal"
    assert "x" not in str(refused.value).split("(")[0]
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize(
    "command",
    [("run", "core"), ("status",), ("streams", "ensure"), ("audit",), ("dlq", "ls")],
    ids=" ".join,
)
async def test_a_wrong_password_ends_every_svc_command_within_a_second_with_one_line(
    tmp_path: Path, processes: Processes, command: tuple[str, ...]
) -> None:
    config = 'authorization { users = [ {user: a, password: "right"} ] }\n'
    async with server_with(tmp_path, config) as url:
        env = processes.env(
            NATS_URL=url,
            NATS_USER="a",
            NATS_PASSWORD=PASSWORD,
            NATS_CONNECT_TIMEOUT=CONNECT_TIMEOUT,
        )
        started = time.monotonic()
        result = run_svc(*command, env=env, timeout=60)
        elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    print(f"svc {' '.join(command)}: refused and exited in {elapsed * 1000:.0f} ms")
    assert result.returncode != 0
    # One line for the operator; besides it only the role's "starting" record (no retries).
    lines = [ln for ln in stderr.splitlines() if ln.startswith("svc:")]
    assert len(lines) == 1, stderr
    assert all('"level": "info"' in ln for ln in stderr.splitlines() if ln not in lines), stderr
    assert "authorization failed" in lines[0]
    assert "NATS_USER/NATS_PASSWORD" in lines[0]
    assert PASSWORD not in stderr + result.stdout.decode()
    # The whole process, Python's start included, measured ~0.35-0.6 s on a loaded
    # 2-core box; a retry until the connect timeout would take 30 s.
    assert elapsed < 5, f"took {elapsed:.1f}s"


@pytest.mark.parametrize(
    "login",
    [
        "unknown user",
        "bad token",
        "password in NATS_URL",
        "unknown nkey",
        "no credentials",
        "a cluster URL list with a node down",
    ],
)
async def test_every_refused_login_is_one_line_naming_the_authorization_failure(
    tmp_path: Path, processes: Processes, login: str
) -> None:
    _, public = nkey_seed(tmp_path, "known")
    stranger, _ = nkey_seed(tmp_path, "stranger")
    config = f'authorization {{ users = [ {{user: a, password: "right"}}, {{nkey: {public}}} ] }}\n'
    async with server_with(tmp_path, config) as url:
        host = url.removeprefix("nats://")
        env = {
            "unknown user": {"NATS_URL": url, "NATS_USER": "nobody", "NATS_PASSWORD": PASSWORD},
            "bad token": {"NATS_URL": url, "NATS_TOKEN": TOKEN},
            "password in NATS_URL": {"NATS_URL": f"nats://a:{PASSWORD}@{host}"},
            "unknown nkey": {"NATS_URL": url, "NATS_NKEY_SEED": str(stranger)},
            "no credentials": {"NATS_URL": url},
            "a cluster URL list with a node down": {
                "NATS_URL": f"nats://127.0.0.1:1,{url}",
                "NATS_USER": "a",
                "NATS_PASSWORD": PASSWORD,
            },
        }[login]
        started = time.monotonic()
        result = run_svc(
            "status", env=processes.env(NATS_CONNECT_TIMEOUT=CONNECT_TIMEOUT, **env), timeout=60
        )
        elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "refused the connection: authorization failed" in stderr
    for secret in (PASSWORD, TOKEN, stranger.read_text().strip()):
        assert secret not in stderr
    assert elapsed < 5, f"{login}: took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("mutual", "expected"),
    [
        (False, "refused the connection: TLS failed"),
        (True, "refused the connection"),
    ],
    ids=["a server cert from another CA", "no client cert under mutual TLS"],
)
async def test_a_tls_refusal_is_one_line_well_before_the_connect_timeout(
    tmp_path: Path, processes: Processes, mutual: bool, expected: str
) -> None:
    certs = make_certs(tmp_path)
    ca = certs if mutual else make_certs(tmp_path / "other")
    async with server_with(tmp_path, tls_config(certs, verify=mutual)) as url:
        started = time.monotonic()
        result = run_svc(
            "status",
            env=processes.env(
                NATS_URL=url,
                NATS_TLS_CA=str(ca / "ca.pem"),
                NATS_CONNECT_TIMEOUT=CONNECT_TIMEOUT,
            ),
            timeout=60,
        )
        elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert expected in stderr
    if not mutual:
        assert "NATS_TLS_CA" in stderr
    # not the 30 s connect timeout: refused at once (the margin is for a loaded box)
    assert elapsed < 5, f"took {elapsed:.1f}s"


# -- a denied subject is named ---------------------------------------------------------------


def test_a_permissions_violation_is_read_as_the_operation_and_subject() -> None:
    published = nats.errors.Error('nats: permissions violation for publish to "$kv.leases.x"')
    subscribed = nats.errors.Error('nats: permissions violation for subscription to "a.>"')
    assert denial(published) == ("publish", "$kv.leases.x")
    assert denial(subscribed) == ("subscription", "a.>")
    assert denial(nats.errors.Error("nats: maximum control line exceeded")) is None
    assert denial(nats.errors.AuthorizationError()) is None


def test_a_denied_stream_create_says_to_provision_as_the_operator() -> None:
    line = permission_message(("publish", "$js.api.stream.create.inbound"), "core")
    assert line.startswith("NATS denied NATS user 'core' permission to publish to")
    assert "'svc streams ensure' as the operator" in line
    other = permission_message(("subscription", "outbound.>"), "")
    assert "this NATS user permission to subscribe to 'outbound.>'" in other
    assert "deploy/nats/auth.conf" in other


class LosesOneCancel(TolerantClient):
    """A client whose first connect goes on retrying after one cancellation, as nats-py's
    does when the cancel lands as an attempt fails (Python 3.11's `wait_for` then returns
    the attempt's error, which the retry loop catches)."""

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect(*args, **kwargs)
        except asyncio.CancelledError:
            await super().connect(*args, **kwargs)  # the cancellation is lost


async def test_a_refused_login_ends_the_connect_even_when_a_cancellation_is_lost(
    tmp_path: Path,
) -> None:
    # Given a server that refuses the login, and a client that swallows one cancellation
    async with server_with(tmp_path, 'authorization { token: "right" }\n') as url:
        security = NatsSecurity(token=Secret("wrong"))

        async def log_in() -> None:
            async with connect(
                url, name="t", timeout=5, security=security, client_class=LosesOneCancel
            ):
                pass

        # When it connects
        attempt = asyncio.create_task(log_in())
        try:
            done, _ = await asyncio.wait([attempt], timeout=10)
            # Then the connect attempt ends, with the refusal
            assert done, "the connect went on retrying after the login was refused"
            with pytest.raises(NatsRefusedError, match="authorization failed"):
                attempt.result()
        finally:
            attempt.cancel()
