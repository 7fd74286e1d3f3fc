"""Kafka SASL/TLS: the NOETL_KAFKA_SECURITY_* / _SASL_* / _SSL_CAFILE settings and the aiokafka client options
`kafka_io.security_options` makes of them (no broker: the mapping and the clients' configuration)."""
from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest

pytest.importorskip("aiokafka", reason="the [kafka] extra is not installed")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from noetl_common.topics import Topics  # noqa: E402
from noetl_query.consumer import group_id as query_group_id  # noqa: E402
from noetl_runtime import kafka_io  # noqa: E402
from noetl_runtime.settings import Settings  # noqa: E402


@pytest.fixture(autouse=True)
def _no_noetl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: only what each test sets counts."""
    import os
    for name in list(os.environ):
        if name.startswith("NOETL_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)


def write_ca(path: Path, common_name: str) -> Path:
    """A self-signed CA certificate (PEM), as an operator's CA bundle would hold."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def ca_names(context: ssl.SSLContext) -> set[str]:
    return {value for cert in context.get_ca_certs() for rdn in cert["subject"] for key, value in rdn
            if key == "commonName"}


# ------------------------------------------------------------------------------------------ the mapping
def test_plaintext_is_the_default_and_carries_nothing_else() -> None:
    assert kafka_io.security_options(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_passes_mechanism_and_credentials_without_tls() -> None:
    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-512",
                        kafka_sasl_username="noetl", kafka_sasl_password="pw")
    assert kafka_io.security_options(settings) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "noetl", "sasl_plain_password": "pw",
    }


def test_ssl_verifies_the_brokers_against_the_ca_file(tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "ca.pem", "noetl test kafka CA")
    options = kafka_io.security_options(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(ca)))
    assert set(options) == {"security_protocol", "ssl_context"} and options["security_protocol"] == "SSL"
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True
    assert "noetl test kafka CA" in ca_names(context)


def test_ssl_without_a_ca_file_still_verifies() -> None:
    context = kafka_io.security_options(Settings(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is True


def test_sasl_ssl_has_both(tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "ca.pem", "sasl ssl CA")
    options = kafka_io.security_options(Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="u",
        kafka_sasl_password="p", kafka_ssl_cafile=str(ca)))
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-256")
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("u", "p")
    assert "sasl ssl CA" in ca_names(options["ssl_context"])


def test_a_missing_ca_file_fails_when_the_client_is_built(tmp_path: Path) -> None:
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "absent.pem"))
    with pytest.raises(FileNotFoundError):
        kafka_io.security_options(settings)


# ------------------------------------------------------------------------------------------ the settings
def test_the_settings_come_from_the_chart_variable_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "ca.pem", "env CA")
    for name, value in {"NOETL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "NOETL_KAFKA_SASL_MECHANISM": "PLAIN",
                        "NOETL_KAFKA_SASL_USERNAME": "user", "NOETL_KAFKA_SASL_PASSWORD": "hunter2",
                        "NOETL_KAFKA_SSL_CAFILE": str(ca)}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.kafka_security_protocol, settings.kafka_sasl_mechanism) == ("SASL_SSL", "PLAIN")
    assert settings.kafka_sasl_username == "user" and settings.kafka_ssl_cafile == str(ca)
    assert "hunter2" not in repr(settings)      # the password stays out of logs
    assert kafka_io.security_options(settings)["sasl_plain_password"] == "hunter2"


@pytest.mark.parametrize("fields, complaint", [
    ({"kafka_security_protocol": "SASL_SSL"}, "needs NOETL_KAFKA_SASL_USERNAME and NOETL_KAFKA_SASL_PASSWORD"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": "u"}, "NOETL_KAFKA_SASL_PASSWORD"),
    ({"kafka_ssl_cafile": "/ca.pem"}, "does not use TLS"),
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", "kafka_sasl_username": "u",
      "kafka_sasl_password": "p"}, "kafka_sasl_mechanism"),
])
def test_inconsistent_security_settings_are_refused_at_start(fields: dict[str, str], complaint: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**fields)
    assert complaint in str(info.value)


# ------------------------------------------------------------------------------------------ the clients
async def test_every_client_kafka_io_builds_gets_the_options(tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "ca.pem", "clients CA")
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                        kafka_sasl_username="u", kafka_sasl_password="p", kafka_ssl_cafile=str(ca))
    producer = kafka_io.make_producer(settings)
    consumer = kafka_io.make_consumer(settings, ["t"], "g")
    admin = kafka_io.make_admin(settings)
    try:
        for client in (producer.client, consumer._client, admin._client):   # never started: no connection
            assert (client._security_protocol, client._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
            assert (client._sasl_plain_username, client._sasl_plain_password) == ("u", "p")
            assert "clients CA" in ca_names(client._ssl_context)
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()


# ------------------------------------------------------------------------------------------ group ids
def test_the_query_group_lives_with_the_other_group_ids() -> None:
    assert Topics("t1.").query_group() == "t1.noetl-query"
    assert query_group_id(Settings(topic_prefix="t1.")) == Topics("t1.").query_group()
    # NOETL_QUERY_GROUP names a new group (a replay from the start), under the same prefix
    assert query_group_id(Settings(topic_prefix="t1.", query_group="noetl-query-restarted")) == \
        "t1.noetl-query-restarted"


# ------------------------------------------------------------------------------------------ the broker
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT", "SSL", "PLAINTEXT"])
def test_the_brokers_faust_app_connects_with_the_same_settings(protocol: str, tmp_path: Path) -> None:
    pytest.importorskip("faust")
    from noetl_broker.app import create_app
    from noetl_broker.settings import BrokerSettings

    ca = write_ca(tmp_path / "ca.pem", "broker CA")
    fields: dict[str, str] = {"kafka_security_protocol": protocol}
    if protocol.startswith("SASL_"):
        fields.update(kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="broker", kafka_sasl_password="pw")
    if protocol.endswith("SSL"):
        fields["kafka_ssl_cafile"] = str(ca)
    app = create_app(BrokerSettings(broker_web=False, topic_prefix="t.sec.", **fields), datadir=str(tmp_path))
    credentials = app.conf.broker_credentials
    if protocol == "PLAINTEXT":
        assert credentials is None
        return
    assert credentials.protocol.name == protocol
    if protocol.startswith("SASL_"):
        assert (credentials.username, credentials.password, credentials.mechanism.value) == (
            "broker", "pw", "SCRAM-SHA-512")
    if protocol.endswith("SSL"):
        assert "broker CA" in ca_names(credentials.context if protocol == "SSL" else credentials.ssl_context)
