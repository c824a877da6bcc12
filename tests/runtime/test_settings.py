"""Settings: typed, validated at start, one clear line on a bad value, secrets hidden."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.runtime.errors import ConfigError
from services.runtime.settings import CloudSettings, load_cloud_settings, load_settings
from tests.conftest import Processes, run_svc


def test_defaults_run_everything_on_the_sim_with_echo() -> None:
    s = load_settings({})
    assert s.nats_url is None
    assert s.effective_nats_url == "nats://127.0.0.1:4222"
    assert (s.role, s.transport, s.llm, s.accounts) == ("all", "sim", "echo", ("default",))


def test_accounts_come_from_the_list_or_the_single_id() -> None:
    assert load_settings({"WHATSAPP_ACCOUNTS": "a, b ,c"}).accounts == ("a", "b", "c")
    assert load_settings({"WHATSAPP_ACCOUNT_ID": "solo"}).accounts == ("solo",)


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"SVC_ROLE": "boss"}, ["SVC_ROLE", "'boss'", "core", "whatsapp-ingress"]),
        ({"WHATSAPP_LEASE_TTL": "abc"}, ["WHATSAPP_LEASE_TTL", "'abc'", "whole number"]),
        ({"WHATSAPP_LEASE_TTL": "1"}, ["WHATSAPP_LEASE_TTL", "2 to 3600"]),
        ({"WHATSAPP_TRANSPORT": "telegram"}, ["WHATSAPP_TRANSPORT", "sim, neonize"]),
        ({"WHATSAPP_ACCOUNTS": "ok,bad.name"}, ["WHATSAPP_ACCOUNTS", "'bad.name'", "A-Z"]),
        ({"WHATSAPP_ACCOUNTS": "a,a"}, ["WHATSAPP_ACCOUNTS", "twice"]),
        ({"NATS_URL": "localhost:4222"}, ["NATS_URL", "nats://HOST:PORT"]),
        ({"SVC_LLM": "gpt"}, ["SVC_LLM", "echo, openai"]),
        ({"SIM_FAILURE_RATE": "2"}, ["SIM_FAILURE_RATE", "0 to 1"]),
        ({"SVC_ACCESS_WAITING_PERIOD": "a day"}, ["SVC_ACCESS_WAITING_PERIOD", "'a day'"]),
        ({"SVC_LOG_LEVEL": "loud"}, ["SVC_LOG_LEVEL", "DEBUG"]),
        ({"SVC_PRESENCE": "typing"}, ["SVC_PRESENCE", "'typing'", "off, read, read+typing"]),
        (
            {"SVC_PRESENCE_ACCOUNTS": "sales=loud"},
            ["SVC_PRESENCE_ACCOUNTS", "'sales=loud'", "ACCOUNT=MODE", "read+typing"],
        ),
        ({"SVC_ZOMBIE_AFTER": "-1"}, ["SVC_ZOMBIE_AFTER", "0 to 86400"]),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(
    env: dict[str, str], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_presence_is_per_account_and_the_zombie_window_configurable() -> None:
    settings = load_settings(
        {"SVC_PRESENCE": "read", "SVC_PRESENCE_ACCOUNTS": "vip=read+typing, bulk=off"}
    )
    assert settings.core.presence_for("vip") == "read+typing"
    assert settings.core.presence_for("bulk") == "off"
    assert settings.core.presence_for("other") == "read"
    assert load_settings({}).core.presence_for("any") == "read+typing"
    assert load_settings({}).session.zombie_after == 900
    assert load_settings({"SVC_ZOMBIE_AFTER": "0"}).session.zombie_after == 0


def test_secrets_never_reach_repr_or_errors() -> None:
    s = load_settings({"SVC_LLM": "openai", "OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    with pytest.raises(ConfigError) as caught:
        load_settings({"NATS_URL": "nats//user:hunter2@host:4222"})
    assert "hunter2" not in str(caught.value)


def test_openai_without_a_key_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        load_settings({"SVC_LLM": "openai"})


@pytest.mark.parametrize(
    ("var", "value"),
    [("SVC_ROLE", "boss"), ("WHATSAPP_LEASE_TTL", "abc"), ("NATS_URL", "http://x")],
)
def test_svc_exits_2_with_one_line_on_invalid_environment(
    processes: Processes, var: str, value: str
) -> None:
    result = run_svc("run", env=processes.env(**{var: value}), timeout=30)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert var in lines[0]
    assert value in lines[0]


def test_unreachable_nats_is_a_clear_error_not_a_traceback(processes: Processes) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = processes.env(NATS_URL=f"nats://127.0.0.1:{port}", NATS_CONNECT_TIMEOUT="1")
    result = run_svc("run", "core", env=env, timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "Traceback" not in err
    assert f"cannot reach NATS at nats://127.0.0.1:{port}" in err
    assert "svc nats serve" in err


def test_a_role_the_transport_cannot_support_is_refused_clearly(processes: Processes) -> None:
    env = processes.env(WHATSAPP_TRANSPORT="neonize", NATS_URL="nats://127.0.0.1:1")
    result = run_svc("run", "whatsapp-ingress", env=env, timeout=30)
    assert result.returncode == 2
    assert "whatsapp-ingress cannot run with WHATSAPP_TRANSPORT=neonize" in result.stderr.decode()


def test_logs_default_to_auto_text_on_a_terminal_json_otherwise() -> None:
    import io

    from services.runtime.logs import resolve_format

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert load_settings({}).log_format == "auto"
    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Terminal()) == "json"
    assert load_settings({"SVC_LOG_FORMAT": "text"}).log_format == "text"


def test_nats_security_settings_are_read_and_secrets_stay_hidden(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    s = load_settings(
        {"NATS_USER": "alice", "NATS_PASSWORD": "hunter2-pass", "NATS_TLS_CA": str(ca)}
    )
    assert s.nats_security.user == "alice"
    assert s.nats_security.password.value == "hunter2-pass"
    assert s.nats_security.tls_ca == ca
    assert "hunter2-pass" not in repr(s)
    token = load_settings({"NATS_TOKEN": "tok-secret"})
    assert token.nats_security.token.value == "tok-secret"
    assert "tok-secret" not in repr(token)


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"NATS_CREDS": "/nonexistent/user.creds"}, ["NATS_CREDS", "no such file"]),
        ({"NATS_TLS_CA": "/nonexistent/ca.pem"}, ["NATS_TLS_CA", "no such file"]),
        ({"NATS_USER": "alice"}, ["NATS_USER and NATS_PASSWORD"]),
        ({"NATS_PASSWORD": "pw-only-secret"}, ["NATS_USER and NATS_PASSWORD"]),
        ({"NATS_TOKEN": "t", "NATS_USER": "a", "NATS_PASSWORD": "p"}, ["one way to log in"]),
    ],
)
def test_bad_nats_security_settings_are_one_clear_line(
    env: dict[str, str], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    assert "pw-only-secret" not in message
    for needle in needles:
        assert needle in message


def test_a_cert_without_its_key_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="NATS_TLS_CERT and NATS_TLS_KEY"):
        load_settings({"NATS_TLS_CERT": str(cert)})


def test_an_unknown_role_argument_is_named_as_the_argument_not_svc_role() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({}, role="nosuch")
    assert "SVC_ROLE" not in str(caught.value)
    assert "ROLE argument" in str(caught.value)


def test_the_session_store_defaults_to_sqlite_under_the_data_dir() -> None:
    store = load_settings({"SVC_DATA_DIR": "/var/lib/svc"}).whatsapp_store
    assert (store.kind, store.path) == ("sqlite", Path("/var/lib/svc/whatsapp.sqlite"))
    assert load_settings({"WHATSAPP_STORE": "~/wa.db"}).whatsapp_store.path == (
        Path.home() / "wa.db"
    )


def test_a_postgres_store_gets_a_connect_timeout_and_hides_its_password() -> None:
    # Given a DSN with a password and no connect_timeout
    s = load_settings({"WHATSAPP_STORE": "postgres://wa:hunter2@db:5432/wa?sslmode=disable"})
    store = s.whatsapp_store
    # Then a timeout is added (a black-holed database would block connect() forever)
    assert store.kind == "postgres"
    assert store.dsn.value == (
        "postgres://wa:hunter2@db:5432/wa?sslmode=disable&connect_timeout=10"
    )
    assert store.connect_timeout == 10
    # And the password reaches neither repr (logs) nor what may be shown
    assert "hunter2" not in repr(s)
    assert store.shown == "postgres://wa:***@db:5432/wa?sslmode=disable&connect_timeout=10"
    # A timeout of the operator's own is kept; a password in the query is hidden too
    own = load_settings(
        {"WHATSAPP_STORE": "postgresql://wa@db/wa?connect_timeout=3&password=hunter2"}
    ).whatsapp_store
    assert own.connect_timeout == 3
    assert "hunter2" not in own.shown


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("mysql://wa:hunter2@db/wa", ["WHATSAPP_STORE", "SQLite file path", "postgres://"]),
        ("postgres://wa:hunter2@db:99999/wa", ["WHATSAPP_STORE", "HOST:PORT"]),
        ("postgres://wa:hunter2@/wa", ["WHATSAPP_STORE", "no host"]),
        ("postgres://wa:hunter2@db/wa?connect_timeout=0", ["connect_timeout", "1 to 300"]),
        ("sessions.db?mode=ro", ["WHATSAPP_STORE", "'?' or '#'"]),
    ],
)
def test_a_bad_session_store_is_one_line_without_the_password(
    value: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"WHATSAPP_STORE": value})
    message = str(caught.value)
    assert "\n" not in message
    assert "hunter2" not in message
    for needle in needles:
        assert needle in message


def test_a_directory_is_not_a_session_store(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings({"WHATSAPP_STORE": str(tmp_path)})


def test_the_access_waiting_reply_and_period_are_read_from_the_environment() -> None:
    settings = load_settings(
        {"SVC_ACCESS_WAITING_TEXT": "Hold on.", "SVC_ACCESS_WAITING_PERIOD": "600"}
    )
    assert (settings.core.access_waiting_text, settings.core.access_waiting_period) == (
        "Hold on.",
        600.0,
    )
    assert load_settings({}).core.access_waiting_period == 86_400.0


# --- the Cloud API transport's settings (issue 15, ADR 0026) -------------------------

CLOUD_ONE = {
    "WHATSAPP_ACCOUNTS": "shop",
    "WHATSAPP_CLOUD_PHONE_NUMBER_ID": "106540352242922",
    "WHATSAPP_CLOUD_TOKEN": "EAAG-token-secret",
    "WHATSAPP_CLOUD_APP_SECRET": "app-secret-value",
    "WHATSAPP_CLOUD_VERIFY_TOKEN": "verify-secret-value",
}
CLOUD_SECRETS = ("EAAG-token-secret", "app-secret-value", "verify-secret-value", "tok-b-secret")


def _cloud(env: dict[str, str]) -> CloudSettings:
    return load_cloud_settings(env, load_settings(env).accounts)


def test_one_cloud_account_comes_from_the_single_account_variables() -> None:
    cloud = _cloud(CLOUD_ONE)
    shop = cloud.account("shop")
    assert (cloud.api_url, cloud.api_version) == ("https://graph.facebook.com", "v21.0")
    assert shop.phone_number_id == "106540352242922"
    assert shop.token.value == "EAAG-token-secret"
    assert (shop.app_secret.value, shop.verify_token.value) == (
        "app-secret-value",
        "verify-secret-value",
    )
    assert all(secret not in repr(cloud) for secret in CLOUD_SECRETS)
    local = _cloud({**CLOUD_ONE, "WHATSAPP_CLOUD_API_URL": "http://127.0.0.1:9/"})
    assert local.api_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_many_cloud_accounts_come_from_one_file_with_shared_fallbacks(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"cloud{suffix}"
    if suffix == ".json":
        path.write_text(
            '{"shop": {"phone_number_id": "111", "template": "hello_world"},\n'
            ' "help": {"phone_number_id": 222, "token": "tok-b-secret", "language": "de"}}'
        )
    else:
        path.write_text(
            '[shop]\nphone_number_id = "111"\ntemplate = "hello_world"\n'
            '[help]\nphone_number_id = "222"\ntoken = "tok-b-secret"\nlanguage = "de"\n'
        )
    env = {
        "WHATSAPP_ACCOUNTS": "shop,help",
        "WHATSAPP_CLOUD_ACCOUNTS_FILE": str(path),
        "WHATSAPP_CLOUD_TOKEN": "EAAG-token-secret",
        "WHATSAPP_CLOUD_APP_SECRET": "app-secret-value",
        "WHATSAPP_CLOUD_VERIFY_TOKEN": "verify-secret-value",
    }
    cloud = _cloud(env)
    shop, help_ = cloud.account("shop"), cloud.account("help")
    assert (shop.phone_number_id, shop.token.value, shop.template) == (
        "111",
        "EAAG-token-secret",
        "hello_world",
    )
    assert (help_.phone_number_id, help_.token.value, help_.language) == (
        "222",
        "tok-b-secret",
        "de",
    )
    assert help_.app_secret.value == "app-secret-value"
    assert all(secret not in repr(cloud) for secret in CLOUD_SECRETS)


def _cloud_file(tmp_path: Path, text: str, name: str = "cloud.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("env", "file", "needles"),
    [
        ({**CLOUD_ONE, "WHATSAPP_CLOUD_TOKEN": ""}, None, ["WHATSAPP_CLOUD_TOKEN", "'shop'"]),
        (
            {**CLOUD_ONE, "WHATSAPP_CLOUD_PHONE_NUMBER_ID": "+1 555 0100"},
            None,
            ["'+1 555 0100'", "Phone number ID"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_ACCOUNTS": "a,b"},
            None,
            ["2 accounts", "WHATSAPP_CLOUD_ACCOUNTS_FILE"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_CLOUD_API_URL": "graph.facebook.com"},
            None,
            ["WHATSAPP_CLOUD_API_URL"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_CLOUD_API_VERSION": "21"},
            None,
            ["WHATSAPP_CLOUD_API_VERSION", "v21.0"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_CLOUD_ACCOUNTS_FILE": "/nonexistent/cloud.json"},
            None,
            ["WHATSAPP_CLOUD_ACCOUNTS_FILE", "no such file"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_ACCOUNTS": "shop,help"},
            '{"shop": {"phone_number_id": "1"},\n "help": {"phone_number_id": "2",}}',
            ["not valid JSON", "line 2"],
        ),
        (CLOUD_ONE, "[shop\nphone_number_id = 1", ["not valid TOML", "line 1"]),
        (
            {**CLOUD_ONE, "WHATSAPP_ACCOUNTS": "shop,help"},
            '{"shop": {"phone_number_id": "1"}}',
            ["'help'", "no entry"],
        ),
        (
            {**CLOUD_ONE, "WHATSAPP_ACCOUNTS": "shop,help", "WHATSAPP_CLOUD_TOKEN": ""},
            '{"shop": {"phone_number_id": "1", "token": "x"}, "help": {"phone_number_id": "2"}}',
            ["'help'", "no token"],
        ),
        (CLOUD_ONE, '{"shop": {"phone_number_id": "1"}, "shopp": {}}', ["'shopp'", "does not"]),
        (CLOUD_ONE, '{"shop": {"phone_number_id": "1", "tokn": "x"}}', ["'tokn'", "unknown key"]),
        (
            {**CLOUD_ONE, "WHATSAPP_ACCOUNTS": "shop,help"},
            '{"shop": {"phone_number_id": "7"}, "help": {"phone_number_id": "7"}}',
            ["same phone_number_id"],
        ),
        (CLOUD_ONE, "[]", ["expected an object"]),
        (CLOUD_ONE, '{"shop": {"phone_number_id": "1", "token": 5}}', ["'token'", "string"]),
    ],
)
def test_a_bad_cloud_config_is_one_line_and_never_shows_a_secret(
    tmp_path: Path, env: dict[str, str], file: str | None, needles: list[str]
) -> None:
    if file is not None:
        name = "cloud.toml" if file.startswith("[shop") else "cloud.json"
        env = {**env, "WHATSAPP_CLOUD_ACCOUNTS_FILE": _cloud_file(tmp_path, file, name)}
    with pytest.raises(ConfigError) as caught:
        _cloud(env)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert all(secret not in message for secret in CLOUD_SECRETS)
