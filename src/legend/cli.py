"""The `legend` command: run an experiment, inspect its data split, list strategies."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from legend.errors import LegendError
from legend.quiet import quiet_libraries
from legend.report.compare import DEFAULT_STRATEGIES

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated fine-tuning of language models with adapters on heterogeneous devices."
)
console = Console(width=None if sys.stdout.isatty() else 160)  # tables stay whole in pipes and logs
errors = Console(stderr=True)

CONFIG = typer.Argument(..., help="experiment config (TOML), e.g. configs/quickstart.toml", show_default=False)
OVERRIDES = typer.Argument(None, help="dotted overrides such as fl.rounds=5 data.alpha=0.1", show_default=False)
DEBUG = typer.Option(False, "--debug", help="show the full traceback of an error")
RESUME = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint")
JOBS = typer.Option(1, "--jobs", help="runs side by side, each in its own process on engine.threads cores (results do not change)")


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


@app.command()
@user_errors
def run(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("runs/latest"), "--out", help="folder for metrics.jsonl, summary.json and the checkpoint"),
    resume: bool = RESUME,
    debug: bool = DEBUG,
):
    """Run a federated fine-tuning experiment on simulated devices."""
    from legend.config import load_config

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    from legend.engine.simulation import run_experiment
    from legend.models.placement import resolve_device, resolve_precision

    device = resolve_device(cfg.engine.device)
    precision = str(resolve_precision(cfg.engine.precision, device)).removeprefix("torch.")  # what 'auto' chose here
    console.print(
        f"[bold]legend[/bold] {cfg.strategy.name} on {cfg.data.task} with {cfg.model.name}: "
        f"{cfg.fl.rounds} rounds, {cfg.fl.clients_per_round} of {cfg.fl.num_clients} clients per round, "
        f"{precision} matrix multiplies on the {device.type} -> {out}"
    )
    with Progress(
        TextColumn("round"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
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
def compare(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("runs/compare"), "--out", help="folder for the runs (OUT/runs/), report.md, report.html and the plots"),
    strategies: str = typer.Option(",".join(DEFAULT_STRATEGIES), "--strategies", help="comma-separated strategies to compare"),
    seeds: str = typer.Option("", "--seeds", help="comma-separated seeds (default: the config's seed)"),
    tuned: Path = typer.Option(None, "--tuned", help="OUT/tuned.json of `legend tune`: each strategy runs with the settings chosen for it"),
    jobs: int = JOBS,
    debug: bool = DEBUG,
):
    """Run several strategies on one task, fleet and split (each run resumable), then write the report."""
    from legend.config import load_config
    from legend.report.compare import compare as run_comparison
    from legend.report.tune import read_tuned

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    names, seed_list = _names(strategies), _seeds(seeds, cfg.seed)
    command = " ".join(
        [
            "legend",
            "compare",
            str(config),
            *(overrides or []),
            "--out",
            str(out),
            "--strategies",
            ",".join(names),
            *(["--seeds", seeds] if seeds else []),
            *(["--tuned", str(tuned)] if tuned else []),
        ]
    )
    report = run_comparison(
        cfg,
        out,
        names,
        seed_list,
        command,
        on_run=_started,
        on_round=lambda row: row["accuracy"] is None or console.print(f"  round {row['round']:>4}  accuracy {row['accuracy']:.4f}"),
        tuned=read_tuned(tuned) if tuned else None,
        jobs=jobs,
    )
    console.print(f"report: {report} (and {report.with_suffix('.html')})")


def _started(label: str) -> None:
    console.print(label, highlight=False, markup=False)


def _names(strategies: str) -> list[str]:
    return [s.strip() for s in strategies.split(",") if s.strip()]


def _seeds(seeds: str, default: int) -> list[int]:
    try:
        return [int(s) for s in seeds.split(",") if s.strip()] or [default]
    except ValueError:
        raise LegendError(f"--seeds '{seeds}' is not a comma-separated list of integers: write it like --seeds 0,1,2") from None


@app.command()
@user_errors
def tune(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(Path("runs/tune"), "--out", help="folder for the runs (OUT/runs/) and OUT/tuned.json"),
    strategies: str = typer.Option(",".join(DEFAULT_STRATEGIES), "--strategies", help="comma-separated strategies to tune"),
    grid: list[str] = typer.Option(
        ..., "--grid", help="key=v1,v2,...: values to try (repeat for more keys; every combination is run)", show_default=False
    ),
    seeds: str = typer.Option("", "--seeds", help="comma-separated seeds, each setting's score is their mean (default: the config's seed)"),
    jobs: int = JOBS,
    debug: bool = DEBUG,
):
    """Give every strategy the same grid of settings and pick each one's best on the validation split (data.val_size)."""
    from legend.config import load_config
    from legend.report.tune import TUNED, parse_grid
    from legend.report.tune import tune as run_tuning

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    names, seed_list = _names(strategies), _seeds(seeds, cfg.seed)
    command = " ".join(
        [
            "legend",
            "tune",
            str(config),
            *(overrides or []),
            "--out",
            str(out),
            "--strategies",
            ",".join(names),
            *(f"--grid {item}" for item in grid),
            *(["--seeds", seeds] if seeds else []),
        ]
    )
    result = run_tuning(cfg, out, names, parse_grid(grid), seed_list, command, on_run=_started, jobs=jobs)
    table = Table(title=f"chosen on {result['selected_on']}")
    for column in ("strategy", "settings", "validation accuracy", "tried"):
        table.add_column(column, justify="left" if column in ("strategy", "settings") else "right")
    for name, entry in result["strategies"].items():
        tried = ", ".join(f"{t['score']:.4f}" for t in entry["tried"])
        table.add_row(name, " ".join(f"{k}={v}" for k, v in entry["settings"].items()), f"{entry['score']:.4f}", tried)
    console.print(table)
    console.print(_settings_table(result, cfg.eval.target_accuracy))
    console.print(f"settings per strategy: {out / TUNED} (legend compare ... --tuned {out / TUNED})")


def _settings_table(result: dict, target: float) -> Table:
    """Every setting tried, with its score and its virtual time and bytes to the held target per seed: an ablation's table."""
    table = Table(title=f"every setting: validation score, and virtual time / MB to {target} (held crossing) per seed")
    for column in ("strategy", "settings", "validation accuracy", "time to target s", "MB to target"):
        table.add_column(column, justify="left" if column in ("strategy", "settings") else "right")
    for name, entry in result["strategies"].items():
        for tried in entry["tried"]:
            times = ", ".join("-" if t is None else f"{t:.1f}" for t in tried["time_to_target_held_s"])
            sent = ", ".join("-" if b is None else f"{b / 1e6:.1f}" for b in tried["bytes_to_target_held"])
            table.add_row(name, " ".join(f"{k}={v}" for k, v in tried["settings"].items()), f"{tried['score']:.4f}", times, sent)
    return table


@app.command()
@user_errors
def report(
    out: Path = typer.Argument(..., help="the --out folder of a `legend compare` run", show_default=False),
    target: float = typer.Option(
        None, "--target", help="measure time and bytes to this accuracy (default: the config's eval.target_accuracy)"
    ),
    debug: bool = DEBUG,
):
    """Rebuild the report of a comparison from the metrics of its finished runs."""
    from legend.report.document import write_report

    console.print(f"report: {write_report(out, target)}")


@app.command()
@user_errors
def data(config: Path = CONFIG, overrides: list[str] = OVERRIDES, debug: bool = DEBUG):
    """Show how the training data is split over clients: sample counts and label histograms."""
    from legend.config import load_config

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    from legend.data.partition import label_histogram, partition_indices
    from legend.data.table import column
    from legend.data.tasks import load_task, subsample

    task = subsample(load_task(cfg.data), cfg.data, cfg.seed)
    train = task.train
    parts = partition_indices(train, cfg.fl.num_clients, cfg.data, cfg.seed)
    import numpy as np

    labels = (
        np.asarray(column(train, "label")) if task.label_names else np.zeros(len(train), dtype=np.int64)
    )  # open instructions: counts only
    table = Table(
        title=f"{cfg.data.task}: {len(train)} training examples over {cfg.fl.num_clients} clients ({cfg.data.partition}"
        + (f", alpha {cfg.data.alpha}" if cfg.data.partition == "dirichlet" else "")
        + ")"
    )
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for name in task.label_names:
        table.add_column(name, justify="right")
    for client, rows in enumerate(parts):
        table.add_row(str(client), str(len(rows)), *map(str, label_histogram(labels, rows, len(task.label_names))[: len(task.label_names)]))
    test_counts = np.bincount(column(task.test, "label"), minlength=len(task.label_names)) if task.label_names else []
    table.add_row("test", str(len(task.test)), *map(str, test_counts), style="dim")
    console.print(table)


@app.command()
@user_errors
def devices(
    config: Path = typer.Argument(None, help="experiment config (TOML); default: the default fleet", show_default=False),
    overrides: list[str] = OVERRIDES,
    debug: bool = DEBUG,
):
    """Show the fleet: each device class with its compute, memory, bandwidth and how many clients it runs."""
    from legend.config import load_config
    from legend.devices.fleet import build_fleet

    cfg = load_config(config, overrides or [])
    fleet = build_fleet(cfg.devices, cfg.fl.num_clients, cfg.seed)
    fleet_name = cfg.devices.fleet if isinstance(cfg.devices.fleet, str) else "custom"
    table = Table(title=f"fleet {fleet_name}: {len(fleet.devices)} devices, {cfg.fl.num_clients} clients bound to them")
    for column in (
        "class",
        "devices",
        "clients",
        "sustained GFLOP/s",
        "peak GFLOP/s",
        "memory GB",
        "uplink Mbit/s",
        "downlink Mbit/s",
        "available",
        "storage GB",
        "storage MB/s",
    ):
        table.add_column(column, justify="left" if column == "class" else "right")
    for kind in dict.fromkeys(d.kind for d in fleet.devices):
        p = next(d.profile for d in fleet.devices if d.kind == kind)
        spread = lambda median: f"{median:g} ({median * math.exp(-p.bandwidth_sigma):.1f}-{median * math.exp(p.bandwidth_sigma):.1f})"  # noqa: E731
        table.add_row(
            kind,
            str(sum(d.kind == kind for d in fleet.devices)),
            str(sum(fleet.device_of(c).kind == kind for c in range(cfg.fl.num_clients))),
            f"{p.flops / 1e9:.0f}",
            f"{p.peak_flops / 1e9:.0f}",
            f"{p.memory_gb:g}",
            spread(p.uplink_mbps),
            spread(p.downlink_mbps),
            f"{p.availability:g}",
            f"{p.storage_gb:g}",
            f"{p.storage_mb_s:g}",
        )
    console.print(table)
    console.print(
        "bandwidth: median (one sigma either side) of the per-round log-normal draw; sustained = peak x efficiency; storage: what a device "
        f"may fill with kept activations, and its read rate (devices.activation_cache = {str(cfg.devices.activation_cache).lower()}, "
        "default false)",
        style="dim",
    )


@app.command()
@user_errors
def calibrate(
    model: str = typer.Option("minilm-l6", "--model", help="model to time (a name as in model.name)"),
    rank: int = typer.Option(8, "--rank", help="LoRA rank of the adapters"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = all cores)"),
    instruct: bool = typer.Option(
        False, "--instruct", help="time a decoder as a causal LM trained on instruction responses (data.format=instruct)"
    ),
    device: str = typer.Option("auto", "--device", help="as engine.device: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N"),
    precision: str = typer.Option("auto", "--precision", help="as engine.precision: auto, float32, bfloat16 or float16"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
    save: bool = typer.Option(True, "--save/--no-save", help="store the measured rate as the 'host' device profile"),
    debug: bool = DEBUG,
):
    """Time this machine's block forward/backward and whole steps; compare with the cost model; save the 'host' profile."""
    quiet_libraries()
    from legend.devices.calibrate import calibrate as run_calibration
    from legend.devices.profiles import host_profile_from, save_host_profile

    result = run_calibration(model, rank, threads, instruct, device, precision)
    if save:
        result["host_profile"] = save_host_profile(host_profile_from(result))
    if as_json:
        print(json.dumps(result))
        return
    for part in ("blocks", "steps"):
        where = f"{result['threads']} threads" if result["device"] == "cpu" else result["device"]
        table = Table(
            title=f"{part}: measured vs cost model at {result['flops_per_s'] / 1e9:.1f} GFLOP/s ({where}, {result['precision']}, {model})"
        )
        for column in ("", "GFLOP", "measured s", "predicted s", "predicted / measured"):
            table.add_column(column, justify="right")
        for row in result[part]:
            table.add_row(
                row["name"], f"{row['gflop']:.2f}", f"{row['measured_s']:.4f}", f"{row['predicted_s']:.4f}", f"{row['ratio']:.2f}"
            )
        console.print(table)
    console.print(f"LoRA step order by time {'matches' if result['order_right'] else 'does NOT match'} the cost model's order")
    if save:
        console.print(f"host profile saved to {result['host_profile']}")


@app.command()
@user_errors
def plan(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    debug: bool = DEBUG,
):
    """Show the strategy's plan for every client on its device: depth, ranks, estimated time and memory (round 1)."""
    from legend.config import load_config

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    from legend.engine.round import preview_plans
    from legend.engine.simulation import build_experiment

    rows = preview_plans(build_experiment(cfg))
    times = [r["round_s"] for r in rows]
    spread = {"min_s": min(times), "median_s": float(sorted(times)[len(times) // 2]), "max_s": max(times)}
    if as_json:
        print(json.dumps({"strategy": cfg.strategy.name, "clients": rows, "round_time": spread}))
        return
    kept = cfg.devices.activation_cache
    table = Table(
        title=f"{cfg.strategy.name}: round-1 plan of all {len(rows)} clients (estimates from the capacity model); "
        f"devices.activation_cache = {str(kept).lower()} (default false)"
    )
    columns = ["client", "device", "depth", "ranks per block", "compute s", "comm s", "round s", "memory GB", "MB down", "MB up"]
    for column in columns + (["kept blocks", "storage MB", "later compute s"] if kept else []):
        table.add_column(column, justify="left" if column in ("device", "ranks per block", "kept blocks") else "right")
    for r in sorted(rows, key=lambda r: (r["round_s"], r["client"])):
        cells = [
            str(r["client"]),
            r["device"],
            str(r["depth"]),
            " ".join(map(str, r["rank_by_block"])),
            f"{r['compute_s']:.2f}",
            f"{r['communication_s']:.2f}",
            f"{r['round_s']:.2f}",
            f"{r['memory_gb']:.2f}",
            f"{r['bytes_down'] / 1e6:.2f}",
            f"{r['bytes_up'] / 1e6:.2f}",
        ]
        if kept:
            cells += [
                f"0-{r['kept_blocks'] - 1}" if r["kept_blocks"] else "none",
                f"{r['storage_mb']:.1f}",
                f"{r.get('later_compute_s', r['compute_s']):.2f}",
            ]
        table.add_row(*cells)
    console.print(table)
    if kept:
        console.print(
            "kept blocks: the blocks below the global LoRA region whose output the device keeps (float16) in its storage; later compute s: "
            "a round once its examples are stored (they are read at the profile's storage_mb_s instead of computed)",
            style="dim",
        )
    console.print(
        f"estimated round time over the clients: min {spread['min_s']:.2f} s, median {spread['median_s']:.2f} s, "
        f"max {spread['max_s']:.2f} s"
    )


CLIENT = typer.Option(None, "--client", help="a personalised strategy's (fedsa) client whose own model to take", show_default=False)


@app.command("export")
@user_errors
def export_model(
    run_dir: Path = typer.Argument(
        ..., help="a run folder: the --out of `legend run` or `legend deploy`, or OUT/runs/<name> of `legend compare`", show_default=False
    ),
    out: Path = typer.Option(..., "--out", help="new (or empty) folder for the export", show_default=False),
    merge: bool = typer.Option(False, "--merge", help="a full transformers model with the adapters merged in (default: a PEFT adapter)"),
    client: int = CLIENT,
    debug: bool = DEBUG,
):
    """Write the run's fine-tuned model as a PEFT adapter (or, with --merge, a full transformers model) with a model card."""
    quiet_libraries()
    from legend.export import export

    console.print(f"exported {'merged model' if merge else 'PEFT adapter'} to {export(run_dir, out, merge, client)}")


@app.command()
@user_errors
def predict(
    model_dir: Path = typer.Argument(..., help="an export (`legend export`) or a run folder", show_default=False),
    texts: list[str] = typer.Argument(
        None, help="texts to classify or instructions to answer (a sentence pair: the two texts joined by a tab)", show_default=False
    ),
    file: Path = typer.Option(None, "--file", help="every row of a .tsv/.csv (with a header) or .jsonl file, by the model's text columns"),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="print one JSON object per input instead of a table"),
    client: int = CLIENT,
    debug: bool = DEBUG,
):
    """Classify texts with a fine-tuned model (the label and every class's probability), or answer them (an instruction model)."""
    quiet_libraries()
    from legend.inference import load_fine_tuned, read_inputs
    from legend.inference import predict as classify

    model = load_fine_tuned(model_dir, "predict", client)
    inputs = [tuple(text.split("\t")) for text in texts or []] + (read_inputs(file, model.text_columns) if file else [])
    if not inputs:
        raise LegendError("predict: no input: give texts after the folder, or --file F")
    results = classify(model, inputs)
    if as_jsonl:
        for result in results:
            print(json.dumps(result))
        return
    table = Table(title=f"{len(results)} predictions ({model.source} {model_dir})")
    for column in ("input", *(["answer"] if model.instruct else []), *(["label", *model.label_names] if model.label_names else [])):
        table.add_column(column, justify="left" if column in ("input", "answer", "label") else "right")
    for result in results:
        shown = " | ".join(result["input"]) if isinstance(result["input"], list) else result["input"]
        table.add_row(
            shown[:80],
            *([result["answer"]] if "answer" in result else []),
            *([result["label"], *(f"{p:.4f}" for p in result["probabilities"].values())] if "label" in result else []),
        )
    console.print(table)


@app.command("evaluate")
@user_errors
def evaluate_model(
    model_dir: Path = typer.Argument(..., help="an export (`legend export`) or a run folder", show_default=False),
    overrides: list[str] = typer.Argument(
        None, help="data.* or eval.* overrides, e.g. data.path=my/data data.test_split=dev", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
    client: int = CLIENT,
    debug: bool = DEBUG,
):
    """Score a fine-tuned model on its task's test split (or your own data): accuracy, macro-F1, confusion matrix (instruction
    models: also response loss and perplexity)."""
    quiet_libraries()
    from legend.inference import evaluate, load_fine_tuned

    result = evaluate(load_fine_tuned(model_dir, "evaluate", client), overrides or [])
    if as_json:
        print(json.dumps(result))
        return
    line = f"{result['examples']} examples of split '{result['split']}': accuracy {result['accuracy']}"
    if "macro_f1" in result:
        line += f"  macro-F1 {result['macro_f1']:.4f}"
    if "perplexity" in result:
        line += f"  response loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}"
    console.print(line)
    if "labels" not in result:
        return
    console.print("confusion matrix (rows: true label, columns: predicted label)")
    table = Table()
    table.add_column("")
    for name in result["labels"]:
        table.add_column(name, justify="right")
    for name, row in zip(result["labels"], result["confusion"], strict=True):
        table.add_row(name, *map(str, row))
    console.print(table)


deploy_app = typer.Typer(no_args_is_help=True, help="Run an experiment on Flower (needs the flower extra: pip install 'legend\\[flower]').")
app.add_typer(deploy_app, name="deploy")


DEPLOY_OUT = typer.Option(Path("runs/deploy"), "--out", help="folder for metrics.jsonl, summary.json, the checkpoint and the Flower logs")


@deploy_app.command("local")
@user_errors
def deploy_local(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    nodes: int = typer.Option(0, "--nodes", help="SuperNodes to start, one per client (default: fl.num_clients)"),
    out: Path = DEPLOY_OUT,
    resume: bool = RESUME,
    debug: bool = DEBUG,
):
    """Run the experiment on a real Flower deployment on this machine: a SuperLink and a SuperNode per client, all on loopback."""
    _deploy(config, overrides, out, resume, nodes, simulation=False)


@deploy_app.command(
    "simulation",
    # the help as a string, not a docstring: typer would show a docstring's line break in `legend deploy --help`
    help="Run the experiment under Flower's simulation runtime (Ray, from the bench extra): "
    "a SuperLink whose virtual SuperNodes run the ClientApp.",
)
@user_errors
def deploy_simulation(
    config: Path = CONFIG, overrides: list[str] = OVERRIDES, out: Path = DEPLOY_OUT, resume: bool = RESUME, debug: bool = DEBUG
):
    _deploy(config, overrides, out, resume, 0, simulation=True)


def _deploy(config: Path, overrides: list[str], out: Path, resume: bool, nodes: int, simulation: bool) -> None:
    from legend.config import load_config
    from legend.flower.deploy import deploy_local as run_deployment

    cfg = load_config(config, overrides or [])
    nodes = nodes or cfg.fl.num_clients
    where = f"under Flower's simulation runtime: {nodes} virtual SuperNodes" if simulation else f"over Flower: {nodes} SuperNodes"
    console.print(
        f"[bold]legend[/bold] {cfg.strategy.name} on {cfg.data.task} {where}, {cfg.fl.rounds} rounds -> {out} (logs in {out / 'flower'})"
    )
    summary = run_deployment(
        cfg, nodes, out, resume=resume, echo=lambda line: console.print(line, highlight=False, markup=False), simulation=simulation
    )
    _print_summary(summary, out)


@deploy_app.command("app")
@user_errors
def deploy_app_dir(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(
        Path("runs/deploy"), "--out", help="folder on the SuperLink's host for the results; the app goes to OUT/flower/app"
    ),
    resume: bool = RESUME,
    debug: bool = DEBUG,
):
    """Write the Flower App of the experiment, to submit with `flwr run` to a SuperLink of your own (docs/deployment.md)."""
    from legend.config import load_config
    from legend.flower.deploy import write_app

    app_dir = write_app(load_config(config, overrides or []), out, resume)
    console.print(f"Flower App written to {app_dir}; submit it with: flwr run {app_dir} <your SuperLink connection> --stream")


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
