"""`legend tune`: the same grid of settings for every strategy, each chosen on the validation split.

A comparison is only fair if every method got the same tuning budget and none was tuned on the data
it is scored on. Every strategy runs every point of the grid (a plain grid: deterministic, resumable
run by run, and small enough on these settings that a sampler such as Optuna's would save little) on
every seed, each run resumable in OUT/runs/<strategy>/<setting>-seed<k>. A setting's score is its
validation accuracy (``data.val_size``) averaged over the run's last three evaluations, then over the
seeds: under label skew accuracy swings a few points from one evaluation to the next, and one
evaluation would pick that noise. The test split is never read to choose. OUT/tuned.json holds each
strategy's best setting, which ``legend compare --tuned`` applies.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from legend.config import Config, override_config
from legend.errors import LegendError
from legend.records import bytes_through, held_crossing, read_metrics, target_key

TUNED = "tuned.json"
PLAN = "tune.json"
LAST_EVALUATIONS = 3


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``key=v1,v2`` items -> {key: ["v1", "v2"]} (values stay text: the config parses them as overrides do)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise LegendError(f"--grid '{item}' is not key=v1,v2,...: write it like --grid train.lr=1e-3,3e-3")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def settings(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every point of the grid, in the order the values were given."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def overrides(setting: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in setting.items()]


def tune(
    config: Config,
    out: Path,
    strategies: list[str],
    grid: dict[str, list[str]],
    seeds: list[int],
    command: str,
    on_run: Callable[[str], None] = lambda label: None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every (strategy, setting, seed) not yet finished, ``jobs`` at a time; write and return OUT/tuned.json's content."""
    from legend.report.side_by_side import check_jobs, run_side_by_side
    from legend.strategies import strategy_class

    if config.data.val_size <= 0:
        raise LegendError("legend tune chooses settings on a validation split: set data.val_size, e.g. data.val_size=2000")
    if config.eval.stop_at_target:
        raise LegendError(
            "legend tune scores each setting by its last evaluations, which a run stopped at its target never reaches: "
            "set eval.stop_at_target=false"
        )
    if not grid:
        raise LegendError("legend tune needs a grid: give --grid key=v1,v2 (for example --grid train.lr=1e-3,3e-3)")
    points = settings(grid)
    for name in strategies:
        strategy_class(name)  # a bad name or setting fails before hours of runs
    runs = {}  # (strategy, setting's index, seed) -> (label, config, folder)
    for name in strategies:
        for index, point in enumerate(points):
            for seed in seeds:
                run_dir = out / "runs" / name / f"setting{index}-seed{seed}"
                run_config = override_config(config, [*overrides(point), f"strategy.name={name}", f"seed={seed}"])
                runs[name, index, seed] = (f"{name} {' '.join(overrides(point))} seed {seed} -> {run_dir}", run_config, run_dir)
    check_jobs(jobs, [run_config for _, run_config, _ in runs.values()])
    out.mkdir(parents=True, exist_ok=True)
    plan = {"config": config.model_dump(mode="json"), "strategies": strategies, "grid": grid, "seeds": seeds}
    saved = json.loads((out / PLAN).read_text()) if (out / PLAN).is_file() else None
    if saved and {k: saved[k] for k in plan} != plan:
        raise LegendError(
            f"{out} holds a tuning run with another config, strategies, grid or seeds: use a new --out, or the same arguments to resume it"
        )
    (out / PLAN).write_text(json.dumps({**plan, "command": command}, indent=1) + "\n")
    run_side_by_side(list(runs.values()), jobs, on_run)
    chosen = {}
    for name in strategies:
        tried = []
        for index, point in enumerate(points):
            scores = [score(runs[name, index, seed][2]) for seed in seeds]
            reached = [to_target(read_metrics(runs[name, index, seed][2]), config.eval.target_accuracy) for seed in seeds]
            tried.append(
                {
                    "settings": point,
                    "score": sum(scores) / len(scores),
                    "per_seed": scores,
                    "time_to_target_held_s": [t for t, _ in reached],
                    "bytes_to_target_held": [b for _, b in reached],
                }
            )
        best = max(tried, key=lambda t: t["score"])  # the first of equals: grid order
        chosen[name] = {"settings": best["settings"], "score": best["score"], "tried": tried}
    result = {
        "selected_on": f"validation accuracy, mean of the last {LAST_EVALUATIONS} evaluations and of seeds {seeds}",
        "grid": grid,
        "strategies": chosen,
    }
    (out / TUNED).write_text(json.dumps(result, indent=1) + "\n")
    return result


def score(run_dir: Path) -> float:
    """Mean validation accuracy of a finished run's last evaluations."""
    return validation_score(read_metrics(run_dir))


def to_target(rows: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Virtual seconds and bytes to the held crossing of ``target`` (None where the run never held it): what a tuning grid
    over a method's own options (an ablation) is compared by, beside its validation score."""
    held = held_crossing(rows, target_key(rows), target)
    return (held["virtual_time_s"], bytes_through(rows, held["round"])) if held else (None, None)


def validation_score(rows: list[dict[str, Any]]) -> float:
    """Mean validation accuracy of the last evaluations among these metrics rows."""
    validated = [row["val_accuracy"] for row in rows if row["round"] > 0 and row.get("val_accuracy") is not None]
    return sum(validated[-LAST_EVALUATIONS:]) / len(validated[-LAST_EVALUATIONS:])


def read_tuned(path: Path) -> dict[str, dict[str, str]]:
    """Per strategy, the settings ``legend tune`` chose (the ``--tuned`` file of ``legend compare``)."""
    try:
        tuned = json.loads(path.read_text())["strategies"]
        return {name: dict(entry["settings"]) for name, entry in tuned.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LegendError(
            f"--tuned {path} is not a {TUNED} of `legend tune` ({type(exc).__name__}): give OUT/{TUNED} of a finished tuning run"
        ) from None
