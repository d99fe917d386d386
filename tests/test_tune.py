"""Ray Tune studies: study files are checked before any trial starts; a small study runs for real,
writes its table, and an interrupted one finishes with --resume without redoing finished trials."""
import os

import pandas as pd
import pytest

from raysslvit.storage import join
from raysslvit.tune import SPACES_DIR, check_points, load_space, main
from conftest import write_space
from test_cli import assert_one_line_error, cli


def tune_cli(*args):
    """`python -m raysslvit.tune ARGS` in this process."""
    return cli(*args, main=main)


def test_every_shipped_study_file_is_valid():
    names = sorted(f[:-5] for f in os.listdir(SPACES_DIR) if f.endswith(".yaml"))
    assert {"masking_ratio", "depth", "st_blocks"} <= set(names)
    for name in names:
        spec = load_space(name)
        check_points(spec, spec["preset"])
        check_points(spec, "cpu")


@pytest.mark.parametrize("change,needle", [
    ({"space": {"ssl.mask_ratio": {"grid": [0.5, 1.5]}}}, "ssl.mask_ratio = 1.5: mask_ratio must be in [0, 1]"),
    ({"space": {"ssl.nosuch": {"grid": [1]}}}, "unknown config field 'nosuch'"),
    ({"space": {"model.depth": {"grid": [2.5]}}}, "depth must be an int"),
    ({"space": {"ssl.mask_ratio": {"sometimes": [0.5]}}}, "needs one sampler"),
    ({"metric": "test_acc"}, "metric must be a validation metric"),
    ({"stages": ["ssl", "report"]}, "stages must list stages"),
    ({"schedule": "asha"}, "unknown setting 'schedule'"),
    ({"scheduler": {"type": "pbt"}}, "scheduler must be"),
])
def test_a_bad_study_file_is_one_line_before_any_trial(tmp_path, change, needle, capsys):
    assert main(["--space", write_space(tmp_path, **change), "--storage-path", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "t").exists()


def test_malformed_yaml_and_unknown_study(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ssl\nspace: {")
    assert_one_line_error(tune_cli("--space", str(bad)), "not valid YAML")
    assert_one_line_error(tune_cli("--space", "no_such_study"), "unknown study", "masking_ratio")


def test_an_interrupted_study_resumes_without_redoing_finished_trials(tune_study):
    """Ctrl-C once the first of three trials has finished; --resume runs only the others (the fixture:
    on two nodes that share no disk, with the study's storage in S3, where this machine can run them)."""
    table = pd.read_parquet(tune_study["path"] / "results.parquet")
    assert sorted(table["model.depth"]) == [1, 2, 3] and set(table["status"]) == {"finished"}
    assert {"probe.val_acc", "probe.test_acc", "val_knn_acc_tokens", "wall_time_s", "seed"} <= set(table.columns)
    assert open(tune_study["first_trial"]).read() == tune_study["first_records"]  # not run again
    assert (table["probe.test_acc"] > 0.1).all()
    assert "best: model.depth=" in tune_study["resumed"].stdout
    assert f"results in {join(tune_study['storage'], 'depth', 'results.parquet')}" in tune_study["resumed"].stdout
    for trial in table["trial"]:  # every trial's stages in the study's storage too: a resumed trial finds them
        assert (tune_study["path"] / trial / "stages" / "probe" / "config.json").exists(), trial
    if tune_study["nodes"] is not None:
        assert len(tune_study["nodes"]) == 2  # two trials at once, one on each node


def test_every_trial_is_an_mlflow_run(tune_study):
    """--mlflow: Ray's MLflowLoggerCallback makes a run of each trial, its reports as metrics, its
    folder as artifacts (the interrupted study's callback restored with it)."""
    from test_tracking import mlflow_runs

    table = pd.read_parquet(tune_study["path"] / "results.parquet")
    runs, client = mlflow_runs(tune_study["mlflow"], "raysslvit-tune-depth")
    finished = {r.data.params["model.depth"]: r for r in runs if r.info.status == "FINISHED"}
    assert sorted(finished) == ["1", "2", "3"], [(r.info.run_name, r.info.status, r.data.params) for r in runs]
    for _, row in table.iterrows():
        run = finished[str(row["model.depth"])]
        assert run.info.run_name in row["trial"]
        assert run.data.metrics["probe.test_acc"] == pytest.approx(row["probe.test_acc"])
        assert client.list_artifacts(run.info.run_id), row["trial"]
