"""Messages that the pipeline writes into failed results."""

from __future__ import annotations

import pytest

from fairu.agent.pipeline import _describe_exit


@pytest.mark.parametrize(
    "exit_code, description",
    [
        pytest.param(
            152, " (SIGXCPU: CPU time limit (cpus × walltime_s) reached)", id="xcpu"
        ),
        pytest.param(153, " (SIGXFSZ: file size limit reached)", id="xfsz"),
        pytest.param(
            137,
            " (SIGKILL: killed, for example by the out-of-memory killer or a hard "
            "rlimit)",
            id="kill",
        ),
        pytest.param(139, " (SIGSEGV)", id="segv"),
        pytest.param(1, "", id="plain-failure"),
        pytest.param(128, "", id="no-signal"),
        pytest.param(255, "", id="beyond-signals"),
        pytest.param(None, "", id="killed-by-runner"),
    ],
)
def test_exit_code_names_signal(exit_code, description):
    assert _describe_exit(exit_code) == description
