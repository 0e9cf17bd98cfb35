"""`legend compare` and `legend report` on the tiny real config: tables, plots and the rebuilt report."""

import json
import subprocess
import sys

import pytest
from tests.conftest import ROOT, tiny_overrides
from typer.testing import CliRunner

from legend.cli import app
from legend.config import load_config
from legend.errors import LegendError
from legend.report.compare import compare

QUICKSTART = ROOT / "configs" / "quickstart.toml"
PNG = b"\x89PNG\r\n\x1a\n"


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
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--target", "0"])  # another target, from the same rows: the first evaluation reaches it
    rows = [json.loads(line) for line in (tmp_path / "runs" / "fedit-seed0" / "metrics.jsonl").read_text().splitlines()]
    first = next(row["virtual_time_s"] for row in rows if row["round"] > 0 and row["accuracy"] is not None)
    assert result.exit_code == 0 and "target accuracy 0)" in report.read_text()
    assert f" | {first:.1f} s | " in report.read_text().split("\n| fedit |")[1].split("\n")[0]


def test_compare_refuses_a_folder_of_another_comparison(tmp_path):
    config = load_config(QUICKSTART, tiny_overrides(**{"fl.rounds": 1}))
    compare(config, tmp_path, ["fedit"], [0], "first")
    with pytest.raises(LegendError, match="holds a comparison with another config"):
        compare(config, tmp_path, ["fedit"], [1], "second")


def test_compare_from_the_command_line_names_a_bad_strategy_before_running(tmp_path):
    result = subprocess.run([sys.executable, "-m", "legend", "compare", str(QUICKSTART), "--strategies", "legend,fedfoo", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "strategy.name 'fedfoo' is unknown" in result.stderr and not (tmp_path / "runs").exists()
