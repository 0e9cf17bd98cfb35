"""`legend compare`: several strategies on one task, fleet, split and seed set, one run after another or side by side.

Each run is resumable in OUT/runs/<strategy>-seed<k>; OUT/compare.json keeps the config and the
command, from which `legend report` rebuilds the report at any time.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from legend.config import Config, override_config
from legend.errors import LegendError

DEFAULT_STRATEGIES = (
    "legend",
    "fedit",
    "hetlora",
    "flexlora",
    "fedra",
    "ffa",
    "federa",
)  # what `legend compare` and `legend tune` run unless told
PLAN = "compare.json"


def run_dir(out: Path, strategy: str, seed: int) -> Path:
    return out / "runs" / f"{strategy}-seed{seed}"


def compare(
    config: Config,
    out: Path,
    strategies: list[str],
    seeds: list[int],
    command: str,
    on_run: Callable[[str], None] = lambda label: None,
    on_round: Callable[[dict], None] | None = None,
    tuned: dict[str, dict[str, str]] | None = None,
    jobs: int = 1,
) -> Path:
    """Run every (seed, strategy) not yet finished, ``jobs`` at a time, then write the report; returns OUT/report.md.

    ``tuned``: per strategy, the settings `legend tune` chose, applied over the config for that strategy's runs."""
    from legend.report.document import write_report
    from legend.report.side_by_side import check_jobs, run_side_by_side
    from legend.strategies import strategy_class

    if config.eval.stop_at_target:
        raise LegendError(
            "legend compare sets strategies side by side over the same rounds (quality under budget, every curve): "
            "set eval.stop_at_target=false"
        )
    for name in strategies:
        strategy_class(name)  # an unknown name fails before hours of runs
        if tuned is not None and name not in tuned:
            raise LegendError(
                f"--tuned has no settings for {name} (it has {', '.join(tuned)}): tune {name} too, or leave it out of --strategies"
            )
    runs = [
        (
            f"{name} seed {seed} -> {run_dir(out, name, seed)}",
            override_config(
                config, [*(f"{key}={value}" for key, value in (tuned or {}).get(name, {}).items()), f"strategy.name={name}", f"seed={seed}"]
            ),
            run_dir(out, name, seed),
        )
        for seed in seeds
        for name in strategies
    ]
    check_jobs(jobs, [run_config for _, run_config, _ in runs])
    out.mkdir(parents=True, exist_ok=True)
    plan = {"config": config.model_dump(mode="json"), "strategies": strategies, "seeds": seeds}
    if tuned is not None:
        plan["tuned"] = {name: tuned[name] for name in strategies}
    saved = _read_plan(out)
    if saved and ({k: saved.get(k) for k in plan} != plan or ("tuned" in saved) != ("tuned" in plan)):
        raise LegendError(
            f"{out} holds a comparison with another config, strategies or seeds: use a new --out, or the same arguments to resume it"
        )
    started = saved["started"] if saved else datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), Python {platform.python_version()}"
    (out / PLAN).write_text(json.dumps({**plan, "command": command, "started": started, "machine": machine}, indent=1) + "\n")
    run_side_by_side(runs, jobs, on_run, on_round)
    return write_report(out)


def _read_plan(out: Path) -> dict | None:
    path = out / PLAN
    return json.loads(path.read_text()) if path.is_file() else None


def read_plan(out: Path) -> dict:
    plan = _read_plan(out)
    if plan is None:
        raise LegendError(f"{out} has no {PLAN}: pass the --out folder of a `legend compare` run")
    return plan
