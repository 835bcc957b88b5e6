"""`--log-level` of each command-line program: a bad value is a usage error."""

from __future__ import annotations

import pytest

from fairu.agent import cli as agent_cli
from fairu.broker import admin, coordinator


@pytest.mark.parametrize(
    "program, argv",
    [
        pytest.param(agent_cli.main, ["start", "--config", "site.toml", "--log-level", "LOUD"],
                     id="agent-start"),
        pytest.param(agent_cli.main, ["probe", "--log-level", "LOUD"], id="agent-probe"),
        pytest.param(admin.main, ["--log-level", "LOUD", "keys", "list"], id="admin"),
        pytest.param(coordinator.main, ["--db", "c.sqlite", "--log-level", "LOUD"],
                     id="coordinator"),
    ],
)
def test_bad_log_level_is_usage_error(program, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        program(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert "invalid log level 'LOUD': use one of DEBUG, INFO, WARNING, ERROR" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_log_level_any_case(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = admin.main(["--log-level", "debug", "keys", "--keys-dir", "absent", "list"])
    assert code == admin.EXIT_USAGE
    assert "is not a fairu key folder" in capsys.readouterr().err
