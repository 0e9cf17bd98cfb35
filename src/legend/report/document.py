"""The comparison report: tables, plots (matplotlib, PNG) and the exact config, as Markdown and HTML.

Built only from what finished runs wrote (metrics.jsonl, summary.json) and OUT/compare.json, so
`legend report OUT` gives the same report on any machine.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from legend.records import SUMMARY_FILE, accuracy_within, read_metrics, summarize, target_key
from legend.report.compare import read_plan, run_dir

PLOTS = {
    "accuracy_vs_time.png": "accuracy against virtual time",
    "accuracy_vs_bytes.png": "accuracy against bytes sent (up and down)",
    "legend_layout.png": "LEGEND: each device's LoRA ranks per block (its last round)",
}


@dataclass
class Runs:
    """One strategy's finished runs (one per seed, ``seeds`` in the same order)."""

    strategy: str
    summaries: list[dict]
    rows: list[list[dict]]
    seeds: list[int] = field(default_factory=list)


def write_report(out: Path, target: float | None = None) -> Path:
    """The report of the finished runs in OUT; ``target``: measure time and bytes to this accuracy instead of the config's."""
    plan = read_plan(out)
    target = plan["config"]["eval"]["target_accuracy"] if target is None else target
    runs = [_runs(out, name, plan["seeds"], target) for name in plan["strategies"]]
    finished = [r for r in runs if r.summaries]
    _plot_curves(out, finished, target)
    layout = next((r for r in finished if r.strategy == "legend"), None)
    if layout:
        _plot_layout(out / "legend_layout.png", layout.rows[0])
    markdown = _markdown(plan, runs, finished, target, layout is not None)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(_html(markdown))
    return out / "report.md"


def _runs(out: Path, strategy: str, seeds: list[int], target: float) -> Runs:
    """The finished runs, their summaries measured against ``target`` (recomputed from the rows where the run had another)."""
    done = {seed: run_dir(out, strategy, seed) for seed in seeds if (run_dir(out, strategy, seed) / SUMMARY_FILE).is_file()}
    rows = [read_metrics(d) for d in done.values()]
    summaries = [
        {**json.loads((d / SUMMARY_FILE).read_text()), **summarize(strategy, r, target)} for d, r in zip(done.values(), rows, strict=True)
    ]
    return Runs(strategy, summaries, rows, list(done))


def _seconds(values: list[float]) -> tuple[float, str]:
    """A divisor and unit that keep these virtual times readable: seconds up to 5 minutes, else minutes."""
    return (1.0, "s") if max(values, default=0.0) < 300 else (60.0, "min")


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known and len(known) == len(values) else None


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def _peak_memory(rows: list[list[dict]]) -> float | None:
    memory = [d["memory_gb"] for run in rows for row in run for d in row["devices"] if "memory_gb" in d]
    return max(memory) if memory else None


def _table(finished: list[Runs], target: float) -> list[str]:
    validated = _validated(finished)
    accuracy_columns = [
        "test accuracy, final",
        "best test (selected on test)",
        *(["validation, final", "validation, best"] if validated else []),
    ]
    lines = [
        "| strategy | " + " | ".join(accuracy_columns) + " | virtual time to target (held) | MB to target (held) | reached (held) | "
        "virtual time to target, first crossing | peak device memory GB (estimate) | rounds | wall min |",
        "|---|" + "---|" * (len(accuracy_columns) + 7),
    ]
    scale, unit = _seconds([x["virtual_time_s"] for r in finished for x in r.summaries])
    for r in finished:
        s = r.summaries
        keys = ["final_accuracy", "best_accuracy", *(["final_val_accuracy", "best_val_accuracy"] if validated else [])]
        accuracies = [_spread([x[key] for x in s]) if all(x.get(key) is not None for x in s) else "-" for key in keys]
        bytes_to, memory = _mean([x["bytes_to_target_held"] for x in s]), _peak_memory(r.rows)
        held = [x["time_to_target_held_s"] for x in s]
        lines.append(
            f"| {r.strategy} | {' | '.join(accuracies)} | {_time_cell(held, scale, unit)} | "
            f"{'-' if bytes_to is None else f'{bytes_to / 1e6:.1f}'} | {sum(t is not None for t in held)}/{len(s)} | "
            f"{_time_cell([x['time_to_target_s'] for x in s], scale, unit)} | {'-' if memory is None else f'{memory:.2f}'} | "
            f"{s[0]['rounds']} | {statistics.fmean(x['wall_s'] for x in s) / 60:.1f} |"
        )
    return lines


def _time_cell(times: list[float | None], scale: float, unit: str) -> str:
    """The mean over seeds when every seed reached the target, and the fastest and slowest seed in brackets."""
    mean = _mean(times)
    if mean is None:
        return "-"
    return f"{mean / scale:.1f} {unit}" + (f" ({min(times) / scale:.1f}-{max(times) / scale:.1f})" if len(times) > 1 else "")


def _budget(finished: list[Runs]) -> list[str]:
    """Quality under budget: each strategy's accuracy on the target's split within the virtual time, and within the bytes,
    at which the fastest strategy finished its rounds, seed k against the fastest one's seed k.

    The fastest strategy: the one whose runs end first on the virtual clock (the least mean ``virtual_time_s`` over its
    seeds; of equals, the first in --strategies). It ran every round it was given within that budget; the others are
    taken at their last evaluation at or before it, so a slower strategy is scored on what it had learnt by then."""
    if not finished:
        return []
    fastest = min(finished, key=lambda r: statistics.fmean(x["virtual_time_s"] for x in r.summaries))
    budgets = {
        seed: (x["virtual_time_s"], x["bytes_up"] + x["bytes_down"]) for seed, x in zip(fastest.seeds, fastest.summaries, strict=True)
    }
    split = "validation" if all(x["target_split"] == "validation" for r in finished for x in r.summaries) else "target split"
    scale, unit = _seconds([seconds for seconds, _ in budgets.values()])
    mean_s, mean_bytes = statistics.fmean(s for s, _ in budgets.values()), statistics.fmean(b for _, b in budgets.values())
    lines = [
        (
            f"| strategy | {split} accuracy within {fastest.strategy}'s virtual time ({mean_s / scale:.1f} {unit}) | "
            f"{split} accuracy within {fastest.strategy}'s bytes ({mean_bytes / 1e6:.1f} MB) |"
        ),
        "|---|---|---|",
    ]
    for r in finished:
        paired = [(rows, budgets[seed]) for seed, rows in zip(r.seeds, r.rows, strict=True) if seed in budgets]
        at_time = [accuracy_within(rows, target_key(rows), seconds=seconds) for rows, (seconds, _) in paired]
        at_bytes = [accuracy_within(rows, target_key(rows), sent=sent) for rows, (_, sent) in paired]
        lines.append(f"| {r.strategy} | {_spread(at_time) if paired else '-'} | {_spread(at_bytes) if paired else '-'} |")
    return lines


def _validated(finished: list[Runs]) -> bool:
    """Whether the runs held out a validation split, so the report shows its accuracy beside the test split's."""
    return any(x.get("final_val_accuracy") is not None for r in finished for x in r.summaries)


def _relative(finished: list[Runs]) -> list[str]:
    """Speedup (their time to target over ours) and bytes saved (1 - ours / theirs), row against column, by the held crossing."""
    names = [r.strategy for r in finished]
    reached = {
        r.strategy: (_mean([x["time_to_target_held_s"] for x in r.summaries]), _mean([x["bytes_to_target_held"] for x in r.summaries]))
        for r in finished
    }
    lines = ["| | " + " | ".join(f"vs {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    times = {r.strategy: [x["time_to_target_held_s"] for x in r.summaries] for r in finished}
    for name in names:
        cells = []
        for other in names:
            (t, b), (t0, b0) = reached[name], reached[other]
            if other == name or None in (t, b, t0, b0):
                cells.append("" if other == name else "-")
                continue
            paired = [
                theirs / ours for ours, theirs in zip(times[name], times[other], strict=True)
            ]  # the same seed: the same split and sampling
            cells.append(_relative_cell(t0 / t, 1 - b / b0, paired))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _relative_cell(speedup: float, saved: float, paired: list[float]) -> str:
    per_seed = f" (per seed {min(paired):.2f}-{max(paired):.2f}x)" if len(paired) > 1 else ""
    return f"{speedup:.2f}x{per_seed}, {abs(100 * saved):.0f}% {'fewer' if saved >= 0 else 'more'} bytes"


def _markdown(plan: dict, runs: list[Runs], finished: list[Runs], target: float, has_layout: bool) -> str:
    config = plan["config"]
    fleet = config["devices"]["fleet"] if isinstance(config["devices"]["fleet"], str) else "custom fleet"
    unfinished = [
        f"{r.strategy} ({len(plan['seeds']) - len(r.summaries)} of {len(plan['seeds'])} seeds)"
        for r in runs
        if len(r.summaries) < len(plan["seeds"])
    ]
    lines = [
        f"# {config['data']['task']}: {', '.join(plan['strategies'])}",
        "",
        f"{config['model']['name']}, {config['fl']['num_clients']} clients on {fleet}, {config['data']['partition']} split"
        + (f" (alpha {config['data']['alpha']})" if config["data"]["partition"] == "dirichlet" else "")
        + f", {config['fl']['clients_per_round']} clients per round, seeds {', '.join(map(str, plan['seeds']))}; devices keep their "
        "frozen-prefix activations (`devices.activation_cache`, default off): "
        f"{'on' if config['devices'].get('activation_cache') else 'off'}.",
        "",
        f"Command: `{plan['command']}`",
        "",
        f"Started {plan['started']} on {plan.get('machine', 'an unrecorded machine')}.",
        "",
    ]
    if "tuned" in plan:
        lines += [
            "Tuned per strategy on the validation split (`legend tune`, the same grid for each): "
            + "; ".join(f"{name}: {', '.join(f'`{k}={v}`' for k, v in setting.items())}" for name, setting in plan["tuned"].items())
            + ".",
            "",
        ]
    if unfinished:
        lines += [f"Not finished yet: {', '.join(unfinished)}.", ""]
    lines += [
        f"## Results (target accuracy {target:g})",
        "",
        *_table(finished, target),
        "",
        (
            "Accuracy: mean ± standard deviation over seeds, on the split each column names; the best test accuracy is the highest of "
            "all evaluations, so it is chosen on the test split and flatters every strategy: a figure to read, not to claim. "
            f"Time and bytes to target are judged on the {_target_split(finished)}, on the devices' virtual clock. (held): the held "
            "crossing, the first evaluation at or above the target whose next evaluation is at or above it too (or that is the run's "
            "last), so one evaluation that rises above the target and falls back does not count; first crossing: the first evaluation "
            "at or above it, held or not. Each averaged over the seeds, shown only when every seed reached it; in brackets the fastest "
            "and slowest seed. Virtual time and peak device memory are the cost model's estimates for the fleet's devices "
            "(`docs/devices.md`), not measurements."
        ),
        "",
        "## Quality under budget",
        "",
        *_budget(finished),
        "",
        (
            "Each strategy's accuracy, on the split the target is judged on, at its last evaluation at or before the virtual time, "
            "and at or before the bytes sent (up and down), at which the fastest strategy finished its rounds: the fastest is the "
            "one whose runs end first on the virtual clock (mean over seeds). Seed k is held to the fastest strategy's seed k; the "
            "header gives the mean budget; mean ± standard deviation over seeds."
        ),
        "",
        "## Relative to each other",
        "",
        (
            "Row against column: the row's speedup in virtual time to target by the held crossing (the "
            "column's mean time over the row's; with several seeds, the range of the per-seed speedups, each seed against the same "
            "seed), and the bytes it sent to reach the target, against the column's."
        ),
        "",
        *_relative(finished),
        "",
    ]
    for name, title in PLOTS.items():
        if name != "legend_layout.png" or has_layout:
            lines += [f"![{title}]({name})", ""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=1), "```", ""]
    return "\n".join(lines)


def _html(markdown: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
    )
    head = f"<head><meta charset='utf-8'><title>legend report</title><style>{style}</style></head>"
    return f"<!doctype html>\n<html>{head}<body>\n{body}</body></html>\n"


def _target_split(finished: list[Runs]) -> str:
    splits = {x.get("target_split", "test") for r in finished for x in r.summaries}
    if splits == {"validation"}:
        return "validation split held out of the training data (data.val_size)"
    return "test split" if splits <= {"test"} else "validation split where the run held one out, else the test split"


def _plot_curves(out: Path, finished: list[Runs], target: float) -> None:
    """Accuracy on the split the target is judged on (solid, with the target line); where that is validation, test dotted beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = _seconds([x["virtual_time_s"] for r in finished for x in r.summaries])
    validated = _validated(finished)
    curves = [("val_accuracy", "-", "validation"), ("accuracy", ":", "test")] if validated else [("accuracy", "-", "test")]
    for name, x_of, label in (
        ("accuracy_vs_time.png", lambda row, acc: row["virtual_time_s"] / scale, f"virtual time ({unit})"),
        ("accuracy_vs_bytes.png", lambda row, acc: acc / 1e6, "bytes sent, up and down (MB)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for index, r in enumerate(finished):
            for key, style, split in curves:
                xs, ys = _mean_curve(r.rows, x_of, key)
                ax.plot(
                    xs,
                    ys,
                    linestyle=style,
                    marker="." if style == "-" else None,
                    color=f"C{index}",
                    label=f"{r.strategy}, {split}" if validated else r.strategy,
                )
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g} ({curves[0][2]})")
        ax.set(xlabel=label, ylabel="accuracy", title=PLOTS[name])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def _mean_curve(runs: list[list[dict]], x_of, key: str) -> tuple[list[float], list[float]]:
    """Per evaluated round (common to all seeds): mean x and mean accuracy (``key``: test or validation) over the seeds."""
    per_seed = []
    for rows in runs:
        sent, points = 0, {}
        for row in rows:
            sent += row["bytes_up"] + row["bytes_down"]
            if row.get(key) is not None:
                points[row["round"]] = (x_of(row, sent), row[key])
        per_seed.append(points)
    rounds = sorted(set.intersection(*(set(p) for p in per_seed)))
    return ([statistics.fmean(p[r][0] for p in per_seed) for r in rounds], [statistics.fmean(p[r][1] for p in per_seed) for r in rounds])


def _plot_layout(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    last = {}
    for row in rows:
        for device in row["devices"]:
            last[device["client"]] = (device["device"], device["rank_by_block"])
    clients = sorted(last, key=lambda c: (last[c][0], c))
    ranks = np.array([last[c][1] for c in clients], dtype=float)
    fig, ax = plt.subplots(figsize=(6, max(3, 0.16 * len(clients) + 1.2)))
    image = ax.imshow(np.where(ranks > 0, ranks, np.nan), aspect="auto", cmap="viridis")
    ax.set_xticks(range(ranks.shape[1]), [f"{b}" for b in range(ranks.shape[1])])
    ax.set_yticks(range(len(clients)), [f"{c} {last[c][0]}" for c in clients], fontsize=6)
    ax.set(xlabel="block (0 = nearest the input)", title=PLOTS["legend_layout.png"])
    fig.colorbar(image, ax=ax, label="LoRA rank (blank: no adapter)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
