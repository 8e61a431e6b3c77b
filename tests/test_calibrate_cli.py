"""``bgotrace attribute --lr auto / --fisher-damping / --normalize`` end to end, and bad values."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import assert_one_line_error, base_args, corpus, invoke, model_dir  # noqa: F401


def test_lr_auto_records_the_calibration_and_replays(model_dir, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = base_args(model_dir, corpus, tmp_path, out=out, lr="auto", lr_target="0.5")
    result = invoke(*args, "--normalize", "sensitivity")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    cal = summary["queries"][0]["calibration"]
    assert cal["criterion"] == "loss" and cal["target"] == 0.5
    assert cal["reached"] and abs(cal["achieved"] - 0.5) <= 0.05
    traj = cal["loss_trajectories"]
    assert traj["ascent"][-1] - traj["ascent"][0] == pytest.approx(cal["achieved"], rel=1e-5)
    assert traj["descent"][-1] < traj["descent"][0]  # same η, other direction
    assert summary["config"]["perturb"]["lr"] == "auto"
    assert summary["config"]["scoring"]["normalize"] == "sensitivity"
    assert list((tmp_path / "cache").rglob("sensitivity/*.npz"))
    replay = invoke(
        "attribute", "--config", out / "config.yaml", "--out", tmp_path / "r2", "--quiet"
    )
    assert replay.exit_code == 0, replay.output
    again = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert again["queries"][0]["calibration"]["lr"] == cal["lr"]  # deterministic
    assert again["queries"][0]["top_units"] == summary["queries"][0]["top_units"]


def test_damped_fisher_runs(model_dir, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = base_args(model_dir, corpus, tmp_path, out=out, optimizer="fisher", fisher_damping="0.1")
    result = invoke(*args, "--fisher-samples", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["perturb"]["fisher_damping"] == 0.1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"lr": "auto", "lr_target": "0"}, "--lr-target must be > 0"),
        ({"lr": "auto", "lr_target": "-2"}, "--lr-target must be > 0"),
        ({"lr": "soon"}, "is not a number"),
        ({"lr_criterion": "grad"}, "--lr-criterion"),
        ({"fisher_damping": "-0.5"}, "--fisher-damping must be > 0"),
        ({"normalize": "cosine"}, "--normalize"),
    ],
)
def test_bad_calibration_values_are_one_line_errors(model_dir, corpus, tmp_path, extra, expected):  # noqa: F811
    out = tmp_path / "run"
    result = invoke(*base_args(model_dir, corpus, tmp_path, out=out, **extra))
    assert_one_line_error(result, expected)
    assert not (out / "summary.json").exists()
