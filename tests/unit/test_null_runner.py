"""The null runner: a no-op job touches no folder, a shard job writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from fairu.runners.base import RunSpec
from fairu.runners.null import SHARD_COMMAND, NullRunner


def spec(command: list[str], output: Path) -> RunSpec:
    return RunSpec(
        job_id="job-1", image="none", command=command, env={}, mounts=[],
        output_dir=output, walltime_s=60, labels={},
    )


async def test_no_op_job_writes_nothing(tmp_path):
    output = tmp_path / "output"
    runner = NullRunner()

    outcome = await runner.run(spec(["true"], output))

    assert runner.writes_output(["true"]) is False
    assert outcome.exit_code == 0
    # The pipeline made no folder for it, and the runner needs none.
    assert not output.exists()


async def test_shard_job_writes_predictions_and_scores(tmp_path):
    command = [SHARD_COMMAND, "0", "1", "2", "3", "2"]
    runner = NullRunner()

    outcome = await runner.run(spec(command, tmp_path))

    assert runner.writes_output(command) is True
    assert outcome.exit_code == 0
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [(r["set"], r["experiment"]) for r in records] == [
        (1, 3), (1, 4), (2, 3), (2, 4),
    ]
    assert json.loads((tmp_path / "scores.json").read_text()) == {}


async def test_shard_job_with_bad_numbers_fails(tmp_path):
    outcome = await NullRunner().run(spec([SHARD_COMMAND, "x", "0", "1", "0", "1"], tmp_path))

    assert outcome.exit_code == 2
    assert "expected five numbers" in outcome.log_tail
    assert not (tmp_path / "predictions.json").exists()
