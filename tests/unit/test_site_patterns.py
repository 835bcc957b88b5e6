"""The permission regexes of site users: how they are built, matched and parsed back."""

from __future__ import annotations

import re

import pytest

from fairu.broker.management import Permissions
from fairu.broker.sites import (
    WRITE_PATTERN,
    SiteAccess,
    build_pattern,
    parse_pattern,
    parse_queue_list,
    queues_from_read_pattern,
    read_pattern,
    site_broker_url,
)
from fairu.protocol.errors import ConfigError

OWN = "fairu.jobs.higgs-ml.cpu"
SECOND = "fairu.jobs.higgs-ml.gpu_a100"


def matches(pattern: str, name: str) -> bool:
    # RabbitMQ runs an unanchored search with the regex, as re.search does.
    return re.search(pattern, name) is not None


def test_write_pattern_text():
    assert WRITE_PATTERN == r"^(fairu\.events|fairu\.results)$"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fairu.events", True),
        ("fairu.results", True),
        ("fairu.jobs", False),
        ("fairu.eventsX", False),
        ("Xfairu.events", False),
        ("fairuXevents", False),
        ("amq.default", False),
        ("fairu.dlx", False),
    ],
)
def test_write_pattern_matches(name, expected):
    assert matches(WRITE_PATTERN, name) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (OWN, True),
        (SECOND, True),
        ("fairu.trust.log", True),
        ("fairu.jobs.higgs-ml.cpu2", False),
        ("fairu.jobs.higgs-ml.cp", False),
        ("fairu.jobsXhiggs-ml.cpu", False),
        ("fairu.jobs.other.cpu", False),
        ("fairu.dead", False),
        ("fairu.coordinator.results", False),
    ],
)
def test_read_pattern_matches(name, expected):
    assert matches(read_pattern([OWN, SECOND]), name) is expected


def test_read_pattern_round_trip():
    pattern = read_pattern([SECOND, OWN, OWN])
    assert queues_from_read_pattern(pattern) == (OWN, SECOND)


def test_read_pattern_without_queues():
    pattern = read_pattern([])
    assert pattern == r"^(fairu\.trust\.log)$"
    assert queues_from_read_pattern(pattern) == ()


def test_parse_pattern_inverts_build():
    names = ["fairu.jobs.a-b.c_d", "fairu.events"]
    assert parse_pattern(build_pattern(names)) == names


@pytest.mark.parametrize(
    "pattern",
    [
        ".*",
        "^$",
        "",
        r"^fairu\.jobs\..*$",
        r"^(fairu\.jobs\.a\.b|.*)$",
        r"^(fairu.jobs.a.b|fairu\.trust\.log)$",  # unescaped dots match any character
        r"^(fairu\.jobs\.a\.b)$",  # the trust log is missing
        r"^(fairu\.jobs\.b\.b|fairu\.jobs\.a\.b|fairu\.trust\.log)$",  # not sorted
        r"^(fairu\.dead|fairu\.trust\.log)$",  # not a job queue
    ],
)
def test_foreign_read_pattern_rejected(pattern):
    with pytest.raises(ValueError):
        queues_from_read_pattern(pattern)


def test_site_access_permissions():
    access = SiteAccess("eu1", "/", (OWN,))
    permissions = access.permissions()
    assert access.user == "site-eu1"
    assert permissions.configure == "^$"
    assert permissions.write == WRITE_PATTERN
    assert SiteAccess.from_permissions("eu1", "/", permissions) == access


def test_site_access_from_foreign_permissions():
    with pytest.raises(ValueError):
        SiteAccess.from_permissions("eu1", "/", Permissions(".*", ".*", ".*"))


def test_parse_queue_list():
    assert parse_queue_list(" higgs-ml.gpu_a100, higgs-ml.cpu,higgs-ml.cpu") == [
        OWN,
        SECOND,
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid entry ''"),
        ("higgs-ml", "invalid entry 'higgs-ml'"),
        ("a.b,", "invalid entry ''"),
        ("Higgs.cpu", "invalid competition name 'Higgs'"),
        ("higgs.cpu.x", "invalid queue name 'cpu.x'"),
        ("higgs.", "invalid queue name ''"),
    ],
)
def test_parse_queue_list_rejects(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_queue_list(text)


@pytest.mark.parametrize(
    ("admin_url", "vhost", "expected"),
    [
        (
            "amqp://guest:guest@127.0.0.1:5672/%2F",
            "/",
            "amqp://site-a:p-w_1@127.0.0.1:5672/%2F",
        ),
        (
            "amqps://admin:x@broker.example.org/",
            "fairu",
            "amqps://site-a:p-w_1@broker.example.org/fairu",
        ),
        ("amqp://u:p@[::1]:5673/", "/", "amqp://site-a:p-w_1@[::1]:5673/%2F"),
    ],
)
def test_site_broker_url(admin_url, vhost, expected):
    assert site_broker_url(admin_url, "site-a", "p-w_1", vhost) == expected
