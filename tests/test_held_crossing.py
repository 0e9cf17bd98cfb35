"""Time to target by the held crossing, and quality under budget, on hand-made metrics (no run: the rules alone)."""

import json

import pytest
from tests.conftest import ROOT
from typer.testing import CliRunner

from legend.cli import app
from legend.config import load_config
from legend.records import METRICS_FILE, SUMMARY_FILE, RoundRecord, accuracy_within, held_crossing, summarize, target_held

TARGET = 0.8


def curve(accuracies, seconds=10.0, megabytes=100, validation=True):
    """Metrics rows: round 0 then one round per accuracy (None: a round without evaluation), each ``seconds`` of
    virtual time and ``megabytes`` up and down. With ``validation``, the accuracies are the validation split's and the
    test split sits 0.2 below, so a rule that read the test split would never reach the target."""
    rows = []
    for k, acc in enumerate(accuracies):
        test = None if acc is None else (round(acc - 0.2, 6) if validation else acc)
        rows.append(
            RoundRecord(
                k,
                accuracy=test,
                loss=None if acc is None else 0.5,
                val_accuracy=acc if validation else None,
                bytes_up=0 if k == 0 else megabytes * 600_000,
                bytes_down=0 if k == 0 else megabytes * 400_000,
                virtual_time_s=seconds * k,
            ).row()
        )
    return rows


def held_round(accuracies, validation=True):
    return summarize("fedit", curve(accuracies, validation=validation), TARGET)["round_to_target_held"]


@pytest.mark.parametrize("validation", [True, False])
def test_a_crossing_counts_only_where_the_next_evaluation_holds_it_or_the_run_ends_on_it(validation):
    assert held_round([0.5, 0.6, 0.85, 0.7, 0.75, 0.82, 0.83, 0.7], validation) == 5  # the spike at round 2 falls back
    assert held_round([0.5, 0.6, 0.81, 0.8], validation) == 2  # held at the next evaluation (at the target counts)
    assert held_round([0.5, 0.6, 0.7, 0.81], validation) == 3  # the last evaluation counts
    assert held_round([0.5, 0.6, 0.85, 0.7], validation) is None  # a spike that falls back at the last evaluation: never
    assert held_round([0.5, 0.6, 0.79], validation) is None  # never reached
    assert held_round([0.9, 0.6, 0.7], validation) is None  # round 0, before training, is not a crossing


def test_rounds_without_evaluation_are_skipped_when_finding_the_next_one():
    assert held_round([0.5, 0.85, None, None, 0.81, None, 0.7]) == 1  # the next evaluation of round 1 is round 4
    assert held_round([0.5, 0.85, None, 0.7, 0.9, None, None]) == 4  # round 4 is the last evaluation: it counts
    rows = curve([0.5, 0.85, None, 0.7, 0.9, None, 0.95])
    assert held_crossing(rows, "val_accuracy", TARGET)["round"] == 4


def test_summary_keeps_the_first_crossing_and_adds_the_held_one_with_its_time_and_bytes():
    summary = summarize("fedit", curve([0.5, 0.82, 0.7, 0.81, 0.84], seconds=10.0, megabytes=100), TARGET)
    assert summary["target_split"] == "validation"
    assert (summary["round_to_target"], summary["time_to_target_s"], summary["bytes_to_target"]) == (1, 10.0, 100_000_000)
    assert (summary["round_to_target_held"], summary["time_to_target_held_s"], summary["bytes_to_target_held"]) == (3, 30.0, 300_000_000)
    never = summarize("fedit", curve([0.5, 0.85, 0.7]), TARGET)
    assert never["round_to_target"] == 1
    assert never["round_to_target_held"] is None and never["time_to_target_held_s"] is None and never["bytes_to_target_held"] is None


def test_accuracy_within_a_budget_is_the_last_evaluation_at_or_before_it():
    rows = curve([0.5, 0.65, None, 0.75, 0.95], seconds=15.0, megabytes=50)
    assert accuracy_within(rows, "val_accuracy", seconds=30.0) == 0.65  # round 2 ends at 30 s but was not evaluated
    assert accuracy_within(rows, "val_accuracy", seconds=45.0) == 0.75
    assert accuracy_within(rows, "val_accuracy", sent=200_000_000) == 0.95
    assert accuracy_within(rows, "val_accuracy", sent=149_999_999) == 0.65
    assert accuracy_within(rows, "val_accuracy", seconds=14.9) == 0.5  # round 0, before training, is within any budget
    assert accuracy_within(rows, "accuracy", seconds=45.0) == pytest.approx(0.55)


def write_comparison(out, runs):
    """A `legend compare` folder as the runs would have left it; each summary.json as a run before the held crossing
    wrote it (other target, no held keys), so the report must recompute everything from metrics.jsonl."""
    config = load_config(ROOT / "configs" / "quickstart.toml").model_dump(mode="json")
    plan = {"config": config, "strategies": list(runs), "seeds": [0, 1], "command": "legend compare (hand-made)", "started": "then"}
    (out / "compare.json").write_text(json.dumps(plan))
    for name, per_seed in runs.items():
        for seed, rows in enumerate(per_seed):
            folder = out / "runs" / f"{name}-seed{seed}"
            folder.mkdir(parents=True)
            (folder / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
            old = {k: v for k, v in summarize(name, rows, 0.99).items() if "held" not in k}
            (folder / SUMMARY_FILE).write_text(json.dumps(old))


def test_report_gives_held_time_to_target_first_crossing_beside_it_and_quality_under_the_fastest_ones_budget(tmp_path):
    """fedit ends first (30 s and 36 s, 300 MB each seed); hetlora is slower per round but sends fewer bytes, and spikes
    above the target on seed 0 at round 1 (15 s) before it falls back."""
    write_comparison(
        tmp_path,
        {
            "fedit": [curve([0.5, 0.6, 0.7, 0.8]), curve([0.5, 0.6, 0.7, 0.9], seconds=12.0)],
            "hetlora": [curve([0.5, 0.82, None, 0.75, 0.95], 15.0, 50), curve([0.5, 0.7, 0.72, 0.8, 0.85], 15.0, 50)],
        },
    )
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--target", str(TARGET)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert (
        "| strategy | test accuracy, final | best test (selected on test) | validation, final | validation, best | "
        "virtual time to target (held) | MB to target (held) | reached (held) | virtual time to target, first crossing | "
        "peak device memory GB (estimate) | rounds | wall min |"
    ) in text
    # held: fedit on its last evaluation (30 s, 36 s); hetlora at round 4 on seed 0 (60 s), 3 on seed 1 (45 s); first crossing 15 s, 45 s
    assert (
        "| fedit | 0.650 ± 0.071 | 0.650 ± 0.071 | 0.850 ± 0.071 | 0.850 ± 0.071 | 33.0 s (30.0-36.0) | 300.0 | 2/2 | 33.0 s (30.0-36.0) |"
    ) in text
    assert (
        "| hetlora | 0.700 ± 0.071 | 0.700 ± 0.071 | 0.900 ± 0.071 | 0.900 ± 0.071 | "
        "52.5 s (45.0-60.0) | 175.0 | 2/2 | 30.0 s (15.0-45.0) |"
    ) in text
    budget = text.split("## Quality under budget\n\n")[1].split("\n\n")[0].splitlines()
    assert budget[0] == (
        "| strategy | validation accuracy within fedit's virtual time (33.0 s) | validation accuracy within fedit's bytes (300.0 MB) |"
    )
    assert budget[2] == "| fedit | 0.850 ± 0.071 | 0.850 ± 0.071 |"  # its own final evaluations
    assert budget[3] == "| hetlora | 0.770 ± 0.071 | 0.900 ± 0.071 |"  # 30 s: 0.82 (round 2 not evaluated), 36 s: 0.72; all bytes fit
    relative = text.split("## Relative to each other\n\n")[1].split("\n\n")[1].splitlines()
    assert relative[2] == "| fedit |  | 1.59x (per seed 1.25-2.00x), 71% more bytes |"  # 52.5 s / 33 s; 300 MB against 175 MB


def test_a_tuning_grids_settings_carry_their_time_and_bytes_to_the_held_target():
    from legend.report.tune import to_target

    assert to_target(curve([0.5, 0.85, 0.7, 0.82, 0.83]), TARGET) == (30.0, 3 * 100_000_000)  # round 3, not the spike at 1
    assert to_target(curve([0.5, 0.85, 0.7]), TARGET) == (None, None)


def test_target_held_needs_the_last_two_evaluations_at_or_above_it():
    assert target_held(curve([0.5, 0.81, None, 0.82]), TARGET)
    assert not target_held(curve([0.5, 0.81, 0.79]), TARGET)  # fell back
    assert not target_held(curve([0.5, 0.81]), TARGET)  # not yet confirmed
    assert not target_held(curve([0.9, 0.9], validation=False)[1:], TARGET)  # one evaluation is no pair


def test_a_run_that_stops_at_its_target_ends_on_the_confirming_round_and_resumes_no_further(tmp_path):
    """eval.stop_at_target on a real tiny run: target 0 is held by rounds 1 and 2, so of 4 rounds 2 run; with an
    unreachable target all 4 run."""
    from tests.conftest import tiny_overrides

    from legend.engine.simulation import run_experiment

    def run(out, target, resume=False):
        overrides = tiny_overrides(**{"fl.rounds": 4, "eval.every": 1, "eval.stop_at_target": "true", "eval.target_accuracy": target})
        return run_experiment(load_config(ROOT / "configs" / "quickstart.toml", overrides), out, resume=resume)

    stopped = run(tmp_path / "reached", 0.0)
    assert (stopped["rounds"], stopped["round_to_target_held"]) == (2, 1)
    assert run(tmp_path / "reached", 0.0, resume=True)["rounds"] == 2
    assert run(tmp_path / "never", 1.0)["rounds"] == 4


@pytest.mark.parametrize("command", ["compare", "tune"])
def test_compare_and_tune_refuse_runs_that_stop_at_their_target(tmp_path, command):
    """Both read every strategy over the same rounds: one line naming the key, exit code 2, before any run."""
    extra = ["--grid", "train.lr=1e-3"] if command == "tune" else []
    args = [command, str(ROOT / "configs" / "quickstart.toml"), "eval.stop_at_target=true", "data.val_size=100", *extra]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "set eval.stop_at_target=false" in result.output
    assert not (tmp_path / "out" / "runs").exists()
