"""`legend compare` and `legend report` on the tiny real config: tables, plots and the rebuilt report."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from tests.conftest import ROOT, tiny_overrides
from typer.testing import CliRunner

from legend.cli import app
from legend.config import load_config
from legend.errors import LegendError
from legend.records import MEASURED, read_metrics
from legend.report.compare import compare

QUICKSTART = ROOT / "configs" / "quickstart.toml"
PNG = b"\x89PNG\r\n\x1a\n"


def without_measurements(row):
    return {k: v for k, v in row.items() if k not in MEASURED}


def test_compare_writes_a_report_with_tables_plots_and_the_config_and_report_rebuilds_it(tmp_path):
    overrides = tiny_overrides(**{"eval.target_accuracy": 0.5})
    config = load_config(QUICKSTART, overrides)
    report = compare(config, tmp_path, ["legend", "fedit"], [0], "legend compare (test)")
    text = report.read_text()
    for strategy in ("legend", "fedit"):
        summary = json.loads((tmp_path / "runs" / f"{strategy}-seed0" / "summary.json").read_text())
        assert f"| {strategy} | {summary['final_accuracy']:.3f} |" in text
    assert "| | vs legend | vs fedit |" in text and "\n| fedit | " in text  # the relative table, row against column
    for png in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "legend_layout.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG and f"]({png})" in text
    assert json.loads(text.split("```json\n")[1].split("```")[0]) == config.model_dump(mode="json")
    assert "<table>" in (tmp_path / "report.html").read_text()
    report.unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and report.read_text() == text
    result = CliRunner().invoke(
        app, ["report", str(tmp_path), "--target", "0"]
    )  # another target, from the same rows: the first evaluation reaches it
    rows = [json.loads(line) for line in (tmp_path / "runs" / "fedit-seed0" / "metrics.jsonl").read_text().splitlines()]
    first = next(row["virtual_time_s"] for row in rows if row["round"] > 0 and row["accuracy"] is not None)
    assert result.exit_code == 0 and "target accuracy 0)" in report.read_text()
    assert f" | {first:.1f} s | " in report.read_text().split("\n| fedit |")[1].split("\n")[0]
    side = tmp_path / "side-by-side"  # the same comparison from the command line, two runs at a time in their own processes
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "legend",
            "compare",
            str(QUICKSTART),
            *overrides,
            "--strategies",
            "legend,fedit",
            "--jobs",
            "2",
            "--out",
            str(side),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for strategy in ("legend", "fedit"):  # each run is the run it was alone: the same rounds, but for this machine's seconds
        alone, beside = (read_metrics(folder / "runs" / f"{strategy}-seed0") for folder in (tmp_path, side))
        assert [without_measurements(row) for row in beside] == [without_measurements(row) for row in alone]


def test_compare_refuses_a_folder_of_another_comparison(tmp_path):
    config = load_config(QUICKSTART, tiny_overrides(**{"fl.rounds": 1}))
    compare(config, tmp_path, ["fedit"], [0], "first")
    with pytest.raises(LegendError, match="holds a comparison with another config"):
        compare(config, tmp_path, ["fedit"], [1], "second")


def test_compare_from_the_command_line_names_a_bad_strategy_before_running(tmp_path):
    result = CliRunner().invoke(app, ["compare", str(QUICKSTART), "--strategies", "legend,fedfoo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "strategy.name 'fedfoo' is unknown" in result.stderr and not (tmp_path / "runs").exists()
    result = CliRunner().invoke(
        app,
        [
            "tune",
            str(QUICKSTART),
            "data.val_size=100",
            "engine.threads=0",
            "--grid",
            "train.lr=1e-3",
            "--jobs",
            "2",
            "--out",
            str(tmp_path / "tune"),
        ],
    )
    assert result.exit_code == 2 and "give each its share, e.g. engine.threads=1" in result.output and not (tmp_path / "tune").exists()


def test_tune_picks_each_strategys_best_on_validation_and_compare_applies_it(tmp_path):
    from legend.report.tune import parse_grid, read_tuned, tune

    overrides = tiny_overrides(**{"data.val_size": 100, "data.test_size": 32, "fl.rounds": 3, "eval.every": 1})
    config = load_config(QUICKSTART, overrides)
    grid = parse_grid(["train.lr=1e-4,1e-2"])
    result = tune(config, tmp_path / "tune", ["fedit", "legend"], grid, [0], "legend tune (test)")
    for name, entry in result["strategies"].items():  # a setting's score: its mean validation accuracy over rounds 1-3
        scores = [
            sum(row["val_accuracy"] for row in read_metrics(tmp_path / "tune" / "runs" / name / f"setting{i}-seed0")[1:]) / 3
            for i in range(2)
        ]
        assert [t["score"] for t in entry["tried"]] == scores
        assert entry["settings"] == {"train.lr": ["1e-4", "1e-2"][scores.index(max(scores))]}
    again = tune(config, tmp_path / "tune", ["fedit", "legend"], grid, [0], "legend tune (test)")  # finished runs are only re-read
    assert again == result
    tuned = read_tuned(tmp_path / "tune" / "tuned.json")
    chosen = {name: ["1e-4", "1e-2"].index(tuned[name]["train.lr"]) for name in ("fedit", "legend")}
    for name, index in chosen.items():  # the chosen tuning runs, reused as a user would: a run resumes only under its own config
        shutil.copytree(tmp_path / "tune" / "runs" / name / f"setting{index}-seed0", tmp_path / "compare" / "runs" / f"{name}-seed0")
    report = compare(config, tmp_path / "compare", ["fedit", "legend"], [0], "legend compare --tuned (test)", tuned=tuned)
    for name in ("fedit", "legend"):  # each strategy ran with its own chosen learning rate
        saved = torch.load(tmp_path / "compare" / "runs" / f"{name}-seed0" / "checkpoint.pt", weights_only=True)["config"]
        assert saved["train"]["lr"] == float(tuned[name]["train.lr"])
    text = report.read_text()
    assert "Tuned per strategy on the validation split" in text and "| validation, final | validation, best |" in text
    for name in ("fedit", "legend"):  # validation beside test, each from the run's own summary
        summary = json.loads((tmp_path / "compare" / "runs" / f"{name}-seed0" / "summary.json").read_text())
        assert (
            f"| {name} | {summary['final_accuracy']:.3f} | {summary['best_accuracy']:.3f} | {summary['final_val_accuracy']:.3f} | " in text
        )
    with pytest.raises(LegendError, match="set data.val_size"):
        tune(load_config(QUICKSTART, tiny_overrides()), tmp_path / "novalidation", ["fedit"], grid, [0], "x")
    with pytest.raises(LegendError, match="--tuned has no settings for hetlora"):
        compare(config, tmp_path / "other", ["hetlora"], [0], "x", tuned=tuned)


def test_the_relative_table_pairs_each_seed_with_the_same_seed():
    """Mean speedup is the ratio of mean times; the range is over per-seed ratios, seed k against seed k."""
    from legend.report.document import Runs, _relative

    def runs(name, times, sent):
        return Runs(name, [{"time_to_target_held_s": t, "bytes_to_target_held": b} for t, b in zip(times, sent, strict=True)], [])

    lines = _relative([runs("legend", [10.0, 20.0], [1e6, 1e6]), runs("fedit", [20.0, 30.0], [2e6, 2e6])])
    assert lines[2] == "| legend |  | 1.67x (per seed 1.50-2.00x), 50% fewer bytes |"
    assert lines[3] == "| fedit | 0.60x (per seed 0.50-0.67x), 100% more bytes |  |"
