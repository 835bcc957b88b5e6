"""The evaluation file loader and the example's evaluation.toml."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from fairu.broker.evaluation_file import load_evaluation_file
from fairu.broker.evaluations import RECTANGLE_PLACEHOLDERS
from fairu.protocol.errors import ConfigError

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "higgsml-demo"


def _load(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("evaluation-example")
    shutil.copy(EXAMPLE_DIR / "evaluation.toml", folder)
    _load("eval_build_bundles", "build_bundles.py").build_bundles(str(folder / "dist"))
    return folder / "evaluation.toml"


def test_example_loads_with_placeholders(example_copy: Path) -> None:
    request = load_evaluation_file(example_copy, "ev-example")

    assert request.evaluation_id == "ev-example"
    command = " ".join(request.command)
    assert all(word in command for word in RECTANGLE_PLACEHOLDERS)
    assert "{base_seed}" in command
    assert request.scoring == "program"
    assert request.scoring_program is not None
    assert all(len(spec.sha256) == 64 for spec in request.scoring_program.inputs)


def test_example_mu_true_matches_make_data(example_copy: Path) -> None:
    make_data = _load("eval_make_data", "make_data.py")
    ingestion = _load("eval_ingestion", "ingestion_program/ingestion.py")
    request = load_evaluation_file(example_copy)
    settings = dict(make_data.DEFAULT_SETTINGS, base_seed=request.base_seed)

    expected = [ingestion.true_mu(settings, i) for i in range(request.num_sets)]

    assert request.mu_true == expected
    assert request.num_sets == make_data.DEFAULT_SETTINGS["num_sets"]
    assert request.experiments_per_set == make_data.DEFAULT_SETTINGS["experiments_per_set"]


def test_mu_true_file_reads_reference_object(tmp_path: Path) -> None:
    (tmp_path / "mu_true.json").write_text(json.dumps({"mu_true": [1.0, 2.0]}))
    path = tmp_path / "evaluation.toml"
    path.write_text(_minimal('mu_true_file = "mu_true.json"'))

    assert load_evaluation_file(path).mu_true == [1.0, 2.0]


def test_mu_true_and_file_both_rejected(tmp_path: Path) -> None:
    path = tmp_path / "evaluation.toml"
    path.write_text(_minimal('mu_true = [1.0, 2.0]\nmu_true_file = "x.json"'))

    with pytest.raises(ConfigError, match="keep one"):
        load_evaluation_file(path)


def test_invalid_field_names_it(tmp_path: Path) -> None:
    path = tmp_path / "evaluation.toml"
    path.write_text(_minimal("mu_true = [1.0, 2.0]\nshard_size = 0"))

    with pytest.raises(ConfigError, match="shard_size"):
        load_evaluation_file(path)


def _minimal(extra: str) -> str:
    return f"""
competition = "c"
queue = "cpu"
submission_id = "s"
image = "img"
command = ["run", "{{first_set}}", "{{sets}}", "{{first_experiment}}", "{{experiments}}"]
num_sets = 2
experiments_per_set = 3
base_seed = 1
{extra}
""" + ("shard_size = 3\n" if "shard_size" not in extra else "")
