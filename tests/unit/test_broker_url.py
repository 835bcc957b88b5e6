"""Broker URLs from the site config, `fairu-admin --broker` and `fairu-coordinator --broker`.

A malformed URL must end in one error line that does not quote the URL, because
the URL carries a password. None of these tests connects to a broker.
"""

from __future__ import annotations

import pytest

from fairu.agent.session import AmqpSession, check_amqp_url
from fairu.broker import admin, coordinator
from fairu.broker.sites import site_broker_url
from fairu.protocol import ConfigError

BAD_URLS = [
    pytest.param("127.0.0.1", "must start with amqp://", id="no-scheme"),
    pytest.param("http://127.0.0.1:5672/", "must start with amqp://", id="http-scheme"),
    pytest.param("amqp://u:s3cret@127.0.0.1:x/%2F", "not a valid AMQP URL", id="port-text"),
    pytest.param("amqp://u:s3cret@127.0.0.1:99999/%2F", "out of range", id="port-range"),
    pytest.param("amqp://u:s3cret@[::1/%2F", "not a valid AMQP URL", id="bad-ipv6"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_check_amqp_url_rejects(url, expected):
    with pytest.raises(ValueError, match=expected) as caught:
        check_amqp_url(url)
    assert "s3cret" not in str(caught.value)


def test_check_amqp_url_accepts_default():
    check_amqp_url("amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_session_bad_url_is_config_error(url, expected):
    with pytest.raises(ConfigError, match=expected):
        AmqpSession(url, name="test")


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_admin_bad_broker_url(url, expected, capsys):
    code = admin.main(["--broker", url, "topology", "declare"])
    err = capsys.readouterr().err
    assert code == admin.EXIT_USAGE
    assert expected in err
    assert "Traceback" not in err
    assert "s3cret" not in err


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_coordinator_bad_broker_url(url, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        coordinator.main(["--db", str(tmp_path / "c.sqlite"), "--broker", url])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert expected in err
    assert "s3cret" not in err
    assert not (tmp_path / "c.sqlite").exists()


def test_site_broker_url_rejects_http():
    with pytest.raises(ConfigError, match="must start with amqp://"):
        site_broker_url("http://127.0.0.1:15672/", "site-a", "pw", "/")
