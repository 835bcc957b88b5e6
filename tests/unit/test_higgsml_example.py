"""Tests of the HiggsML demo bundle in examples/higgsml-demo/.

The example folder is no Python package, so each program is loaded by path.
"""

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "higgsml-demo"
SAMPLE_SUBMISSION = DEMO_DIR / "sample_submission"
SCORE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _load(name, relative_path):
    spec = importlib.util.spec_from_file_location(name, DEMO_DIR / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load("higgsml_demo_make_data_test", "make_data.py")
ingestion = _load("higgsml_demo_ingestion_test", "ingestion_program/ingestion.py")
scoring = _load("higgsml_demo_score_test", "scoring_program/score.py")
build_bundles = _load("higgsml_demo_build_bundles_test", "build_bundles.py")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Generate the default data once and return (input_dir, reference_dir)."""
    return make_data.make_data(str(tmp_path_factory.mktemp("higgsml-data")))


@pytest.fixture(scope="module")
def full_run(data_dirs, tmp_path_factory):
    """Run ingestion over all default experiments and return its records."""
    input_dir, _ = data_dirs
    output_dir = tmp_path_factory.mktemp("higgsml-full-run")
    return ingestion.run_ingestion(input_dir, str(SAMPLE_SUBMISSION), str(output_dir))


def _write_model(folder, predict_body):
    folder.mkdir(parents=True, exist_ok=True)
    source = (
        "class Model:\n"
        "    def __init__(self, get_train_set=None, systematics=None):\n"
        "        pass\n"
        "    def fit(self):\n"
        "        pass\n"
        "    def predict(self, test_set):\n"
        f"        {predict_body}\n"
    )
    (folder / "model.py").write_text(source, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------
# make_data.py
# ---------------------------------------------------------------------------


def test_make_data_is_byte_identical(tmp_path):
    first = make_data.make_data(str(tmp_path / "first"))
    second = make_data.make_data(str(tmp_path / "second"))

    for first_dir, second_dir in zip(first, second):
        names = sorted(path.name for path in Path(first_dir).iterdir())
        assert names == sorted(path.name for path in Path(second_dir).iterdir())
        for name in names:
            first_bytes = (Path(first_dir) / name).read_bytes()
            assert first_bytes == (Path(second_dir) / name).read_bytes(), name


def test_make_data_files_are_small(data_dirs):
    for folder in data_dirs:
        for path in Path(folder).iterdir():
            assert path.stat().st_size < 3_000_000, path


def test_training_weights_sum_to_yields(data_dirs):
    input_dir, _ = data_dirs
    training_set = ingestion.load_training_set(input_dir)
    is_signal = training_set["labels"] == 1
    settings = make_data.DEFAULT_SETTINGS

    assert math.fsum(training_set["weights"][is_signal]) == pytest.approx(
        settings["signal_yield"]
    )
    assert math.fsum(training_set["weights"][~is_signal]) == pytest.approx(
        settings["background_yield"]
    )
    assert set(training_set["data"]) == set(ingestion.FEATURES)


def test_reference_matches_true_mu(data_dirs):
    input_dir, reference_dir = data_dirs
    settings = ingestion.load_settings(input_dir)
    reference = json.loads((Path(reference_dir) / "mu_true.json").read_text())
    expected = [ingestion.true_mu(settings, i) for i in range(settings["num_sets"])]
    low, high = settings["mu_range"]

    assert reference["mu_true"] == expected
    assert all(low <= mu <= high for mu in expected)
    assert reference["experiments_per_set"] == settings["experiments_per_set"]


def test_make_data_rejects_unknown_setting(tmp_path):
    with pytest.raises(KeyError, match="unknown settings"):
        make_data.make_data(str(tmp_path), signal_yeld=10.0)


# ---------------------------------------------------------------------------
# ingestion.py
# ---------------------------------------------------------------------------


def test_pseudo_experiment_hides_labels_and_truth(data_dirs):
    input_dir, _ = data_dirs
    settings = ingestion.load_settings(input_dir)
    test_set, alpha = ingestion.generate_pseudo_experiment(settings, 1, 3)

    assert sorted(test_set) == ["data", "weights"]
    assert sorted(test_set["data"]) == sorted(ingestion.FEATURES)
    assert np.all(test_set["weights"] == 1.0)
    assert abs(alpha - 1.0) < 6 * settings["tes_sigma"]


def test_pseudo_experiment_depends_only_on_seed_key(data_dirs):
    input_dir, _ = data_dirs
    settings = ingestion.load_settings(input_dir)
    first, first_alpha = ingestion.generate_pseudo_experiment(settings, 2, 7)
    ingestion.generate_pseudo_experiment(settings, 0, 0)
    second, second_alpha = ingestion.generate_pseudo_experiment(settings, 2, 7)
    other, _ = ingestion.generate_pseudo_experiment(settings, 2, 8)

    assert first_alpha == second_alpha
    for name in ingestion.FEATURES:
        assert np.array_equal(first["data"][name], second["data"][name]), name
    assert not np.array_equal(
        first["data"]["mass_vis"][:10], other["data"]["mass_vis"][:10]
    )


def test_pseudo_experiment_size(data_dirs):
    input_dir, _ = data_dirs
    settings = ingestion.load_settings(input_dir)
    test_set, _ = ingestion.generate_pseudo_experiment(settings, 0, 0)
    expected = ingestion.true_mu(settings, 0) * settings["signal_yield"]
    expected += settings["background_yield"]

    assert abs(len(test_set["weights"]) - expected) < 6 * math.sqrt(expected)


def test_systematics_scales_energy_features_only():
    data_set = {
        "data": {
            "mass_vis": np.array([100.0, 125.0], dtype=np.float32),
            "pt_h": np.array([30.0, 60.0], dtype=np.float32),
            "delta_r": np.array([1.0, 2.0], dtype=np.float32),
        },
        "weights": np.ones(2),
    }

    shifted = ingestion.systematics(data_set, 1.02)

    assert np.allclose(shifted["data"]["mass_vis"], [102.0, 127.5])
    assert np.allclose(shifted["data"]["pt_h"], [30.6, 61.2])
    assert np.array_equal(shifted["data"]["delta_r"], data_set["data"]["delta_r"])
    assert shifted["data"]["mass_vis"].dtype == np.float32
    assert data_set["data"]["mass_vis"][0] == 100.0


def test_full_run_covers_every_experiment(full_run):
    settings = make_data.DEFAULT_SETTINGS
    pairs = [(record["set"], record["experiment"]) for record in full_run]
    expected = [
        (i, j)
        for i in range(settings["num_sets"])
        for j in range(settings["experiments_per_set"])
    ]

    assert pairs == expected


def test_experiment_range_matches_full_run(data_dirs, full_run, tmp_path):
    input_dir, _ = data_dirs
    subset = ingestion.run_ingestion(
        input_dir,
        str(SAMPLE_SUBMISSION),
        str(tmp_path),
        first_experiment=10,
        experiments=10,
    )
    expected = [record for record in full_run if 10 <= record["experiment"] <= 19]

    assert len(subset) == 10 * make_data.DEFAULT_SETTINGS["num_sets"]
    assert subset == expected


def test_set_range_matches_full_run(data_dirs, full_run, tmp_path):
    input_dir, _ = data_dirs
    subset = ingestion.run_ingestion(
        input_dir,
        str(SAMPLE_SUBMISSION),
        str(tmp_path),
        first_set=2,
        sets=1,
        first_experiment=5,
        experiments=3,
    )
    expected = [
        record
        for record in full_run
        if record["set"] == 2 and 5 <= record["experiment"] <= 7
    ]

    assert subset == expected


def test_base_seed_of_settings_is_the_default(data_dirs, full_run, tmp_path):
    input_dir, _ = data_dirs
    seed = make_data.DEFAULT_SETTINGS["base_seed"]

    same = ingestion.run_ingestion(
        input_dir, str(SAMPLE_SUBMISSION), str(tmp_path), base_seed=seed
    )

    assert same == full_run


def test_base_seed_option_replaces_settings_seed(data_dirs, full_run, tmp_path):
    input_dir, _ = data_dirs
    seed = make_data.DEFAULT_SETTINGS["base_seed"] + 1
    edited = tmp_path / "edited"
    edited.mkdir()
    settings = json.loads((Path(input_dir) / "settings.json").read_text())
    (edited / "settings.json").write_text(json.dumps(dict(settings, base_seed=seed)))
    (edited / "train.npz").symlink_to(Path(input_dir) / "train.npz")

    reseeded = ingestion.run_ingestion(
        input_dir, str(SAMPLE_SUBMISSION), str(tmp_path / "a"), base_seed=seed
    )
    from_settings = ingestion.run_ingestion(
        str(edited), str(SAMPLE_SUBMISSION), str(tmp_path / "b")
    )

    assert reseeded == from_settings
    assert reseeded != full_run


def test_base_seed_option_rejects_negative(data_dirs, tmp_path):
    input_dir, _ = data_dirs

    with pytest.raises(ingestion.IngestionError, match="--base-seed -1"):
        ingestion.run_ingestion(
            input_dir, str(SAMPLE_SUBMISSION), str(tmp_path), base_seed=-1
        )


def test_predictions_file_matches_records(data_dirs, full_run, tmp_path):
    input_dir, _ = data_dirs
    records = ingestion.run_ingestion(
        input_dir, str(SAMPLE_SUBMISSION), str(tmp_path), sets=1, experiments=2
    )
    written = json.loads((tmp_path / "predictions.json").read_text())

    assert written == records
    assert list(written[0]) == [
        "set",
        "experiment",
        "mu_hat",
        "delta_mu_hat",
        "p16",
        "p84",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"first_set": 4}, "--first-set 4 is out of range"),
        ({"first_set": -1}, "--first-set -1 is out of range"),
        ({"sets": 5}, "--sets 5 starting at 0 is out of range"),
        ({"first_experiment": 20, "experiments": 6}, "--experiments 6 starting at 20"),
        ({"experiments": 0}, "--experiments 0 starting at 0"),
    ],
)
def test_ingestion_rejects_invalid_range(data_dirs, tmp_path, options, message):
    input_dir, _ = data_dirs
    with pytest.raises(ingestion.IngestionError, match=re.escape(message)):
        ingestion.run_ingestion(
            input_dir, str(SAMPLE_SUBMISSION), str(tmp_path), **options
        )


@pytest.mark.parametrize(
    ("predict_body", "message"),
    [
        ("return [1.0, 0.1, 0.9, 1.1]", "returned list"),
        ("return {'mu_hat': 1.0, 'p16': 0.9, 'p84': 1.1}", "missing 'delta_mu_hat'"),
        (
            (
                "return {'mu_hat': float('nan'), 'delta_mu_hat': 0.1, "
                "'p16': 0.9, 'p84': 1.1}"
            ),
            "mu_hat for set 0 experiment 0 is not finite",
        ),
        (
            "return {'mu_hat': 'one', 'delta_mu_hat': 0.1, 'p16': 0.9, 'p84': 1.1}",
            "mu_hat for set 0 experiment 0 is not a number",
        ),
        (
            "return {'mu_hat': 1.0, 'delta_mu_hat': 0.1, 'p16': 1.1, 'p84': 0.9}",
            "p16 1.1 exceeds p84 0.9",
        ),
    ],
)
def test_ingestion_rejects_invalid_prediction(
    data_dirs, tmp_path, predict_body, message
):
    input_dir, _ = data_dirs
    submission = _write_model(tmp_path / "submission", predict_body)

    with pytest.raises(ingestion.IngestionError, match=re.escape(message)):
        ingestion.run_ingestion(input_dir, str(submission), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "predictions.json").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mu_range": [2.0, 1.0]}, "mu_range in"),
        ({"mu_range": 1.0}, "mu_range in"),
        ({"signal_yield": -1.0}, "signal_yield in"),
        ({"tes_sigma": "0.01"}, "tes_sigma in"),
        ({"num_sets": 0}, "num_sets in"),
        ({"base_seed": -3}, "base_seed in"),
        ({"background_yield": None}, "background_yield in"),
    ],
)
def test_load_settings_rejects_invalid_value(data_dirs, tmp_path, change, message):
    input_dir, _ = data_dirs
    settings = json.loads((Path(input_dir) / "settings.json").read_text())
    settings.update(change)
    (tmp_path / "settings.json").write_text(json.dumps(settings))

    with pytest.raises(ingestion.IngestionError, match=re.escape(message)):
        ingestion.load_settings(str(tmp_path))


def test_load_settings_rejects_missing_key(data_dirs, tmp_path):
    input_dir, _ = data_dirs
    settings = json.loads((Path(input_dir) / "settings.json").read_text())
    del settings["tes_sigma"]
    (tmp_path / "settings.json").write_text(json.dumps(settings))

    with pytest.raises(
        ingestion.IngestionError, match="missing keys: \\['tes_sigma'\\]"
    ):
        ingestion.load_settings(str(tmp_path))


def test_ingestion_rejects_missing_model(data_dirs, tmp_path):
    input_dir, _ = data_dirs
    with pytest.raises(ingestion.IngestionError, match="submission has no model.py"):
        ingestion.run_ingestion(input_dir, str(tmp_path), str(tmp_path / "out"))


def test_ingestion_cli_exit_code_on_error(tmp_path):
    exit_code = ingestion.main(
        [
            "--input",
            str(tmp_path / "missing"),
            "--submission",
            str(SAMPLE_SUBMISSION),
            "--output",
            str(tmp_path / "out"),
        ]
    )

    assert exit_code == 2


# ---------------------------------------------------------------------------
# score.py and the sample model
# ---------------------------------------------------------------------------


def test_sample_model_coverage_on_defaults(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(full_run))

    scores = scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))

    # Band of no penalty for 100 experiments: 0.6827 +- 2 * 0.0465.
    assert 0.59 <= scores["coverage"] <= 0.78
    assert scores["penalty"] == 1.0
    assert scores["rmse"] < 0.2
    assert scores["quantiles_score"] > 1.0


def test_score_writes_flat_finite_scores(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    predictions_dir = tmp_path / "predictions"
    predictions_dir.mkdir()
    (predictions_dir / "predictions.json").write_text(json.dumps(full_run))

    exit_code = scoring.main(
        [
            "--predictions",
            str(predictions_dir),
            "--reference",
            reference_dir,
            "--output",
            str(tmp_path / "out"),
        ]
    )
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())

    assert exit_code == 0
    assert len(scores) <= 200
    for name in ("quantiles_score", "interval", "coverage", "rmse", "mae"):
        assert name in scores, name
    for name, value in scores.items():
        assert SCORE_NAME.match(name), name
        assert isinstance(value, float), name
        assert math.isfinite(value), name
    assert "set_3.coverage" in scores


def test_score_rejects_duplicate_records(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(full_run + full_run[:1]))

    with pytest.raises(scoring.ScoringError, match="appears twice"):
        scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))


def test_score_rejects_unknown_set(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    record = dict(full_run[0], set=9)
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([record]))

    with pytest.raises(scoring.ScoringError, match=re.escape("set 9 is not in 0 .. 3")):
        scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))


def test_score_rejects_non_finite_values(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    for value in ("NaN", "Infinity", "1" + "0" * 400):
        text = json.dumps([full_run[0]]).replace(
            f'"p84": {json.dumps(full_run[0]["p84"])}', f'"p84": {value}'
        )
        predictions = tmp_path / "predictions.json"
        predictions.write_text(text)

        with pytest.raises(scoring.ScoringError, match="p84 is not finite"):
            scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))


def test_score_rejects_empty_predictions(data_dirs, tmp_path):
    _, reference_dir = data_dirs
    predictions = tmp_path / "predictions.json"
    predictions.write_text("[]")

    with pytest.raises(scoring.ScoringError, match="non-empty JSON list"):
        scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))


def test_score_of_subset_pools_its_records(data_dirs, full_run, tmp_path):
    _, reference_dir = data_dirs
    subset = [record for record in full_run if record["set"] == 1]
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(subset))

    scores = scoring.run_scoring(str(predictions), reference_dir, str(tmp_path / "out"))

    assert scores["experiments"] == 25.0
    assert scores["coverage"] == scores["set_1.coverage"]
    assert "set_0.coverage" not in scores


# ---------------------------------------------------------------------------
# build_bundles.py
# ---------------------------------------------------------------------------


def test_build_bundles_is_deterministic(tmp_path):
    first = build_bundles.build_bundles(str(tmp_path / "first"))
    second = build_bundles.build_bundles(str(tmp_path / "second"))

    assert [item["name"] for item in first] == list(build_bundles.ARCHIVE_NAMES)
    for first_item, second_item in zip(first, second):
        assert first_item["sha256"] == second_item["sha256"], first_item["name"]
        assert first_item["size"] == second_item["size"], first_item["name"]


def test_archives_contain_plain_relative_files(tmp_path):
    descriptions = build_bundles.build_bundles(str(tmp_path))
    expected_members = {
        "ingestion_program": ["ingestion.py"],
        "scoring_program": ["metric.py", "score.py"],
        "input_data": ["settings.json", "train.npz"],
        "reference_data": ["mu_true.json"],
        "sample_submission": ["model.py"],
    }

    for description in descriptions:
        name = description["name"]
        with tarfile.open(description["path"], "r:gz") as archive:
            members = archive.getmembers()
        names = [member.name for member in members]
        assert names == expected_members[name], name
        for member in members:
            assert member.isfile(), member.name
            assert not member.name.startswith("/"), member.name
            assert ".." not in member.name.split("/"), member.name
            assert member.mtime == 0, member.name
            assert member.uid == 0, member.name
            assert member.gid == 0, member.name


def test_build_bundles_cli_prints_json_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, str(DEMO_DIR / "build_bundles.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]

    assert [line["name"] for line in lines] == list(build_bundles.ARCHIVE_NAMES)
    for line in lines:
        assert sorted(line) == ["name", "path", "sha256", "size"]
        assert Path(line["path"]).stat().st_size == line["size"]


def test_pack_folder_rejects_symlink(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "real.txt").write_text("x")
    (folder / "link.txt").symlink_to(folder / "real.txt")

    with pytest.raises(ValueError, match="not a regular file"):
        build_bundles.pack_folder(str(folder), str(tmp_path / "out.tar.gz"))


def test_command_runs_ingestion_then_scoring():
    argv = build_bundles.COMMAND_ARGV

    assert argv[:2] == ["/bin/sh", "-c"]
    assert shlex.split(build_bundles.COMMAND) == argv
    assert "--output /tmp/predictions &&" in argv[2]
    assert argv[2].endswith("--reference /inputs/reference_data --output /output")


def test_expected_scores_are_finite():
    scores = build_bundles.expected_scores(str(DEMO_DIR))

    for name in ("quantiles_score", "interval", "coverage", "rmse", "mae"):
        assert name in scores, name
    for name, value in scores.items():
        assert math.isfinite(value), name


def test_command_on_extracted_archives_matches_expected(tmp_path):
    """Run COMMAND on extracted archives, with container paths moved under tmp_path."""
    descriptions = build_bundles.build_bundles(str(tmp_path / "archives"))
    inputs = tmp_path / "inputs"
    for description in descriptions:
        target = inputs / description["name"]
        target.mkdir(parents=True)
        with tarfile.open(description["path"], "r:gz") as archive:
            # The filter argument exists from Python 3.11.4 on.
            if hasattr(tarfile, "data_filter"):
                archive.extractall(target, filter="data")
            else:
                archive.extractall(target)

    script = build_bundles.COMMAND_ARGV[2]
    script = script.replace("/inputs/", f"{inputs}/")
    script = script.replace("/tmp/predictions", str(tmp_path / "predictions"))
    script = script.replace("--output /output", f"--output {tmp_path / 'output'}")
    script = script.replace("python3 ", f"{shlex.quote(sys.executable)} ")
    # Without PYTHONDONTWRITEBYTECODE, only the programs themselves keep bytecode
    # out of the inputs folder, as they must on the read-only /inputs mount.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name != "PYTHONDONTWRITEBYTECODE"
    }
    subprocess.run(
        ["/bin/sh", "-c", script],
        check=True,
        capture_output=True,
        timeout=120,
        env=environment,
    )

    scores = json.loads((tmp_path / "output" / "scores.json").read_text())
    expected = build_bundles.expected_scores(str(DEMO_DIR))

    assert scores == expected
    assert not list(inputs.rglob("__pycache__"))
