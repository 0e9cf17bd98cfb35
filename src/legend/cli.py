"""The `legend` command: run an experiment, inspect its data split, list strategies."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from legend.errors import LegendError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning of language models with adapters on heterogeneous devices.")
console = Console()
errors = Console(stderr=True)

CONFIG = typer.Argument(..., help="experiment config (TOML), e.g. configs/quickstart.toml", show_default=False)
OVERRIDES = typer.Argument(None, help="dotted overrides such as fl.rounds=5 data.alpha=0.1", show_default=False)
DEBUG = typer.Option(False, "--debug", help="show the full traceback of an error")


def user_errors(command):
    """Turn a LegendError into one line on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LegendError as exc:
            if kwargs.get("debug"):
                raise
            errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@app.command()
@user_errors
def run(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("runs/latest"), "--out", help="folder for metrics.jsonl, summary.json and the checkpoint"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    debug: bool = DEBUG,
):
    """Run a federated fine-tuning experiment on simulated devices."""
    from legend.config import load_config

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from legend.engine.simulation import run_experiment

    console.print(f"[bold]legend[/bold] {cfg.strategy.name} on {cfg.data.task} with {cfg.model.name}: "
                  f"{cfg.fl.rounds} rounds, {cfg.fl.clients_per_round} of {cfg.fl.num_clients} clients per round -> {out}")
    with Progress(TextColumn("round"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=not console.is_terminal) as progress:
        bar = progress.add_task("", total=cfg.fl.rounds)

        def on_round(row):
            accuracy = "" if row["accuracy"] is None else f"accuracy {row['accuracy']:.4f}"
            progress.update(bar, completed=row["round"], description=accuracy or progress.tasks[bar].description)
            if not console.is_terminal and row["accuracy"] is not None:
                console.print(f"round {row['round']:>4}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}")

        summary = run_experiment(cfg, out, resume=resume, on_round=on_round)
    _print_summary(summary, out)


@app.command()
@user_errors
def data(config: Path = CONFIG, overrides: list[str] = OVERRIDES, debug: bool = DEBUG):
    """Show how the training data is split over clients: sample counts and label histograms."""
    from legend.config import load_config

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from legend.data import label_histogram, load_task, partition_indices, subsample

    task = subsample(load_task(cfg.data), cfg.data, cfg.seed)
    train = task.train
    parts = partition_indices(train, cfg.fl.num_clients, cfg.data, cfg.seed)
    import numpy as np

    labels = np.asarray(list(train["label"]))
    table = Table(title=f"{cfg.data.task}: {len(train)} training examples over {cfg.fl.num_clients} clients ({cfg.data.partition}"
                  + (f", alpha {cfg.data.alpha}" if cfg.data.partition == "dirichlet" else "") + ")")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for name in task.label_names:
        table.add_column(name, justify="right")
    for client, rows in enumerate(parts):
        table.add_row(str(client), str(len(rows)), *map(str, label_histogram(labels, rows, len(task.label_names))))
    table.add_row("test", str(len(task.test)), *map(str, np.bincount(list(task.test["label"]), minlength=len(task.label_names))), style="dim")
    console.print(table)


@app.command()
def reference():
    """Print the config reference (every key, its default and meaning) as Markdown."""
    from legend.config import reference_markdown

    print(reference_markdown(), end="")


@app.command()
def strategies():
    """List the federated algorithms this version implements."""
    from legend.strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        console.print(f"[bold]{name:<14}[/bold] {(sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")


def _print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"summary ({out / 'summary.json'})", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main() -> None:
    app()
