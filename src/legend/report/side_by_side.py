"""Independent runs of a tuning grid or a comparison, ``jobs`` at a time, each in its own process.

The runs of `legend tune` and `legend compare` share nothing, and a small model's run keeps few cores
busy (its matrix multiplies are small), so on a machine with many cores several runs side by side, each on
its share of them (``engine.threads``), finish a grid sooner than one run at a time on all of them. Each
run is the same run it is alone: its own process, its config's threads, seed and checkpoint, so its result
does not depend on ``jobs``, and an interrupted set resumes run by run.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from legend.config import Config
from legend.errors import LegendError

Run = tuple[str, Config, Path]  # (what to call it on start, its config, its folder)


def check_jobs(jobs: int, configs: list[Config]) -> None:
    """Refuse a job count that cannot share the cores out, before any run starts."""
    if jobs < 1:
        raise LegendError(f"--jobs {jobs} is not a number of runs at a time: give 1 or more")
    if jobs > 1 and any(config.engine.threads == 0 for config in configs):
        raise LegendError(
            f"--jobs {jobs} runs {jobs} runs side by side, each on all cores (engine.threads=0): give each its share, e.g. engine.threads=1"
        )


def run_side_by_side(
    runs: list[Run],
    jobs: int,
    on_start: Callable[[str], None] = lambda label: None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Run (or resume, or only re-read) every run, after ``check_jobs``; ``on_round`` sees each round only when they
    run one at a time."""
    from legend.engine.simulation import run_resumable

    if jobs == 1:
        for label, config, out_dir in runs:
            on_start(label)
            run_resumable(config, out_dir, on_round)
        return
    # spawn, not fork: a forked child would inherit the parent's torch thread pool and loaded libraries.
    # A run is handed out only when a job is free, so on_start means started. A run that fails does not
    # stop the others: their work is what a rerun would resume.
    waiting, running, failed = list(runs), set(), []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while waiting or running:
            while waiting and len(running) < jobs:
                label, config, out_dir = waiting.pop(0)
                on_start(label)
                running.add(pool.submit(_run_quietly, config, out_dir))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            failed += [future.exception() for future in done if future.exception() is not None]
    if failed:
        raise failed[0]


def _run_quietly(config: Config, out_dir: Path) -> None:
    from legend.engine.simulation import run_resumable
    from legend.quiet import quiet_libraries

    quiet_libraries()
    run_resumable(config, out_dir)
